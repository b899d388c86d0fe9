"""The CPU's int8 products side by side in one process: int8 weights times float32 activations
(`Options.int8_activations="float"`, the panels widened to float32) against int8 x int8 on the
integer dot instructions ("int8": AVX-512 VNNI or AVX2, picked from CPUID at run time).

    python benchmarks/bench_int8_dot.py --folder /tmp/ckpt0b6 [--batches 1,8] [--frames 40]
                                        [--repeats 3] [--micro-only]

  micro   one product of each 0.6B decoder shape (q|k|v, o, gate|up, down) at 1 and 8 rows:
          median microseconds of 200 calls (each a jitted call of the product alone, so a few
          microseconds of dispatch are included), float32 panels for reference, the "int8" kernel
          on each instruction path this CPU has.
  frames  codes frames/s (greedy, no codec, prefill included) of `generate` on the full-size
          checkpoint at each batch, both formats held side by side (the same int8 values in
          either kernel's panels, every other array shared) and timed alternately (best of
          --repeats warm runs each), so that other load on the machine hits both alike.
The load average before and after is printed; the section is appended to --results (RESULTS.md).
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
    out = ["| product (K, N) | rows | float32 panels (us) | int8, float32 activations (us) | "
           + " | ".join(f"int8 x int8, {p} (us)" for p in cpu_kernels.int8_paths()
                        if p != "scalar") + " |",
           "| --- | --- | --- | --- | " + " | ".join("---" for p in cpu_kernels.int8_paths()
                                                    if p != "scalar") + " |"]
    rng = np.random.default_rng(0)
    for name, (K, N) in SHAPES.items():
        w = jnp.asarray(rng.standard_normal((K, N), dtype=np.float32) * 0.05)
        q = quantize.quantize_int8(w)
        variants = [(cpu_kernels.pack(w), "auto"), (cpu_kernels.pack(q, "float"), "auto")]
        variants += [(cpu_kernels.pack(q, "int8"), p) for p in cpu_kernels.int8_paths()
                     if p != "scalar"]
        for M in rows:
            x = jnp.asarray(rng.standard_normal((M, K), dtype=np.float32))
            cells = []
            for packed, path in variants:
                f = jax.jit(lambda x, p, path=path: cpu_kernels.linear(x, p, path=path))
                f(x, packed).block_until_ready()
                times = []
                for _ in range(200):
                    t = time.perf_counter()
                    f(x, packed).block_until_ready()
                    times.append(time.perf_counter() - t)
                cells.append(f"{np.median(times) * 1e6:.0f}")
            label = name.replace("|", "\\|")
            out.append(f"| {label} ({K}, {N}) | {M} | " + " | ".join(cells) + " |")
            print(out[-1], flush=True)
    return out


def frames(args, jax, jnp) -> list[str]:
    sys.path.insert(0, HERE)
    from bench_scale import DEFAULTS, LANGUAGE, SPEAKER, prompt_ids
    from qwen3_tts_jax import checkpoint, cpu_kernels, prompts, sampling
    from qwen3_tts_jax import generate as gen
    from qwen3_tts_jax.buckets import ladder
    from qwen3_tts_jax.config import load_config
    from qwen3_tts_jax.options import Options

    cfg = load_config(args.folder)
    base = Options.for_backend("cpu")
    new = dataclasses.replace(base, int8_activations="int8")
    params = checkpoint.pack_for_inference(checkpoint.load_params(args.folder, cfg),
                                           consume=True, quantize="int8", options=new)
    # the same int8 values in the "float" format's panels; every other array is shared (two
    # full loads do not fit beside other jobs on a small machine)
    is_dot = lambda w: isinstance(w, cpu_kernels.PackedInt8DotWeight)
    old = jax.tree_util.tree_map(lambda w: cpu_kernels.pack(w.unpack(), "float") if is_dot(w)
                                 else w, params, is_leaf=is_dot)
    formats = {"float": (jax.block_until_ready(old),
                         dataclasses.replace(base, int8_activations="float")),
               "int8": (params, new)}
    F = args.frames
    out = ["| batch | int8, float32 activations (codes frames/s) | int8 x int8 (codes frames/s) "
           "| ratio | first frames' codes equal |", "| --- | --- | --- | --- | --- |"]
    for B in args.batches:
        items = [prompts.build_prompt(cfg, prompt_ids(b), LANGUAGE, SPEAKER, None,
                                      non_streaming_mode=True) for b in range(B)]
        batch = prompts.batch_prompts(cfg, items, length=ladder(len(items[0])),
                                      trailing_length=ladder(len(items[0].trailing)))
        keys = jnp.stack([jax.random.PRNGKey(b) for b in range(B)])
        sp = lambda: sampling.SamplingParams.create(B, do_sample=False, temperature=1.0,
                                                    top_k=50, top_p=1.0, options=base)
        settings = gen.Settings(sp(), sp(), jnp.full((B,), DEFAULTS["repetition_penalty"]),
                                jnp.full((B,), F + 1, jnp.int32))
        best, codes = {}, {}
        for acts in formats:  # compile
            params, options = formats[acts]
            gen.generate(params, cfg, batch, settings, keys, max_frames=F, options=options)
        for _ in range(args.repeats):
            for acts, (params, options) in formats.items():
                t = time.perf_counter()
                state = gen.generate(params, cfg, batch, settings, keys, max_frames=F,
                                     options=options)
                n = int(np.asarray(state.length_B).sum())
                dt = time.perf_counter() - t
                best[acts] = max(best.get(acts, 0.0), n / dt)
                codes[acts] = np.asarray(state.codes_BxFxG)
        same = np.all(codes["float"] == codes["int8"], axis=-1)
        first = [int(np.argmin(r)) if not r.all() else F for r in same]
        out.append(f"| {B} | {best['float']:.2f} | {best['int8']:.2f} | "
                   f"{best['int8'] / best['float']:.2f}x | {min(first)} of {F} (first "
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
    ap.add_argument("--results", default=os.path.join(HERE, "RESULTS.md"))
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
    head = [f"## int8 x int8 products on the CPU's dot instructions against int8 x float32 "
            f"({datetime.datetime.utcnow():%Y-%m-%d %H:%M} UTC)", "",
            f"{model}, {os.cpu_count()} CPUs, paths {', '.join(cpu_kernels.int8_paths())}, "
            f"JAX {jax.__version__}, commit {commit}; load average {load0[0]:.2f} before, "
            f"{load1[0]:.2f} after (other agents share the cores). `python "
            f"benchmarks/bench_int8_dot.py --folder {args.folder} --batches "
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
