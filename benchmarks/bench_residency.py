"""Would keeping the code predictor's weights in the CPU's cache pay? The predictor's 15 steps per
frame each run its 5 layers (0.6B: 15.7 MB of int8 weights per layer, 79 MB in all, against this
machine's 32 MB L3). The steps cannot be reordered (step j + 1 reads step j's sampled code), so
"blocking the 15 steps for cache residency" can only mean making the weights of a step fit the
cache. This measures what that would be worth, before building a format for it:

    python benchmarks/bench_residency.py [--rows 1 8] [--layers 1 2 5 10] [--repeats 200]

One jitted program runs the four products of a 0.6B decoder layer (q|k|v, o, gate|up, down, on
the CPU kernels the predictor uses: int8 weights, int8 x int8 on the dot instructions; and
float32 panels for reference) through L distinct layers in a chain, and is called repeatedly:
with L = 1 (15.7 MB int8) the weights stay in L3 between calls, with L = 5 or 10 (79-157 MB)
every call streams them from memory. Reported: microseconds per layer (median of --repeats
calls / L) and the implied read bandwidth. If the per-layer time at L = 1 is no better than at
L = 5, the kernel is compute-bound at that row count and cache residency cannot pay.
"""
from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
LAYER = {"q|k|v": (1024, 4096), "o": (2048, 1024), "gate|up": (1024, 6144), "down": (3072, 1024)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--layers", type=int, nargs="+", default=[1, 2, 5, 10])
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--formats", default="int8,float32")
    args = ap.parse_args(argv)
    sys.path.insert(0, ROOT)
    import jax
    import jax.numpy as jnp

    from qwen3_tts_jax import cpu_kernels, quantize

    rng = np.random.default_rng(0)
    load0 = os.getloadavg()[0]

    def make_layer(fmt):
        out = {}
        for name, (K, N) in LAYER.items():
            w = jnp.asarray(rng.standard_normal((K, N), dtype=np.float32) * 0.05)
            out[name] = (cpu_kernels.pack(quantize.quantize_int8(w), "int8") if fmt == "int8"
                         else cpu_kernels.pack(w))
        return out

    def chain(x, layers):
        for lp in layers:
            h = cpu_kernels.linear(x, lp["q|k|v"])[:, :2048]
            h = cpu_kernels.linear(h, lp["o"])
            h = cpu_kernels.linear(h, lp["gate|up"])[:, :3072]
            h = cpu_kernels.linear(h, lp["down"])
            x = h * jax.lax.rsqrt(jnp.mean(h * h, -1, keepdims=True) + 1e-6)
        return x

    f = jax.jit(chain)
    per_layer_bytes = {"int8": sum(K * N for K, N in LAYER.values()),
                       "float32": 4 * sum(K * N for K, N in LAYER.values())}
    lines = ["| format | rows | layers in the chain | weights MB | us per layer | "
             "weights read GB/s |", "| --- | --- | --- | --- | --- | --- |"]
    for fmt in args.formats.split(","):
        pool = [make_layer(fmt) for _ in range(max(args.layers))]
        for M in args.rows:
            x = jnp.asarray(rng.standard_normal((M, 1024), dtype=np.float32))
            for L in args.layers:
                layers = pool[:L]
                f(x, layers).block_until_ready()
                ts = []
                for _ in range(args.repeats):
                    t = time.perf_counter()
                    f(x, layers).block_until_ready()
                    ts.append(time.perf_counter() - t)
                us = 1e6 * float(np.median(ts)) / L
                mb = per_layer_bytes[fmt] * L / 1e6
                gbs = per_layer_bytes[fmt] / (us * 1e-6) / 1e9
                lines.append(f"| {fmt} | {M} | {L} | {mb:.0f} | {us:.0f} | {gbs:.1f} |")
                print(lines[-1], flush=True)
    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    print(f"\n{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, commit {commit}, "
          f"load average {load0:.1f} -> {os.getloadavg()[0]:.1f}, int8 path "
          f"{cpu_kernels.int8_paths()[-1]} (the fastest this CPU has, which \"auto\" picks)")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
