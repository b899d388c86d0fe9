"""The Pallas decode kernels alone, XLA's ops against the kernels at several tilings, side by
side in one process, on random weights of the released shapes: the code predictor (a frame's
codebooks 1..15: 15 steps of its 5-layer stack, heads and greedy picks; `Options.predictor_kernels`)
or, with --part talker, the talker's frame step (its 28 layers over a cache filled to --context
slots, the codec head and a greedy pick; `Options.talker_kernels`).

    python benchmarks/bench_decode_kernels.py [--part predictor|talker] [--size 0b6|1b7|tiny]
        [--batches 1,2,8,16] [--context 64,512,2048] [--quantize int8] [--frames 50]
        [--variants xla,pallas,pallas:64,32,128,4,3,8] [--results benchmarks/RESULTS.md]
        [--json out.json]

A variant is "xla", "pallas" (the default tiles) or "pallas:k,f,n,warps,stages,split"
(`Options.predictor_tiles` / `talker_tiles`); on a backend other than a GPU the kernels run
through Pallas' interpreter (a rehearsal, not figures). Each variant runs --frames calls in one
compiled loop (each call's input depends on the previous call's codes), warm, best of three;
reported: microseconds per call, the ratio to the first variant at the same batch (and context),
and the largest |logits - first variant's logits| of the first call over the logits' spread, with
the fraction of greedy codes equal to its (bf16 sums in another order move near-ties). Only the
one part: a frame runs both, the sampler and the codec (bench_scale.py times whole frames).
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


def variant_options(name: str, base, part: str):
    import dataclasses
    field = f"{part}_kernels"
    if name == "xla":
        return dataclasses.replace(base, **{field: "xla"})
    mode = "pallas" if base.cache_layout == "positions" and _gpu() else "interpret"
    if name == "pallas":
        return dataclasses.replace(base, **{field: mode, f"{part}_tiles": ()})
    if name.startswith("pallas:"):
        tiles = tuple(int(v) for v in name.split(":", 1)[1].split(","))
        return dataclasses.replace(base, **{field: mode, f"{part}_tiles": tiles})
    raise SystemExit(f"unknown variant {name!r}: xla, pallas or pallas:k,f,n,warps,stages,split")


def _gpu() -> bool:
    import jax
    return jax.default_backend() == "gpu"


def random_layers(stack, dtype, quantize_method, rnd):
    """A decoder stack's layers in the inference layout: normal(0, 0.02) weights, unit norms."""
    import jax.numpy as jnp

    from qwen3_tts_jax import layers, quantize
    D, F, H, K, Dh = (stack.hidden_size, stack.intermediate_size, stack.num_attention_heads,
                      stack.num_key_value_heads, stack.head_dim)
    one = lambda n: jnp.ones((n,), dtype)
    lps = []
    for _ in range(stack.num_hidden_layers):
        lp = layers.pack_layer({
            "attn": {"q": rnd(D, H * Dh), "k": rnd(D, K * Dh), "v": rnd(D, K * Dh),
                     "o": rnd(H * Dh, D), "q_norm": one(Dh), "k_norm": one(Dh)},
            "mlp": {"gate": rnd(D, F), "up": rnd(D, F), "down": rnd(F, D)},
            "input_norm": one(D), "post_norm": one(D)})
        lps.append(quantize.quantize_layer(lp, quantize_method) if quantize_method else lp)
    return lps


def _normal(dtype, seed):
    import jax
    keys = iter(jax.random.split(jax.random.PRNGKey(seed), 1024))
    return lambda *shape: (0.02 * jax.random.normal(next(keys), shape)).astype(dtype)


def random_params(cfg, dtype, quantize_method, seed=0):
    """The predictor's params in the inference layout."""
    import jax.numpy as jnp

    from qwen3_tts_jax import code_predictor
    cp, D = cfg.code_predictor, cfg.hidden_size
    G = cfg.num_code_groups - 1
    rnd = _normal(dtype, seed)
    p = {"layers": random_layers(cp, dtype, quantize_method, rnd),
         "norm": jnp.ones((cp.hidden_size,), dtype),
         "codec_embedding": rnd(G, cp.vocab_size, D), "lm_head": rnd(G, cp.hidden_size, cp.vocab_size)}
    if D != cp.hidden_size:
        p["mtp_proj"] = {"w": rnd(D, cp.hidden_size), "b": jnp.zeros((cp.hidden_size,), dtype)}
    return code_predictor.stack_tables({"code_predictor": p})["code_predictor"]


