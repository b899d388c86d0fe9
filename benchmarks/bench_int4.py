"""int4 weights (`quantize="int4"`) against int8 x int8 (`quantize="int8"`,
`Options.int8_activations="int8"`) on the CPU kernels, side by side in one process.

    python benchmarks/bench_int4.py --folder /tmp/ckpt0b6 [--batches 1,8] [--frames 40]
                                    [--repeats 3] [--formats int8,int4] [--micro-only | --no-micro]
                                    [--results FILE]

  micro   one product of each 0.6B decoder shape (q|k|v, o, gate|up, down) at 1 and 8 rows:
          median microseconds of 200 calls (each a jitted call of the product alone, a few
          microseconds of dispatch included), both formats on each integer dot path this CPU
          has, the two formats alternating call by call.
  frames  codes frames/s (greedy, no codec, prefill included) of `generate` on the full-size
          checkpoint at each batch, each of --formats (int8f: int8 weights x float32 activations,
          int8: x int8 activations, int4) quantized from the same float32 weights (every other
          array shared) and timed alternately (best of --repeats warm runs each), so that other
          load on the machine hits them alike.
The load average before and after is printed; with --results the section is appended there.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
LABELS = {"int8f": "int8 x float32", "int8": "int8 x int8", "int4": "int4 x int8"}
SHAPES = {"q|k|v": (1024, 4096), "o": (2048, 1024), "gate|up": (1024, 6144),
          "down": (3072, 1024)}


def micro(jax, jnp, cpu_kernels, quantize, rows=(1, 8)) -> list[str]:
    paths = [p for p in cpu_kernels.int8_paths() if p != "scalar"]
    out = ["| product (K, N) | rows | " + " | ".join(
        f"int8 x int8, {p} (us) | int4 x int8, {p} (us) | int4 / int8" for p in paths) + " |",
        "| --- | --- | " + " | ".join("--- | --- | ---" for _ in paths) + " |"]
    rng = np.random.default_rng(0)
    for name, (K, N) in SHAPES.items():
        w = jnp.asarray(rng.standard_normal((K, N), dtype=np.float32) * 0.05)
        w8 = cpu_kernels.pack(quantize.quantize_int8(w), "int8")
        w4 = cpu_kernels.pack(quantize.quantize_int4(w))
        for M in rows:
            x = jnp.asarray(rng.standard_normal((M, K), dtype=np.float32))
            cells = []
            for path in paths:
                f = jax.jit(lambda x, p, path=path: cpu_kernels.linear(x, p, path=path))
                f(x, w8).block_until_ready()
                f(x, w4).block_until_ready()
                times = {8: [], 4: []}
                for _ in range(200):
                    for bits, packed in ((8, w8), (4, w4)):
                        t = time.perf_counter()
                        f(x, packed).block_until_ready()
                        times[bits].append(time.perf_counter() - t)
                t8, t4 = np.median(times[8]) * 1e6, np.median(times[4]) * 1e6
                cells.append(f"{t8:.0f} | {t4:.0f} | {t4 / t8:.2f}")
            label = name.replace("|", "\\|")
            out.append(f"| {label} ({K}, {N}) | {M} | " + " | ".join(cells) + " |")
            print(out[-1], flush=True)
    return out


def frames(args, jax, jnp) -> list[str]:
    sys.path.insert(0, HERE)
    from bench_scale import DEFAULTS, LANGUAGE, SPEAKER, prompt_ids
    from qwen3_tts_jax import checkpoint, cpu_kernels, prompts, quantize, sampling
    from qwen3_tts_jax import generate as gen
    from qwen3_tts_jax.buckets import ladder
    from qwen3_tts_jax.config import load_config
    from qwen3_tts_jax.options import Options

    cfg = load_config(args.folder)
    options = dataclasses.replace(Options.for_backend("cpu"), int8_activations="int8")
    params = checkpoint.pack_for_inference(checkpoint.load_params(args.folder, cfg),
                                           consume=True, options=options)
    # the decoder products are the packed float32 weights; every format from them
    is_f32 = lambda w: isinstance(w, cpu_kernels.PackedWeight)
    makers = {"int8f": lambda w: cpu_kernels.pack(quantize.quantize_int8(w), "float"),
              "int8": lambda w: cpu_kernels.pack(quantize.quantize_int8(w), "int8"),
              "int4": lambda w: cpu_kernels.pack(quantize.quantize_int4(w))}
    formats = {name: jax.block_until_ready(jax.tree_util.tree_map(
        lambda w, name=name: makers[name](w.unpack()) if is_f32(w) else w, params, is_leaf=is_f32))
        for name in args.formats}
    del params
    nbytes = lambda p: sum(x.nbytes for w in jax.tree_util.tree_leaves(
        p, is_leaf=lambda w: isinstance(w, PACKED)) if isinstance(w, PACKED)
        for x in jax.tree_util.tree_leaves(w)) / 2**20
    PACKED = (cpu_kernels.PackedInt8Weight, cpu_kernels.PackedInt8DotWeight,
              cpu_kernels.PackedInt4Weight)
    print("decoder products: " + ", ".join(f"{LABELS[n]} {nbytes(p):.0f} MiB"
                                           for n, p in formats.items()), flush=True)
    F = args.frames
    base = args.formats[0]
    out = ["| batch | " + " | ".join(f"{LABELS[n]} (codes frames/s)" for n in args.formats) + " | "
           + " | ".join(f"{n} / {base}" for n in args.formats[1:])
           + f" | first frames' codes equal ({args.formats[-1]} vs {base}) |",
           "| --- " * (2 * len(args.formats)) + "| --- |"]
    for B in args.batches:
        items = [prompts.build_prompt(cfg, prompt_ids(b), LANGUAGE, SPEAKER, None,
                                      non_streaming_mode=True) for b in range(B)]
        batch = prompts.batch_prompts(cfg, items, length=ladder(len(items[0])),
                                      trailing_length=ladder(len(items[0].trailing)))
        keys = jnp.stack([jax.random.PRNGKey(b) for b in range(B)])
        sp = lambda: sampling.SamplingParams.create(B, do_sample=False, temperature=1.0,
                                                    top_k=50, top_p=1.0, options=options)
        settings = gen.Settings(sp(), sp(), jnp.full((B,), DEFAULTS["repetition_penalty"]),
                                jnp.full((B,), F + 1, jnp.int32))
        best, codes = {}, {}
        for params in formats.values():  # compile
            gen.generate(params, cfg, batch, settings, keys, max_frames=F, options=options)
        for _ in range(args.repeats):
            for name, params in formats.items():
                t = time.perf_counter()
                state = gen.generate(params, cfg, batch, settings, keys, max_frames=F,
                                     options=options)
                n = int(np.asarray(state.length_B).sum())
                dt = time.perf_counter() - t
                best[name] = max(best.get(name, 0.0), n / dt)
                codes[name] = np.asarray(state.codes_BxFxG)
        same = np.all(codes[args.formats[-1]] == codes[base], axis=-1)
        first = [int(np.argmin(r)) if not r.all() else F for r in same]
        out.append(f"| {B} | " + " | ".join(f"{best[n]:.2f}" for n in args.formats) + " | "
                   + " | ".join(f"{best[n] / best[base]:.2f}x" for n in args.formats[1:])
                   + f" | {min(first)} of {F} (first difference, min over rows) |")
        print(out[-1], flush=True)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--folder", default="/tmp/ckpt0b6")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--frames", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--formats", default="int8,int4",
                    help="weight formats timed alternately, the first the ratios' base: int8f "
                         "(int8 weights x float32 activations), int8 (x int8), int4")
    ap.add_argument("--micro-only", action="store_true")
    ap.add_argument("--no-micro", action="store_true", help="frames only")
    ap.add_argument("--results", default="")
    args = ap.parse_args()
    args.batches = [int(b) for b in args.batches.split(",") if b]
    args.formats = [f for f in args.formats.split(",") if f]
    if not args.formats or any(f not in LABELS for f in args.formats):
        ap.error(f"--formats: a comma-separated list of {', '.join(LABELS)}")
    sys.path.insert(0, ROOT)
    import jax
    import jax.numpy as jnp

    jax.config.update("jax_default_matmul_precision", "highest")
    from qwen3_tts_jax import cpu_kernels, quantize

    if not cpu_kernels.available():
        sys.exit("the CPU kernels are needed (they did not build here)")
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((ln.split(":", 1)[1].strip() for ln in cpu.splitlines()
                  if ln.startswith("Model name")), "?")
    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    load0 = os.getloadavg()
    lines = [] if args.no_micro else micro(jax, jnp, cpu_kernels, quantize) + [""]
    if not args.micro_only:
        lines += frames(args, jax, jnp)
    load1 = os.getloadavg()
    head = [f"## Weight formats on the CPU kernels: {', '.join(LABELS[f] for f in args.formats)} "
            f"({datetime.datetime.utcnow():%Y-%m-%d %H:%M} UTC)", "",
            f"{model}, {os.cpu_count()} CPUs, paths {', '.join(cpu_kernels.int8_paths())}, "
            f"JAX {jax.__version__}, commit {commit}; load average {load0[0]:.2f} before, "
            f"{load1[0]:.2f} after (other agents share the cores). `python "
            f"benchmarks/bench_int4.py --folder {args.folder} --batches "
            f"{','.join(map(str, args.batches))} --frames {args.frames} --repeats "
            f"{args.repeats} --formats {','.join(args.formats)}`"
            + (" --micro-only" if args.micro_only else "") + (" --no-micro" if args.no_micro else "")
            + ".", ""]
    text = "\n".join(head + lines) + "\n"
    print(text)
    if args.results:
        sys.path.insert(0, HERE)
        from bench_generate import append_results
        append_results(args.results, text)


if __name__ == "__main__":
    main()
