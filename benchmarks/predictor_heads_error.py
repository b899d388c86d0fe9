"""How far the code predictor's logits move from float32's when its heads are int8 (the CPU's
int8 x int8 heads, `cpu_kernels.PackedInt8DotStack`) on top of quantized layers.

    python benchmarks/predictor_heads_error.py --folder /tmp/ckpt0b6 [--rows 16]

Random talker hidden states and code-0 embeddings (rows of N(0, 1) scaled to the checkpoint's
embedding norm) go through `code_predictor.predict` with each variant's params, teacher-forced
with the float32 run's greedy codes so every step sees the same inputs; per variant: the
relative error of all 15 steps' logits against float32 (||a - b|| / ||b|| over rows and steps)
and the share of the 15 x rows greedy codes that equal float32's.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--folder", default="/tmp/ckpt0b6")
    ap.add_argument("--rows", type=int, default=16)
    args = ap.parse_args()
    sys.path.insert(0, ROOT)
    import jax
    import jax.numpy as jnp

    jax.config.update("jax_default_matmul_precision", "highest")
    from qwen3_tts_jax import checkpoint, code_predictor, cpu_kernels
    from qwen3_tts_jax.config import load_config
    from qwen3_tts_jax.options import Options

    cfg = load_config(args.folder)
    options = dataclasses.replace(Options.for_backend("cpu"), int8_activations="int8")
    load = lambda q: checkpoint.pack_for_inference(checkpoint.load_params(args.folder, cfg),
                                                   consume=True, quantize=q, options=options)
    ref = load(None)
    cp = ref["code_predictor"]
    D = cfg.talker.hidden_size
    rng = np.random.default_rng(0)
    emb = np.asarray(ref["talker"]["codec_embedding"])
    norm = float(np.linalg.norm(emb, axis=-1).mean())
    x = lambda: jnp.asarray(rng.standard_normal((args.rows, D), dtype=np.float32)
                            * norm / np.sqrt(D))
    hidden, code0 = x(), x()

    def run(p, forced=None):
        sample = ((lambda j, lg: jnp.argmax(lg, -1)) if forced is None else
                  (lambda j, lg: jnp.take(forced, j, axis=1)))
        f = jax.jit(lambda p, h, c: code_predictor.predict(p, cfg.talker, h, c, sample, options))
        return f(p["code_predictor"], hidden, code0)

    codes_ref, lg_ref = run(ref)
    codes_ref, lg_ref = np.asarray(codes_ref), np.asarray(lg_ref)
    print("| layers | heads | predictor logits rel. error vs float32 (15 steps, teacher-forced) | "
          "greedy codes equal to float32's |\n| --- | --- | --- | --- |")
    for q in ("int8", "int4"):
        p = load(q)
        heads_f32 = cpu_kernels.pack_stack(cp["lm_head"].unpack())
        for name, heads in (("float32", heads_f32),
                            ("int8", cpu_kernels.pack_stack(cp["lm_head"].unpack(), int8=True))):
            v = {**p, "code_predictor": {**p["code_predictor"], "lm_head": heads}}
            _, lg = run(v, jnp.asarray(codes_ref))
            lg = np.asarray(lg)
            err = np.linalg.norm(lg - lg_ref) / np.linalg.norm(lg_ref)
            same = float((lg.argmax(-1) == codes_ref).mean())
            print(f"| {q} | {name} | {err:.4f} | {same:.3f} |", flush=True)
        del p


if __name__ == "__main__":
    main()
