"""Full-size speech tokenizer decoding on this CPU: ours (JAX) and the official qwen-tts (PyTorch) side by
side, random weights, float32, batch 1.

    python benchmarks/bench_codec_decode.py [--frames 50 200] [--parity-frames 50] [--repeats 3]

Builds the official codec with the released decoder sizes (benchmarks/full_configs.py CODEC
decoder_config; the encoder is the tests' tiny one, decoding never touches it) in a temporary folder,
with every decoder tensor re-drawn by tests/test_codec_decoder.py `randomize_for_parity_` (the
official init gives near-silent audio, rms ~1e-8, against which a relative comparison means nothing).

Parity: every stage of the official `Qwen3TTSTokenizerV2Decoder.forward` (forward hooks) against our
`decode_stages` on --parity-frames random frames: max |diff| / peak |official|.

Timing, per frame count (the full public path on both sides: `Qwen3TTSTokenizer.decode` and
`SpeechTokenizer.decode`, both with the official 300-frame chunking):
  first s     the first call (ours: includes XLA compilation of the frame bucket's program)
  warm s      median of --repeats further calls
  compile s   ours: first - warm
  audio s/s   seconds of 24 kHz audio per second of warm wall time (1920 samples per frame)
The machine is shared: the load average before and after is recorded with the figures.

Appends a dated section to benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_default_matmul_precision", "float32")

from test_codec_decoder import (FULL_DECODER, build_parity_codec, jit_stages,  # noqa: E402
                                official_stages, random_codes)

from qwen3_tts_jax.codec import SpeechTokenizer  # noqa: E402

SAMPLES_PER_FRAME, SAMPLE_RATE = 1920, 24000


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in
                  subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
                  if line.startswith("Model name")), platform.processor())
    return f"{model}, {os.cpu_count()} CPUs"


def versions() -> str:
    import importlib.metadata as md

    names = ["jax", "jaxlib", "numpy", "torch", "transformers", "qwen-tts"]
    return ", ".join(f"{n} {md.version(n)}" for n in names)


def timed(fn, repeats):
    t = time.perf_counter()
    out = fn()
    first = time.perf_counter() - t
    warm = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        warm.append(time.perf_counter() - t)
    return out, first, float(np.median(warm))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, nargs="+", default=[50, 200])
    ap.add_argument("--parity-frames", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--results", default=os.path.join(HERE, "RESULTS.md"))
    args = ap.parse_args()

    import torch
    from qwen_tts import Qwen3TTSTokenizer

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as folder:
        t = time.perf_counter()
        codec = build_parity_codec(folder, FULL_DECODER, frames=args.parity_frames)
        log(f"built the full-size official codec in {time.perf_counter() - t:.1f} s")
        t = time.perf_counter()
        ours = SpeechTokenizer.from_pretrained(folder)
        load_s = time.perf_counter() - t
        official = Qwen3TTSTokenizer.from_pretrained(folder)

        codes = random_codes(np.random.default_rng(0), args.parity_frames, batch=1)
        ref = official_stages(codec.decoder, codes)
        mine = jit_stages(ours.params, ours.config.decoder, codes)
        parity = {k: float(np.abs(np.asarray(mine[k]) - ref[k]).max() / np.abs(ref[k]).max())
                  for k in ref}
        rms = float(np.sqrt(np.mean(ref["wave"] ** 2)))
        for k, v in parity.items():
            log(f"parity {k:16s} {v:.2e}")

        rows = []
        for n in args.frames:
            c = random_codes(np.random.default_rng(n), n)
            ref_w, o_first, o_warm = timed(
                lambda: official.decode({"audio_codes": torch.from_numpy(c)})[0][0], args.repeats)
            our_w, j_first, j_warm = timed(lambda: ours.decode(c)[0][0], args.repeats)
            diff = float(np.abs(our_w - ref_w).max() / np.abs(ref_w).max())
            audio = n * SAMPLES_PER_FRAME / SAMPLE_RATE
            rows.append((n, audio, o_first, o_warm, j_first, j_warm, diff))
            log(f"{n} frames: official {o_first:.2f} / {o_warm:.2f} s, ours {j_first:.2f} / "
                f"{j_warm:.2f} s, wave diff/peak {diff:.1e}")
    load_after = os.getloadavg()

    now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    lines = [
        f"\n## Speech tokenizer decode, full size, CPU ({now})\n",
        "`python benchmarks/bench_codec_decode.py "
        f"--frames {' '.join(map(str, args.frames))} --parity-frames {args.parity_frames} "
        f"--repeats {args.repeats}`: released decoder sizes (114.3 M params), random weights "
        "(`randomize_for_parity_`), float32, batch 1, the public decode path on both sides "
        "(official `Qwen3TTSTokenizer.decode`, ours `SpeechTokenizer.decode`).\n",
        f"- machine: {machine()}; load average {load_before[0]:.1f} before, "
        f"{load_after[0]:.1f} after (shared machine: other jobs ran too)",
        f"- versions: {versions()}; torch threads {torch.get_num_threads()}",
        f"- our load of model.safetensors (convert + check): {load_s:.1f} s\n",
        f"Parity on {args.parity_frames} frames (reference waveform rms {rms:.3f}), "
        "max |ours - official| / max |official| per stage:\n",
        "| stage | rel. diff |", "| --- | --- |",
        *(f"| {k} | {v:.1e} |" for k, v in parity.items()),
        "",
        "| frames | audio s | official first s | official warm s | official audio s/s "
        "| ours first s | ours warm s | ours compile s | ours audio s/s | wave diff / peak |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        *(f"| {n} | {a:.1f} | {of:.2f} | {ow:.2f} | {a / ow:.2f} | {jf:.2f} | {jw:.2f} "
          f"| {jf - jw:.1f} | {a / jw:.2f} | {d:.1e} |" for n, a, of, ow, jf, jw, d in rows),
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    new = not os.path.exists(args.results)
    with open(args.results, "a") as f:
        if new:
            f.write("# Benchmark results\n")
        f.write(text)


if __name__ == "__main__":
    main()
