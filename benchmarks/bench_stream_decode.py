"""Streaming codec decode: the stateful `StreamDecoder` next to the windowed re-decode it replaced,
for fidelity to the offline audio and for speed.

    python benchmarks/bench_stream_decode.py [--frames 400] [--batch 1 4] [--codec FOLDER]

Streaming (the `generate_*_streaming` generators and the server) decodes each chunk of new frames
as it is generated. Two ways, measured side by side in one run on the same codec and codes:
- stateful (`codec.StreamDecoder`, what the code does now): the codec's state (convolution tails,
  the attention layers' last 71 frames of keys and values) is carried from chunk to chunk, with
  the official decode's restarts every 300 frames; a chunk costs its new frames only.
- windowed (the decode `codec.StreamDecoder` replaced): each chunk decoded after `--left-context`
  (72) frames of earlier codes, only the new samples kept; a 12-frame chunk decodes 84 frames.
Fidelity: max |streamed - offline| over the offline peak and the SNR against the offline audio
(`SpeechTokenizer.decode`: the official 300-frame chunks, 25 frames of left context), one stream
of `--frames` frames. Speed: `--batch` streams of `--frames` frames at once (the server decodes a
batch's rows together), first chunk 3 frames then `--chunk` frames, after a warm-up pass that
compiles every window; seconds of codec time per second of audio, and the ratio. The codec is the
released decoder size with random weights (`build_parity_codec`: audio peaking near 0.9) unless
--codec. float32 (the codec's dtype everywhere). Results are printed and appended to
benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def pieces(frames: int, first: int, chunk: int) -> list[tuple[int, int]]:
    out, start, n = [], 0, first
    while start < frames:
        out.append((start, min(start + n, frames)))
        start, n = out[-1][1], chunk
    return out


def windowed(codec, codes_BxTxQ, plan, left_context):
    """The old streaming decode: each piece after up to `left_context` frames of history, as one
    window (`chunk_size=None`), only the new samples kept; all rows in one batch."""
    from qwen3_tts_jax.codec import bucketed_decode

    d, out = codec.config.decoder, []
    for a, b in plan:
        c = max(0, a - left_context)
        wave = bucketed_decode(codec.params, d, codes_BxTxQ[:, c:b], chunk_size=None)
        out.append(wave[:, (a - c) * d.total_upsample:])
    return np.concatenate(out, axis=1)


def stateful(codec, codes_BxTxQ, plan):
    dec = codec.stream_decoder(batch=len(codes_BxTxQ))
    out = [np.stack(dec.push(list(codes_BxTxQ[:, a:b]))) for a, b in plan]
    return np.concatenate(out, axis=1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--codec", default=None, help="a speech_tokenizer folder (default: build one)")
    ap.add_argument("--frames", type=int, default=400)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--chunk", type=int, default=12)
    ap.add_argument("--first", type=int, default=3)
    ap.add_argument("--left-context", type=int, default=72)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--results", default=os.path.join(HERE, "RESULTS.md"))
    args = ap.parse_args()
    import jax

    from qwen3_tts_jax.codec import SpeechTokenizer

    if args.codec is None:
        import tempfile

        sys.path.insert(0, os.path.join(HERE, "..", "tests"))
        from test_codec_decoder import FULL_DECODER, build_parity_codec

        args.codec = tempfile.mkdtemp(prefix="codec-")
        build_parity_codec(args.codec, FULL_DECODER, frames=50)
    codec = SpeechTokenizer.from_pretrained(args.codec)
    d = codec.config.decoder
    rng = np.random.default_rng(args.seed)
    codes = rng.integers(0, d.codebook_size, (max(args.batch), args.frames, d.num_quantizers)
                         ).astype(np.int32)
    plan = pieces(args.frames, args.first, args.chunk)
    offline = codec.decode([codes[0]])[0][0]
    peak = np.abs(offline).max()

    def fidelity(s):
        snr = 10 * np.log10(np.sum(offline ** 2) / max(np.sum((s - offline) ** 2), 1e-30))
        return np.abs(s - offline).max() / peak, snr

    new_err, new_snr = fidelity(stateful(codec, codes[:1], plan)[0])
    old_err, old_snr = fidelity(windowed(codec, codes[:1], plan, args.left_context)[0])
    audio_s = args.frames * d.total_upsample / 24000
    lines = [f"## Streaming codec decode: stateful vs windowed ({args.frames} frames, "
             f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC)", "",
             f"`python benchmarks/bench_stream_decode.py --frames {args.frames} --batch "
             f"{' '.join(map(str, args.batch))}`: {platform.processor() or platform.machine()}, "
             f"{os.cpu_count()} cores, jax {jax.__version__} ({jax.default_backend()}); the "
             f"released decoder size, random weights, random codes (seed {args.seed}), float32; "
             f"chunks of {args.first} then {args.chunk} frames; windowed = each chunk after "
             f"{args.left_context} frames of earlier codes (the decode StreamDecoder replaced).", "",
             f"Fidelity (one stream; offline = `SpeechTokenizer.decode`, peak {peak:.3f}): "
             f"stateful max diff / peak {new_err:.1e}, SNR {new_snr:.0f} dB; windowed "
             f"{old_err:.1e}, {old_snr:.1f} dB.", "",
             "| streams | stateful: codec s per audio s | windowed: codec s per audio s | "
             "stateful speed-up |", "| --- | --- | --- | --- |"]
    for B in args.batch:
        x = codes[:B]
        times = {}
        for name, fn in (("stateful", lambda: stateful(codec, x, plan)),
                         ("windowed", lambda: windowed(codec, x, plan, args.left_context))):
            fn()                                   # compile every window
            t = time.perf_counter()
            fn()
            times[name] = (time.perf_counter() - t) / (B * audio_s)
        lines.append(f"| {B} | {times['stateful']:.3f} | {times['windowed']:.3f} | "
                     f"{times['windowed'] / times['stateful']:.1f}x |")
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    with open(args.results, "a") as f:
        f.write("\n" + text)


if __name__ == "__main__":
    main()
