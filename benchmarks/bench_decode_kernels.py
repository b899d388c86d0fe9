"""The code predictor alone (a frame's codebooks 1..15: 15 steps of its 5-layer stack, heads and
greedy picks), XLA's ops against the Pallas kernels (`Options.predictor_kernels`) at several
tilings, side by side in one process, on random weights of the released shapes.

    python benchmarks/bench_predictor.py [--size 0b6|1b7|tiny] [--batches 1,2,8,16]
        [--variants xla,pallas,pallas:64,32,128,4,3,8] [--quantize int8] [--frames 50]
        [--results benchmarks/RESULTS.md] [--json out.json]

A variant is "xla", "pallas" (the default tiles) or "pallas:k,f,n,warps,stages,split"
(`Options.predictor_tiles`); on a backend other than a GPU the kernels run through Pallas'
interpreter (a rehearsal, not figures). Each variant runs --frames predictor calls in one
compiled loop (each call's input depends on the previous call's codes), warm, best of three;
reported: microseconds per call (one frame's predictor), the ratio to "xla" at the same batch,
and the largest |logits - xla logits| of the first call over the logits' spread, with the
fraction of greedy codes equal to xla's (bf16 sums in another order move near-ties). Only the
predictor: a frame also runs the talker and the sampler (bench_scale.py times those).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def variant_options(name: str, base):
    import dataclasses
    if name == "xla":
        return dataclasses.replace(base, predictor_kernels="xla")
    mode = "pallas" if base.cache_layout == "positions" and _gpu() else "interpret"
    if name == "pallas":
        return dataclasses.replace(base, predictor_kernels=mode, predictor_tiles=())
    if name.startswith("pallas:"):
        tiles = tuple(int(v) for v in name.split(":", 1)[1].split(","))
        return dataclasses.replace(base, predictor_kernels=mode, predictor_tiles=tiles)
    raise SystemExit(f"unknown variant {name!r}: xla, pallas or pallas:k,f,n,warps,stages,split")


def _gpu() -> bool:
    import jax
    return jax.default_backend() == "gpu"


def random_params(cfg, dtype, quantize_method, seed=0):
    """The predictor's params in the inference layout, normal(0, 0.02) weights, unit norms."""
    import jax
    import jax.numpy as jnp

    from qwen3_tts_jax import code_predictor, layers, quantize
    cp, D = cfg.code_predictor, cfg.hidden_size
    Dc, F, H, K, Dh = (cp.hidden_size, cp.intermediate_size, cp.num_attention_heads,
                       cp.num_key_value_heads, cp.head_dim)
    G = cfg.num_code_groups - 1
    keys = iter(jax.random.split(jax.random.PRNGKey(seed), 64))
    rnd = lambda *shape: (0.02 * jax.random.normal(next(keys), shape)).astype(dtype)
    one = lambda n: jnp.ones((n,), dtype)
    lps = []
    for _ in range(cp.num_hidden_layers):
        lp = layers.pack_layer({
            "attn": {"q": rnd(Dc, H * Dh), "k": rnd(Dc, K * Dh), "v": rnd(Dc, K * Dh),
                     "o": rnd(H * Dh, Dc), "q_norm": one(Dh), "k_norm": one(Dh)},
            "mlp": {"gate": rnd(Dc, F), "up": rnd(Dc, F), "down": rnd(F, Dc)},
            "input_norm": one(Dc), "post_norm": one(Dc)})
        lps.append(quantize.quantize_layer(lp, quantize_method) if quantize_method else lp)
    p = {"layers": lps, "norm": one(Dc), "codec_embedding": rnd(G, cp.vocab_size, D),
         "lm_head": rnd(G, Dc, cp.vocab_size)}
    if D != Dc:
        p["mtp_proj"] = {"w": rnd(D, Dc), "b": jnp.zeros((Dc,), dtype)}
    return code_predictor.stack_tables({"code_predictor": p})["code_predictor"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="0b6", choices=("tiny", "0b6", "1b7"))
    ap.add_argument("--batches", default="1,2,8,16")
    ap.add_argument("--variants", default="xla,pallas,pallas:64,32,128,4,3,8")
    ap.add_argument("--quantize", default=None, choices=(None, "int8"))
    ap.add_argument("--frames", type=int, default=50)
    ap.add_argument("--results", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    sys.path.insert(0, ROOT)
    sys.path.insert(0, HERE)
    import jax
    import jax.numpy as jnp

    import full_configs
    from qwen3_tts_jax import code_predictor
    from qwen3_tts_jax.config import parse_talker
    from qwen3_tts_jax.options import Options

    cfg = parse_talker(full_configs.talker(args.size, "custom_voice"))
    dtype = jnp.bfloat16 if jax.default_backend() != "cpu" else jnp.float32
    params = random_params(cfg, dtype, args.quantize)
    base = Options.for_backend(cpu_kernels=False, cache_layout="positions")
    names = args.variants.split(",")
    # "pallas:64,32,..." holds commas: rejoin the numbers with their variant
    variants = []
    for n in names:
        if variants and n.lstrip("-").isdigit() and variants[-1].startswith("pallas:"):
            variants[-1] += "," + n
        else:
            variants.append(n)
    rows = {}
    device = jax.devices()[0]
    for B in [int(b) for b in args.batches.split(",")]:
        rng = np.random.RandomState(B)
        hidden = jnp.asarray(rng.randn(B, cfg.hidden_size), dtype)
        emb = jnp.asarray(rng.randn(B, cfg.hidden_size), dtype)
        ref_logits = ref_codes = None
        for name in variants:
            options = variant_options(name, base)
            tiles = code_predictor.kernel_tiles(params, cfg.code_predictor, B, dtype, options)
            if options.predictor_kernels != "xla" and tiles is None:
                print(f"B={B} {name}: the kernels do not take this call; skipped", flush=True)
                continue

            def one(h, e, options=options):
                return code_predictor.predict(params, cfg, h, e, lambda j, lg: jnp.argmax(lg, -1),
                                              options)

            def loop(h, e, options=options):
                def body(_, carry):
                    h, e, acc = carry
                    codes, _ = one(h, e, options)
                    nudge = (codes.sum(axis=1, keepdims=True) % 7).astype(h.dtype) * 1e-3
                    return h + nudge, e, acc + codes.sum()
                return jax.lax.fori_loop(0, args.frames, body, (h, e, jnp.int32(0)))[2]
            first = jax.jit(one)
            run = jax.jit(loop)
            t = time.perf_counter()
            codes, logits = jax.block_until_ready(first(hidden, emb))
            jax.block_until_ready(run(hidden, emb))
            compile_s = time.perf_counter() - t
            best = float("inf")
            for _ in range(3):
                t = time.perf_counter()
                jax.block_until_ready(run(hidden, emb))
                best = min(best, time.perf_counter() - t)
            us = 1e6 * best / args.frames
            lg = np.asarray(logits, np.float32)
            row = dict(us=us, compile_s=compile_s, tiles=tiles)
            if ref_logits is None:
                ref_logits, ref_codes = lg, np.asarray(codes)
            else:
                row["logit_err"] = float(np.abs(lg - ref_logits).max() / ref_logits.std())
                row["codes_equal"] = float(np.mean(np.asarray(codes) == ref_codes))
            rows[f"{B}:{name}"] = row
            base_us = rows.get(f"{B}:{variants[0]}", {}).get("us", us)
            print(f"B={B} {name}: {us:.0f} us a predictor call ({base_us / us:.2f}x "
                  f"{variants[0]}), compile {compile_s:.1f} s"
                  + (f", logits err/spread {row['logit_err']:.3g}, codes equal "
                     f"{row['codes_equal']:.3f}" if "logit_err" in row else ""), flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    head = (f"## The code predictor alone, XLA's ops against the Pallas kernels, "
            f"{args.size}{' int8' if args.quantize else ''} ({when}, {device.device_kind}, "
            f"commit {commit})\n\n"
            f"`python benchmarks/bench_predictor.py --size {args.size} --batches {args.batches} "
            f"--variants {args.variants} --frames {args.frames}"
            f"{' --quantize int8' if args.quantize else ''}`; {jnp.dtype(dtype).name}, random "
            f"weights, greedy; microseconds per predictor call (a frame's codebooks 1..15), "
            f"warm, best of 3 loops of {args.frames}."
            + ("" if _gpu() else " The kernels through Pallas' interpreter: a rehearsal, not "
               "figures.") + "\n\n"
            "| batch | variant | us a call | vs first | logits err / spread | codes equal |\n"
            "| --- | --- | --- | --- | --- | --- |\n")
    lines = []
    for key, r in rows.items():
        B, name = key.split(":", 1)
        first_us = rows.get(f"{B}:{variants[0]}", r)["us"]
        lines.append(f"| {B} | {name} | {r['us']:.0f} | {first_us / r['us']:.2f}x | "
                     f"{r.get('logit_err', 0):.3g} | {r.get('codes_equal', 1):.3f} |")
    section = head + "\n".join(lines) + "\n"
    print(section)
    if args.results:
        with open(args.results, "a") as f:
            f.write("\n" + section)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device.device_kind, "commit": commit, "rows": rows}, f,
                      indent=1, default=str)


if __name__ == "__main__":
    main()
