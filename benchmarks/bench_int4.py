"""int4 weights (`quantize="int4"`) against int8 x int8 (`quantize="int8"`,
`Options.int8_activations="int8"`) on the CPU kernels, side by side in one process.

    python benchmarks/bench_int4.py --folder /tmp/ckpt0b6 [--batches 1,8] [--frames 40]
                                    [--repeats 3] [--micro-only] [--results FILE]

  micro   one product of each 0.6B decoder shape (q|k|v, o, gate|up, down) at 1 and 8 rows:
          median microseconds of 200 calls (each a jitted call of the product alone, a few
          microseconds of dispatch included), both formats on each integer dot path this CPU
          has, the two formats alternating call by call.
  frames  codes frames/s (greedy, no codec, prefill included) of `generate` on the full-size
          checkpoint at each batch, both formats quantized from the same float32 weights (every
          other array shared) and timed alternately (best of --repeats warm runs each), so that
          other load on the machine hits both alike.
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
    # the decoder products are the packed float32 weights; both formats from them
    is_f32 = lambda w: isinstance(w, cpu_kernels.PackedWeight)
    p8 = jax.block_until_ready(jax.tree_util.tree_map(
        lambda w: cpu_kernels.pack(quantize.quantize_int8(w.unpack()), "int8") if is_f32(w)
        else w, params, is_leaf=is_f32))
    p4 = jax.block_until_ready(jax.tree_util.tree_map(
        lambda w: cpu_kernels.pack(quantize.quantize_int4(w.unpack())) if is_f32(w) else w,
        params, is_leaf=is_f32))
    del params
    mb = lambda p, cls: sum(x.nbytes for w in jax.tree_util.tree_leaves(
        p, is_leaf=lambda w: isinstance(w, cls)) if isinstance(w, cls)
        for x in jax.tree_util.tree_leaves(w)) / 2**20
    print(f"decoder products: int8 {mb(p8, cpu_kernels.PackedInt8DotWeight):.0f} MiB, int4 "
          f"{mb(p4, cpu_kernels.PackedInt4Weight):.0f} MiB", flush=True)
    formats = {"int8": p8, "int4": p4}
    F = args.frames
    out = ["| batch | int8 x int8 (codes frames/s) | int4 x int8 (codes frames/s) | ratio | "
           "first frames' codes equal |", "| --- | --- | --- | --- | --- |"]
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
        same = np.all(codes["int8"] == codes["int4"], axis=-1)
        first = [int(np.argmin(r)) if not r.all() else F for r in same]
        out.append(f"| {B} | {best['int8']:.2f} | {best['int4']:.2f} | "
                   f"{best['int4'] / best['int8']:.2f}x | {min(first)} of {F} (first "
                   f"difference, min over rows) |")
        print(out[-1], flush=True)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--folder", default="/tmp/ckpt0b6")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--frames", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--micro-only", action="store_true")
    ap.add_argument("--results", default="")
    args = ap.parse_args()
    args.batches = [int(b) for b in args.batches.split(",") if b]
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
    lines = micro(jax, jnp, cpu_kernels, quantize)
    if not args.micro_only:
        lines += [""] + frames(args, jax, jnp)
    load1 = os.getloadavg()
    head = [f"## int4 weights against int8 x int8 on the CPU's dot instructions "
            f"({datetime.datetime.utcnow():%Y-%m-%d %H:%M} UTC)", "",
            f"{model}, {os.cpu_count()} CPUs, paths {', '.join(cpu_kernels.int8_paths())}, "
            f"JAX {jax.__version__}, commit {commit}; load average {load0[0]:.2f} before, "
            f"{load1[0]:.2f} after (other agents share the cores). `python "
            f"benchmarks/bench_int4.py --folder {args.folder} --batches "
            f"{','.join(map(str, args.batches))} --frames {args.frames} --repeats "
            f"{args.repeats}`" + (" --micro-only" if args.micro_only else "") + ".", ""]
    text = "\n".join(head + lines) + "\n"
    print(text)
    if args.results:
        sys.path.insert(0, HERE)
        from bench_generate import append_results
        append_results(args.results, text)


if __name__ == "__main__":
    main()
