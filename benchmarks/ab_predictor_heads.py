"""The code predictor's heads read in place by the CPU kernel (`cpu_kernels.PackedStack`) against
the stacked array that XLA slices every step, side by side in one process.

    python benchmarks/ab_predictor_heads.py --folder /tmp/ckpt0b6 [--formats f32,int8,int4]
                                           [--batches 1,8] [--frames 40] [--repeats 3]

For each weight format (f32: float32 products; int8: int8 x int8; int4) the checkpoint is packed
once; the variants (float32 heads as the stacked array; float32 heads packed; for int8 and int4
also int8 heads, `cpu_kernels.PackedInt8DotStack`) share every array but the heads and are timed
alternately (codes frames/s,
greedy, no codec, prefill included; best of --repeats warm runs each), so that other load on the
machine hits both alike. Greedy codes of the two are compared (the same products, summed in
another order). The load average before and after is printed.
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


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--folder", default="/tmp/ckpt0b6")
    ap.add_argument("--formats", default="f32,int8,int4")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--frames", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    sys.path.insert(0, ROOT)
    sys.path.insert(0, HERE)
    import jax
    import jax.numpy as jnp

    jax.config.update("jax_default_matmul_precision", "highest")
    from bench_scale import DEFAULTS, LANGUAGE, SPEAKER, prompt_ids
    from qwen3_tts_jax import checkpoint, cpu_kernels, prompts, sampling
    from qwen3_tts_jax import generate as gen
    from qwen3_tts_jax.buckets import ladder
    from qwen3_tts_jax.config import load_config
    from qwen3_tts_jax.options import Options

    if not cpu_kernels.available():
        sys.exit("the CPU kernels are needed (they did not build here)")
    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    load0 = os.getloadavg()
    cfg = load_config(args.folder)
    options = dataclasses.replace(Options.for_backend("cpu"), int8_activations="int8")
    F = args.frames
    out = ["| weights | batch | float32 heads as an array, XLA slices (codes frames/s) | float32 "
           "heads read in place | ratio | int8 heads read in place | ratio | greedy codes equal "
           "(float32 heads, array vs in place) |", "| --- " * 8 + "|"]
    for fmt in args.formats.split(","):
        params = checkpoint.load_params(args.folder, cfg)
        stacked = params["code_predictor"]["lm_head"]
        packed = checkpoint.pack_for_inference(params, consume=True, quantize=None if fmt == "f32"
                                               else fmt, options=options)
        del params
        array = stacked
        with_heads = lambda h, p=packed: {**p, "code_predictor": {**p["code_predictor"],
                                                                  "lm_head": h}}
        variants = {"array": with_heads(array),
                    "kernel": with_heads(cpu_kernels.pack_stack(array))}
        if fmt != "f32":
            variants["int8"] = with_heads(cpu_kernels.pack_stack(array, int8=True))
        for B in [int(b) for b in args.batches.split(",")]:
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
            for params in variants.values():  # compile
                gen.generate(params, cfg, batch, settings, keys, max_frames=F, options=options)
            for _ in range(args.repeats):
                for name, params in variants.items():
                    t = time.perf_counter()
                    state = gen.generate(params, cfg, batch, settings, keys, max_frames=F,
                                         options=options)
                    n = int(np.asarray(state.length_B).sum())
                    best[name] = max(best.get(name, 0.0), n / (time.perf_counter() - t))
                    codes[name] = np.asarray(state.codes_BxFxG)
            int8 = (f"{best['int8']:.2f} | {best['int8'] / best['array']:.2f}x | "
                    if "int8" in best else "- | - | ")
            out.append(f"| {fmt} | {B} | {best['array']:.2f} | {best['kernel']:.2f} | "
                       f"{best['kernel'] / best['array']:.2f}x | " + int8
                       + f"{bool(np.array_equal(codes['array'], codes['kernel']))} |")
            print(out[-1], flush=True)
        del packed, variants
    load1 = os.getloadavg()
    now = f"{datetime.datetime.utcnow():%Y-%m-%d %H:%M}"
    head = [f"## Predictor heads read in place on the CPU ({now} UTC)", "",
            f"{os.cpu_count()} CPUs, JAX {jax.__version__}, commit {commit}; "
            f"load average {load0[0]:.2f} before, {load1[0]:.2f} after. `python "
            f"benchmarks/ab_predictor_heads.py --folder {args.folder} --formats {args.formats} "
            f"--batches {args.batches} --frames {F} --repeats {args.repeats}`.", ""]
    print("\n".join(head + out))


if __name__ == "__main__":
    main()
