"""The whole utterance (text to 24 kHz samples, codec included) and the streaming time to first
audio for several weight formats of one checkpoint, loaded side by side in one process and timed
alternately (so that other load hits every format alike):

    python benchmarks/bench_whole_cpu.py --folder /tmp/ckpt0b6 [--formats int8,int4] [--runs 3]

  whole   frames/s of `generate_custom_voice` (greedy, --frames frames: a random-weight
          checkpoint never says EOS, so every call makes them), the codec decode included;
  TTFA    `generate_custom_voice_streaming` in the streaming text mode with a 1-frame first chunk.
Medians over --runs rounds after two warm-up calls per format. Formats: float32 (none), int8, int4,
each optionally with "+bf16": the codec decoder in bf16 (`codec_precision="bf16"`), e.g.
--formats int4,int4+bf16.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TEXT = "Hello there, this is a short sentence for the whole utterance."


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--folder", default="/tmp/ckpt0b6")
    ap.add_argument("--formats", default="int8,int4")
    ap.add_argument("--frames", type=int, default=40)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--weights-cache", default=None)
    args = ap.parse_args(argv)
    sys.path.insert(0, ROOT)
    from qwen3_tts_jax import Qwen3TTS

    load0 = os.getloadavg()[0]
    kw = dict(speaker="ryan", language="english", do_sample=False, subtalker_dosample=False,
              max_new_tokens=args.frames + 1)
    def load(f):
        weights, _, codec = f.partition("+")
        return Qwen3TTS.from_pretrained(args.folder,
                                        quantize=None if weights == "float32" else weights,
                                        weights_cache=args.weights_cache,
                                        codec_precision=codec or "float32")

    models = {f: load(f) for f in args.formats.split(",")}
    whole = {f: [] for f in models}
    ttfa = {f: [] for f in models}
    for tts in models.values():
        for _ in range(2):
            tts.generate_custom_voice(TEXT, **kw)
            g = tts.generate_custom_voice_streaming(TEXT, non_streaming_mode=False,
                                                    first_chunk_frames=1, **kw)
            next(g)
            g.close()
    for _ in range(args.runs):
        for f, tts in models.items():
            t = time.perf_counter()
            (wave,), _ = tts.generate_custom_voice(TEXT, **kw)
            whole[f].append(len(wave) / 1920 / (time.perf_counter() - t))
            t = time.perf_counter()
            g = tts.generate_custom_voice_streaming(TEXT, non_streaming_mode=False,
                                                    first_chunk_frames=1, **kw)
            next(g)
            ttfa[f].append(time.perf_counter() - t)
            g.close()
    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    print(f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC, commit {commit}, load average "
          f"{load0:.2f} -> {os.getloadavg()[0]:.2f}, {args.frames} frames, batch 1, greedy")
    print("| format | whole utterance frames/s (median; runs) | TTFA ms, streaming text mode |")
    print("| --- | --- | --- |")
    for f in models:
        print(f"| {f} | {statistics.median(whole[f]):.2f} ({', '.join(f'{x:.2f}' for x in whole[f])})"
              f" | {1000 * statistics.median(ttfa[f]):.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