def random_talker(cfg, dtype, quantize_method, seed=0):
    """The talker's decoder stack, final norm and codec head in the inference layout."""
    import jax.numpy as jnp
    rnd = _normal(dtype, seed)
    return {"layers": random_layers(cfg, dtype, quantize_method, rnd),
            "norm": jnp.ones((cfg.hidden_size,), dtype),
            "codec_head": rnd(cfg.hidden_size, cfg.vocab_size)}


def predictor_case(params, cfg, B, dtype, options, rng):
    """(call(state) -> (codes, logits, state after the call), the first state,
    advance(state, codes) -> the next call's state)."""
    import jax.numpy as jnp

    from qwen3_tts_jax import code_predictor
    hidden = jnp.asarray(rng.randn(B, cfg.hidden_size), dtype)
    emb = jnp.asarray(rng.randn(B, cfg.hidden_size), dtype)

    def call(state):
        codes, logits = code_predictor.predict(params, cfg, state[0], state[1],
                                               lambda j, lg: jnp.argmax(lg, -1), options)
        return codes, logits, state

    def advance(state, codes):
        nudge = (codes.sum(axis=1, keepdims=True) % 7).astype(dtype) * 1e-3
        return state[0] + nudge, state[1]
    return call, (hidden, emb), advance


def talker_case(params, cfg, B, context, dtype, options, rng):
    """The talker's step at write slot `context` over a cache of random entries, rows left-padded
    by 0..3 slots (their own starts and positions); each call writes slot `context` again (the
    caches carried from call to call, as in the frame loop)."""
    import jax.numpy as jnp

    from qwen3_tts_jax import layers, talker
    S = context + 16
    K, Dh = cfg.num_key_value_heads, cfg.head_dim
    caches = [layers.KVCache(*(jnp.asarray(rng.randn(B, S, K, Dh), dtype) for _ in range(2)))
              for _ in range(cfg.num_hidden_layers)]
    first = jnp.asarray(np.arange(B) % 4, jnp.int32)
    x = jnp.asarray(rng.randn(B, cfg.hidden_size), dtype)

    def call(state):
        h, lg, new = talker.step(params, state[0], context - first, state[1], context, first, cfg,
                                 options)
        return jnp.argmax(lg, -1)[:, None], lg[:, None], (state[0], new)

    def advance(state, codes):
        nudge = (codes % 7).astype(dtype) * 1e-3
        return state[0] + nudge, state[1]
    return call, (x, caches), advance


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", default="predictor", choices=("predictor", "talker"))
    ap.add_argument("--size", default="0b6", choices=("tiny", "0b6", "1b7"))
    ap.add_argument("--batches", default="1,2,8,16")
    ap.add_argument("--context", default="64,512,2048",
                    help="--part talker: the filled cache slots a step attends to")
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
    from qwen3_tts_jax import code_predictor, talker
    from qwen3_tts_jax.config import parse_talker
    from qwen3_tts_jax.options import Options

    cfg = parse_talker(full_configs.talker(args.size, "custom_voice"))
    dtype = jnp.bfloat16 if jax.default_backend() != "cpu" else jnp.float32
    if args.part == "predictor":
        params = random_params(cfg, dtype, args.quantize)
        contexts = [0]
    else:
        params = random_talker(cfg, dtype, args.quantize)
        contexts = [int(c) for c in args.context.split(",")]
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
        for context in contexts:
            where = f"B={B}" + (f" context={context}" if args.part == "talker" else "")
            ref_logits = ref_codes = None
            for name in variants:
                options = variant_options(name, base, args.part)
                rng = np.random.RandomState(B)
                if args.part == "predictor":
                    tiles = code_predictor.kernel_tiles(params, cfg.code_predictor, B, dtype,
                                                        options)
                    call, state, advance = predictor_case(params, cfg, B, dtype, options, rng)
                    mode = options.predictor_kernels
                else:
                    tiles = talker.kernel_tiles(params, cfg, B, dtype, options)
                    call, state, advance = talker_case(params, cfg, B, context, dtype, options,
                                                       rng)
                    mode = options.talker_kernels
                if mode != "xla" and tiles is None:
                    print(f"{where} {name}: the kernels do not take this call; skipped",
                          flush=True)
                    continue

                def loop(state, call=call, advance=advance):
                    def body(_, carry):
                        state, acc = carry
                        codes, _, state = call(state)
                        return advance(state, codes), acc + codes.sum()
                    return jax.lax.fori_loop(0, args.frames, body, (state, jnp.int32(0)))[1]
                first = jax.jit(call)
                run = jax.jit(loop)
                t = time.perf_counter()
                codes, logits, _ = jax.block_until_ready(first(state))
                jax.block_until_ready(run(state))
                compile_s = time.perf_counter() - t
                best = float("inf")
                for _ in range(3):
                    t = time.perf_counter()
                    jax.block_until_ready(run(state))
                    best = min(best, time.perf_counter() - t)
                us = 1e6 * best / args.frames
                lg = np.asarray(logits, np.float32)
                row = dict(us=us, compile_s=compile_s, tiles=tiles)
                if ref_logits is None:
                    ref_logits, ref_codes = lg, np.asarray(codes)
                else:
                    row["logit_err"] = float(np.abs(lg - ref_logits).max() / ref_logits.std())
                    row["codes_equal"] = float(np.mean(np.asarray(codes) == ref_codes))
                key = f"{B}:{context}:{name}"
                rows[key] = row
                base_us = rows.get(f"{B}:{context}:{variants[0]}", {}).get("us", us)
                print(f"{where} {name}: {us:.0f} us a call ({base_us / us:.2f}x {variants[0]}), "
                      f"compile {compile_s:.1f} s"
                      + (f", logits err/spread {row['logit_err']:.3g}, codes equal "
                         f"{row['codes_equal']:.3f}" if "logit_err" in row else ""), flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    what = ("The code predictor alone" if args.part == "predictor" else
            "The talker's frame step alone")
    call_is = ("a predictor call: a frame's codebooks 1..15" if args.part == "predictor" else
               "a talker step: 28 layers at a cache filled to `context` slots, codec head")
    head = (f"## {what}, XLA's ops against the Pallas kernels, "
            f"{args.size}{' int8' if args.quantize else ''} ({when}, {device.device_kind}, "
            f"commit {commit})\n\n"
            f"`python benchmarks/bench_decode_kernels.py --part {args.part} --size {args.size} "
            f"--batches {args.batches}"
            + (f" --context {args.context}" if args.part == "talker" else "")
            + f" --variants {args.variants} --frames {args.frames}"
            f"{' --quantize int8' if args.quantize else ''}`; {jnp.dtype(dtype).name}, random "
            f"weights, greedy; microseconds per call ({call_is}), warm, best of 3 loops of "
            f"{args.frames}."
            + ("" if _gpu() else " The kernels through Pallas' interpreter: a rehearsal, not "
               "figures.") + "\n\n"
            "| batch | context | variant | us a call | vs first | logits err / spread | "
            "codes equal |\n| --- | --- | --- | --- | --- | --- | --- |\n")
    lines = []
    for key, r in rows.items():
        B, context, name = key.split(":", 2)
        first_us = rows.get(f"{B}:{context}:{variants[0]}", r)["us"]
        lines.append(f"| {B} | {context if args.part == 'talker' else '-'} | {name} | "
                     f"{r['us']:.0f} | {first_us / r['us']:.2f}x | "
                     f"{r.get('logit_err', 0):.3g} | {r.get('codes_equal', 1):.3f} |")
    section = head + "\n".join(lines) + "\n"
    print(section)
    if args.results:
        with open(args.results, "a") as f:
            f.write("\n" + section)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device.device_kind, "commit": commit, "part": args.part,
                       "rows": rows}, f, indent=1, default=str)


if __name__ == "__main__":
    main()
