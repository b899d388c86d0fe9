"""How close int8 weights (`quantize.py`, `--quantize int8`) stay to the float32 model, next to
bf16 (the accelerators' default), on a full-size random-weight checkpoint.

    python benchmarks/bench_quantize.py --folder /tmp/ckpt [--size 0b6] [--rows 8] [--frames 50]

Measures, for int8 and for bf16 weights against float32 (batch of --rows prompts, greedy):
  logits error / spread   max |logits - float32 logits| over the float32 logits' standard
                          deviation: the talker's first code-0 logits (prefill), and the code
                          predictor's 15 steps of the first frame teacher-forced with float32's
                          codes (max over steps and rows)
  top-1 agreement         the first frame's greedy code 0 (rows), and the predictor's
                          teacher-forced greedy codes 1..15 (rows x 15), equal to float32's
  frames before the first difference   greedy generation of --frames frames, per row (median)
Random weights give flat logits with many near-ties, so greedy frames diverge early even for
small errors: the error-over-spread ratio, int8 next to bf16, is the scale-free measure.
The checkpoint is built (with bench_scale.py) when the folder has none. Results are printed and
appended to benchmarks/RESULTS.md.

    python benchmarks/bench_quantize.py --formats [--tiny 3] [--folder /tmp/ckpt0b6] [--frames 200]

The int8 formats of the CPU kernels against float32 (`Options.int8_activations`: "float", the
int8 weights widened to float32; "int8", the activations quantized per block of 32 or 64 k, or
per row) and int4 weights (`quantize="int4"`; --only SUBSTRING keeps the formats whose name has
it), on --tiny random tiny checkpoints (tests/official.py, no EOS, built in a temporary
folder) and on the full-size checkpoint of --folder if given; two prompts each, greedy:
  logits rel. error   ||logits - float32 logits|| / ||float32 logits||, the first code-0 step
  first difference    the first frame whose 16 codes differ from float32's (per prompt)
  codes equal         the fraction of the --frames x 16 codes equal to float32's, position-wise
  audio SNR           both code sequences through the checkpoint's codec: 10 log10(sum ref^2 /
                      sum (wave - ref)^2) over the shorter wave, dB
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


FORMATS = (("int8 weights, float32 activations", "float", None),
           ("int8 weights, int8 activations per 32 k", "int8", 32),
           ("int8 weights, int8 activations per 64 k", "int8", 64),
           ("int8 weights, int8 activations per row", "int8", 0),
           ("int4 weights (scale per 32 k), int8 activations per 32 k", "int4", 32))


def formats(args):
    import tempfile

    sys.path.insert(0, ROOT)
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import jax
    import jax.numpy as jnp

    jax.config.update("jax_default_matmul_precision", "highest")
    from qwen3_tts_jax import Qwen3TTS, cpu_kernels
    from qwen3_tts_jax import generate as gen
    from qwen3_tts_jax.options import Options

    base = Options.for_backend("cpu")
    if not base.cpu_kernels:
        sys.exit("the CPU kernels are needed (they did not build here)")
    texts = ["Hello there, this is a longer test of the quantized formats.", "Short one."]
    F = args.frames

    def run(tts, params, options):
        kw = dict(text=texts, speaker=["ryan", "vivian"], language=["english", "english"],
                  do_sample=False, subtalker_dosample=False, max_new_tokens=F + 1)
        batch, settings, keys = tts.prepare_custom_voice(**kw)
        state, _ = gen.prefill(params, tts.config, batch, settings, keys,
                               frames=gen.capacity(F + 1, options), options=options)
        logits = np.asarray(state.logits_BxV, np.float64)
        out = gen.generate(params, tts.config, batch, settings, keys, max_frames=F,
                           options=options)
        lengths = np.asarray(out.length_B)
        codes = [np.asarray(out.codes_BxFxG)[b, :lengths[b]] for b in range(len(texts))]
        waves = tts.decode(codes)[0]
        return logits, codes, waves

    def with_block(params, block):
        is_dot = lambda w: isinstance(w, cpu_kernels.PackedInt8DotWeight)
        return jax.tree_util.tree_map(
            lambda w: dataclasses.replace(w, block=block) if is_dot(w) else w, params,
            is_leaf=is_dot)

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_quantize_") as tmp:
        folders = []
        if args.tiny:
            from official import Spec, build_checkpoint, build_codec, build_text_tokenizer
            tok = build_text_tokenizer(os.path.join(tmp, "_tok"))
            codec = os.path.join(tmp, "_codec")
            build_codec(codec)
            for i in range(args.tiny):
                spec = Spec(seed=20 + i, eos_scale=0.0, hidden=64, ffn=128, layers=3,
                            cp_hidden=48, cp_ffn=96)
                folders.append((f"tiny seed {20 + i}", build_checkpoint(
                    os.path.join(tmp, f"tiny{i}"), spec, codec_dir=codec, tokenizer=tok)))
        if args.folder:
            folders.append((f"full-size {args.size}", args.folder))
        for name, folder in folders:
            f32 = Qwen3TTS.from_pretrained(folder, jnp.float32, options=base)
            ref = run(f32, f32.params, base)
            heads32 = f32.params["code_predictor"]["lm_head"]   # the float format's heads
            del f32
            # one int8 load; each format's panels from its values, every other array shared
            new = dataclasses.replace(base, int8_activations="int8")
            chosen = [f for f in FORMATS if args.only in f[0]]
            tts = (Qwen3TTS.from_pretrained(folder, jnp.float32, quantize="int8", options=new)
                   if any(acts != "int4" for _, acts, _ in chosen) else None)
            is_dot = lambda w: isinstance(w, cpu_kernels.PackedInt8DotWeight)
            for fmt, acts, block in chosen:
                if acts == "int4":
                    del tts
                    tts = Qwen3TTS.from_pretrained(folder, jnp.float32, quantize="int4",
                                                   options=new)
                    params, options = tts.params, new
                elif acts == "float":
                    params = jax.tree_util.tree_map(
                        lambda w: cpu_kernels.pack(w.unpack(), "float") if is_dot(w) else w,
                        tts.params, is_leaf=is_dot)
                    params["code_predictor"] = {**params["code_predictor"], "lm_head": heads32}
                else:
                    params = with_block(tts.params, block)
                if acts != "int4":
                    options = dataclasses.replace(base, int8_activations=acts)
                logits, codes, waves = run(tts, params, options)
                rel = float(np.linalg.norm(logits - ref[0]) / np.linalg.norm(ref[0]))
                first, equal, snr = [], [], []
                for c, r, w, rw in zip(codes, ref[1], waves, ref[2]):
                    n = min(len(c), len(r))
                    diff = np.flatnonzero((c[:n] != r[:n]).any(axis=1))
                    first.append(int(diff[0]) if len(diff) else n)
                    equal.append(float((c[:n] == r[:n]).mean()) if n else 1.0)
                    m = min(len(w), len(rw))
                    err = float(np.sum((w[:m] - rw[:m]) ** 2.0))
                    snr.append(10 * np.log10(float(np.sum(rw[:m] ** 2.0)) / err) if err > 0
                               else float("inf"))
                frames = min(len(c) for c in ref[1])
                rows.append(f"| {name} | {fmt} | {rel:.4f} | {' / '.join(map(str, first))} "
                            f"of {frames} | {np.mean(equal):.3f} | "
                            f"{' / '.join(f'{x:.1f}' for x in snr)} |")
                print(rows[-1], flush=True)
                del params
            del tts
    lines = [f"## int8 and int4 formats against float32: logits, codes, audio ({len(folders)} random "
             f"checkpoints, {datetime.datetime.utcnow():%Y-%m-%d %H:%M} UTC)", "",
             f"`python benchmarks/bench_quantize.py --formats --tiny {args.tiny}"
             + (f" --folder {args.folder} --size {args.size}" if args.folder else "")
             + f" --frames {F}`: two prompts per checkpoint, greedy; figures per prompt are "
             "given as a / b.", "",
             "| checkpoint | format | first-step logits rel. error | first differing frame "
             "| codes equal | audio SNR (dB) |", "| --- | --- | --- | --- | --- | --- |", *rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.results:
        with open(args.results, "a") as f:
            f.write("\n" + text)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--folder")
    ap.add_argument("--formats", action="store_true",
                    help="the int8 formats of the CPU kernels against float32 (see above)")
    ap.add_argument("--tiny", type=int, default=0, help="--formats: tiny random checkpoints")
    ap.add_argument("--only", default="", help="--formats: the formats whose name has this")
    ap.add_argument("--size", default="0b6", choices=["tiny", "0b6", "1b7"])
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--frames", type=int, default=50)
    ap.add_argument("--results", default=os.path.join(HERE, "RESULTS.md"))
    args = ap.parse_args()
    if args.formats:
        return formats(args)
    if not args.folder:
        ap.error("--folder is required")
    if not os.path.exists(os.path.join(args.folder, "model.safetensors")):
        subprocess.run([sys.executable, os.path.join(HERE, "bench_scale.py"), "--size", args.size,
                        "--folder", args.folder, "--batches", "", "--official-batches", "",
                        "--results", os.devnull], check=True)
    sys.path.insert(0, ROOT)
    sys.path.insert(0, HERE)
    import jax
    import jax.numpy as jnp

    jax.config.update("jax_default_matmul_precision", "highest")
    from bench_generate import first_difference
    from bench_scale import DEFAULTS, LANGUAGE, SPEAKER, prompt_ids
    from qwen3_tts_jax import checkpoint, code_predictor, prompts, sampling, talker
    from qwen3_tts_jax import generate as gen
    from qwen3_tts_jax.buckets import ladder
    from qwen3_tts_jax.config import load_config
    from qwen3_tts_jax.options import Options

    cfg = load_config(args.folder)
    B = args.rows
    items = [prompts.build_prompt(cfg, prompt_ids(b), LANGUAGE, SPEAKER, None,
                                  non_streaming_mode=True) for b in range(B)]
    batch = prompts.batch_prompts(cfg, items, length=ladder(max(len(i) for i in items)),
                                  trailing_length=ladder(max(len(i.trailing) for i in items)))
    sp = lambda: sampling.SamplingParams.create(B, do_sample=False, temperature=1.0, top_k=50,
                                                top_p=1.0)
    settings = gen.Settings(sp(), sp(), jnp.full((B,), DEFAULTS["repetition_penalty"]),
                            jnp.full((B,), args.frames + 1, jnp.int32))
    keys = jnp.stack([jax.random.PRNGKey(b) for b in range(B)])

    def measure(dtype, quantize, ref=None):
        options = Options.for_backend(dtype=dtype)
        params = checkpoint.pack_for_inference(checkpoint.load_params(args.folder, cfg, dtype),
                                               consume=True, quantize=quantize, options=options)
        state, ctx = gen.prefill(params, cfg, batch, settings, keys, frames=args.frames + 1,
                                 options=options)
        code0 = np.asarray(state.logits_BxV, np.float64)[:, :cfg.talker.vocab_size]
        # the predictor's 15 steps of the first frame, teacher-forced: fed float32's code 0 and
        # float32's codes 1..15 (its sampler returns them), so each step's logits compare
        tokens = ref[3] if ref else state.token_B
        force = (lambda j, lg: ref[4][:, j]) if ref else (lambda j, lg: jnp.argmax(lg, -1))
        cp_codes, cp_logits = jax.jit(code_predictor.predict, static_argnums=(1, 4, 5))(
            params["code_predictor"], cfg.talker, state.hidden_BxD,
            talker.embed_codec(params["talker"], tokens), force, options)
        cp_logits = np.asarray(cp_logits, np.float64)
        out = gen.generate(params, cfg, batch, settings, keys, max_frames=args.frames,
                           options=options)
        codes = np.asarray(out.codes_BxFxG)
        return code0, cp_logits, codes, state.token_B, cp_codes

    ref = measure(jnp.float32, None)
    lines = [f"## int8 weights: closeness to float32 ({args.size}, random weights, "
             f"{datetime.datetime.utcnow():%Y-%m-%d %H:%M} UTC)", "",
             f"`python benchmarks/bench_quantize.py --folder {args.folder} --size {args.size} "
             f"--rows {B} --frames {args.frames}`: {B} prompts of 24 random text ids, greedy.", "",
             "| weights | code-0 logits error / spread | predictor logits error / spread "
             "| code 0 equal | codes 1-15 equal (teacher-forced) | greedy frames before the "
             "first difference (median, min-max) |", "| --- | --- | --- | --- | --- | --- |"]
    on_cpu = jax.default_backend() == "cpu"
    for name, dtype, quantize in (
            ("int8, float32" + (" (the CPU kernels' int8 x int8)" if on_cpu else ""),
             jnp.float32, "int8"),
            ("int8, bf16" + ("" if on_cpu else " (what `--quantize int8` runs here)"),
             jnp.bfloat16, "int8"),
            ("bf16", jnp.bfloat16, None)):
        got = measure(dtype, quantize, ref)
        errs = [np.abs(g - r).max() / r.std() for g, r in zip(got[:2], ref[:2])]
        same0 = int((got[0].argmax(-1) == ref[0].argmax(-1)).sum())
        same_cp = int((got[1].argmax(-1) == ref[1].argmax(-1)).sum())
        agree = []
        for b in range(B):
            d = first_difference(got[2][b], ref[2][b])
            agree.append(args.frames if d is None else int(d.split()[3]))
        lines.append(f"| {name} | {errs[0]:.4f} | {errs[1]:.4f} | {same0} of {B} | "
                     f"{same_cp} of {B * ref[1].shape[1]} | "
                     f"{int(np.median(agree))} ({min(agree)}-{max(agree)}) of {args.frames} |")
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    with open(args.results, "a") as f:
        f.write("\n" + text)


if __name__ == "__main__":
    main()
