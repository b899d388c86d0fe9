"""How far the streamed audio is from the offline audio past the streaming left context.

    python benchmarks/bench_stream_decode.py [--frames 600] [--codec FOLDER]

The streaming generators (`Qwen3TTS.generate_*_streaming`) and the server decode each chunk of
new frames after `left_context` frames of earlier codes (default 72, the codec pre-transformer's
attention window) and keep only the new samples; the offline path decodes the whole utterance
(`SpeechTokenizer.decode`: the official 300-frame chunks with 25 frames of left context). Within
the left context the two are the same computation; past it the decoder's convolutions and its
stacked attention layers reach further back than the context. This measures the difference on a
codec of the released decoder size over random codes (without --codec: built with the official
code and tests/test_codec_decoder.py `build_parity_codec`, random weights scaled so that the audio
peaks at ~0.9 before the clamp, as in bench_codec_decode.py): max |streamed - offline| over the offline peak, and the SNR of the streamed audio
against the offline one, for several left contexts, before and after the first `left_context`
frames. Results are printed and appended to benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def streamed(codec, codes, left_context, first=3, chunk=12):
    """The streaming path's decode: first `first` frames, then `chunk` at a time, each after up
    to `left_context` frames of history; only the new samples kept."""
    out, start, n = [], 0, first
    while start < len(codes):
        new = codes[start:start + n]
        context = codes[max(0, start - left_context):start]
        wav = codec.decode([np.concatenate([context, new])], chunk_size=None)[0][0]
        out.append(wav[len(context) * 1920:])
        start += len(new)
        n = chunk
    return np.concatenate(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--codec", default=None, help="a speech_tokenizer folder (default: build one)")
    ap.add_argument("--frames", type=int, default=600)
    ap.add_argument("--contexts", default="25,72,144")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--results", default=os.path.join(HERE, "RESULTS.md"))
    args = ap.parse_args()
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
    codes = rng.integers(0, d.codebook_size, (args.frames, d.num_quantizers)).astype(np.int32)
    offline = codec.decode([codes])[0][0]
    whole = codec.decode([codes], chunk_size=None)[0][0]
    peak = np.abs(offline).max()
    lines = [f"## Streamed vs offline audio past the left context ({args.frames} frames, "
             f"{datetime.datetime.utcnow():%Y-%m-%d %H:%M} UTC)", "",
             f"`python benchmarks/bench_stream_decode.py --frames {args.frames} --contexts "
             f"{args.contexts}`: the released decoder size, random weights "
             f"(`build_parity_codec`), random codes (seed {args.seed}), float32, CPU. Offline = "
             "`SpeechTokenizer.decode` (the official 300-frame chunks, 25 frames of left "
             "context); streamed = first chunk 3 frames, then 12, each after `left_context` "
             "frames of earlier codes.", "",
             f"Offline peak {peak:.3f}, rms {np.sqrt(np.mean(offline ** 2)):.3f}; whole-utterance "
             f"decode vs offline: max diff / peak {np.abs(whole - offline).max() / peak:.2e}.",
             "", "| left context | max diff / peak, frames < context | max diff / peak, frames "
             ">= context | SNR vs offline (dB) | SNR vs whole-utterance decode (dB) |",
             "| --- | --- | --- | --- | --- |"]
    for lc in (int(c) for c in args.contexts.split(",")):
        s = streamed(codec, codes, lc)
        assert s.shape == offline.shape, (s.shape, offline.shape)
        cut = min(lc, args.frames) * 1920
        early = np.abs(s[:cut] - offline[:cut]).max() / peak
        late = np.abs(s[cut:] - offline[cut:]).max() / peak if cut < len(s) else 0.0
        snr = lambda ref: 10 * np.log10(np.sum(ref ** 2) / max(np.sum((s - ref) ** 2), 1e-30))
        lines.append(f"| {lc} | {early:.2e} | {late:.2e} | {snr(offline):.1f} | "
                     f"{snr(whole):.1f} |")
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    with open(args.results, "a") as f:
        f.write("\n" + text)


if __name__ == "__main__":
    main()
