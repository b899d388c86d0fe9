"""End-to-end text ids -> codes -> waveform on this CPU: ours (JAX) and the official qwen-tts
(PyTorch) side by side in one run, full-size random weights (0.6B CustomVoice + the full speech
tokenizer), float32, batch 1, greedy.

    python benchmarks/bench_e2e.py [--frames 50] [--threads 2] [--repeats 1]

The checkpoint is benchmarks/bench_generate.py's (`build_checkpoint`: official classes, torch seed
0, its prompt of 24 random text ids spoken by "ryan" in English, non-streaming); its speech_tokenizer/
is the full-size codec of benchmarks/bench_encoders.py `build_full_codec` (tests/official.py
`build_codec` with full_configs.CODEC: `randomize_codec_` + an audible decoder). Each implementation
runs in its own subprocess (pinned to --threads CPUs as bench_generate does):
  official  `Qwen3TTSForConditionalGeneration.from_pretrained` (loads speech_tokenizer/ too);
            `model.generate(..., max_new_tokens=frames + 1, do_sample=False,
            subtalker_dosample=False)` then `model.speech_tokenizer.decode([{"audio_codes": c}])`
  ours      `prompts.build_prompt` + `batch_prompts` + `generate.generate(max_frames=frames)` then
            `SpeechTokenizer.decode`
One warm-up of the whole path, then the best of --repeats timed runs (warm). xRT = seconds of audio
/ wall seconds. When the codes are identical the waveforms are compared (max |diff| / peak).
Appends a dated section to benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

import bench_generate as bg  # noqa: E402  (prompt_ids, pin_threads, build_checkpoint, ...)

SR = 24000


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def best_of(run, repeats):
    run()                                  # warm-up (compilation, eager first calls)
    best = None
    for _ in range(repeats):
        out = run()
        if best is None or out["total_s"] < best["total_s"]:
            best = out
    return best


def role_build(args) -> dict:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import bench_encoders

    built = bg.build_checkpoint(args)
    t = time.perf_counter()
    bench_encoders.build_full_codec(os.path.join(args.folder, "speech_tokenizer"), seed=0)
    built["codec_build_s"] = time.perf_counter() - t
    return built


def role_official(args) -> dict:
    bg.pin_threads(args.threads)
    import torch
    from qwen_tts.core.models import Qwen3TTSForConditionalGeneration as Model

    torch.set_num_threads(args.threads)
    model = Model.from_pretrained(args.folder, dtype=torch.float32).eval()
    input_ids = [torch.tensor([bg.prompt_ids()])]

    def run():
        with torch.no_grad():
            t0 = time.perf_counter()
            codes, _ = model.generate(input_ids=input_ids, languages=[bg.LANGUAGE],
                                      speakers=[bg.SPEAKER], non_streaming_mode=True,
                                      max_new_tokens=args.frames + 1, do_sample=False,
                                      subtalker_dosample=False)
            t1 = time.perf_counter()
            wavs, sr = model.speech_tokenizer.decode([{"audio_codes": c} for c in codes])
            t2 = time.perf_counter()
        return {"codes": codes[0].numpy(), "wave": wavs[0], "sr": sr, "gen_s": t1 - t0,
                "dec_s": t2 - t1, "total_s": t2 - t0}

    out = best_of(run, args.repeats)
    out["version"] = torch.__version__
    return out


def role_ours(args) -> dict:
    bg.pin_threads(args.threads)
    import jax
    import jax.numpy as jnp

    from qwen3_tts_jax import checkpoint, prompts, sampling
    from qwen3_tts_jax import generate as gen
    from qwen3_tts_jax.codec import SpeechTokenizer
    from qwen3_tts_jax.config import load_config
    from qwen3_tts_jax.options import Options

    options = Options.for_backend(dtype=jnp.float32)
    cfg = load_config(args.folder)
    params = jax.block_until_ready(checkpoint.pack_for_inference(
        checkpoint.load_params(args.folder, cfg, jnp.float32), consume=True, options=options))
    tok = SpeechTokenizer.from_pretrained(os.path.join(args.folder, "speech_tokenizer"))
    keys = jnp.stack([jax.random.PRNGKey(0)])
    greedy = sampling.SamplingParams.create(1, do_sample=False, temperature=1.0, top_k=50,
                                            top_p=1.0)
    settings = gen.Settings(greedy, greedy, jnp.full((1,), 1.05, jnp.float32),
                            jnp.full((1,), args.frames + 1, jnp.int32))
    ids = bg.prompt_ids()

    def run():
        t0 = time.perf_counter()
        prompt = prompts.build_prompt(cfg, ids, bg.LANGUAGE, bg.SPEAKER, None,
                                      non_streaming_mode=True)
        batch = prompts.batch_prompts(cfg, [prompt], length=gen.bucket(len(prompt)),
                                      trailing_length=gen.bucket(len(prompt.trailing)))
        state = gen.generate(params, cfg, batch, settings, keys, max_frames=args.frames,
                             options=options)
        codes = np.asarray(state.codes_BxFxG[0])[:int(state.length_B[0])]
        t1 = time.perf_counter()
        wavs, sr = tok.decode(codes)
        t2 = time.perf_counter()
        return {"codes": codes, "wave": wavs[0], "sr": sr, "gen_s": t1 - t0, "dec_s": t2 - t1,
                "total_s": t2 - t0}

    out = best_of(run, args.repeats)
    out["version"] = jax.__version__
    return out


ROLES = {"build": role_build, "official": role_official, "ours": role_ours}


def child(role, args, workdir):
    out = os.path.join(workdir, f"{role}.npz")
    t = time.perf_counter()
    subprocess.run([sys.executable, os.path.abspath(__file__), "--role", role, "--folder",
                    args.folder, "--out", out, "--frames", str(args.frames), "--threads",
                    str(args.threads), "--repeats", str(args.repeats)], check=True)
    log(f"{role}: {time.perf_counter() - t:.0f} s")
    with np.load(out, allow_pickle=False) as z:
        return {k: (z[k].item() if z[k].ndim == 0 else z[k]) for k in z.files}


def report(args, built, off, ours, loads) -> str:
    diff = bg.first_difference(ours["codes"], off["codes"])
    if diff is None:
        w = np.abs(np.asarray(ours["wave"]) - np.asarray(off["wave"])).max()
        peak = np.abs(off["wave"]).max()
        waves = (f"codes identical ({len(off['codes'])} frames); waveforms: max |diff| "
                 f"{w:.2e}, peak {peak:.3f}, max |diff| / peak **{w / peak:.1e}**")
    else:
        waves = f"codes DIFFERENT ({diff}); waveforms not compared"
    now = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    rows = ["| implementation | frames | audio s | generate s | decode s | total s | xRT "
            "| ours/official (speed) |", "|" + " --- |" * 8]
    for name, r in (("official (torch)", off), ("ours (JAX)", ours)):
        audio = len(r["wave"]) / r["sr"]
        ratio = f"{off['total_s'] / r['total_s']:.2f}" if r is ours else ""
        rows.append(f"| {name} | {len(r['codes'])} | {audio:.2f} | {r['gen_s']:.2f} "
                    f"| {r['dec_s']:.2f} | {r['total_s']:.2f} | {audio / r['total_s']:.3f} "
                    f"| {ratio} |")
    return "\n".join([
        f"## End to end, ids -> codes -> waveform, 0b6 CustomVoice + full codec, CPU ({now})",
        "",
        f"`python benchmarks/bench_e2e.py --frames {args.frames} --threads {args.threads} "
        f"--repeats {args.repeats}`: full-size random weights ({built['params_m']:.0f}M params "
        f"talker side, + full speech tokenizer), float32, batch 1, greedy, "
        f"max_new_tokens={args.frames + 1}, {bg.TEXT_TOKENS} text tokens, non-streaming, speaker "
        f"{bg.SPEAKER}. Warm: one warm-up of the whole path, then best of {args.repeats}.",
        f"{bg.cpu_model()}, {os.cpu_count()} cores; {args.threads} threads; torch "
        f"{off['version']}, JAX {ours['version']}. Load average (1/5/15 min) at start "
        f"{loads[0]}, at end {loads[1]} (other jobs share the machine).",
        "",
        *rows,
        "",
        f"- {waves}.",
        "",
    ])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--results", default=os.path.join(HERE, "RESULTS.md"),
                    help="markdown file the section is appended to ('' to skip)")
    ap.add_argument("--role", choices=sorted(ROLES), help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.size, args.official_configs = "0b6", HERE

    if args.role:
        res = ROLES[args.role](args)
        np.savez(args.out, **res)
        return

    load = lambda: "/".join(f"{x:.2f}" for x in os.getloadavg())
    loads = [load()]
    with tempfile.TemporaryDirectory(prefix="bench_e2e_") as workdir:
        args.folder = os.path.join(workdir, "checkpoint")
        built = child("build", args, workdir)
        off = child("official", args, workdir)
        ours = child("ours", args, workdir)
    loads.append(load())
    section = report(args, built, off, ours, loads)
    print(section)
    if args.results:
        import bench_encoders  # noqa: F401  (append_results lives there; same append-only logic)
        bench_encoders.append_results(args.results, section)


if __name__ == "__main__":
    main()
