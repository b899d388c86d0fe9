"""A long text in one pass against the same text in segments (`segment_chars`: its segments as
rows of one batch), whole utterance (text to 24 kHz samples, codec included), one process,
alternating:

    python benchmarks/bench_segments.py --folder /tmp/ckpt0b6 [--quantize int8] [--frames 160]
                                        [--segments 4] [--runs 3]

A random-weight checkpoint never says EOS, so each call makes exactly its frames: the one pass
FRAMES frames, each of the SEGMENTS segments FRAMES / SEGMENTS, the same seconds of audio. The
figure is frames of audio per second of wall time (medians over --runs after one warm-up call of
each), and their ratio: what saying a long text as rows at once gains over one row. The folder is
built (bench_server.py's full-size 0.6B CustomVoice random weights) when it is missing.
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
SENTENCES = ["The morning train was late again, so everyone waited on the cold platform.",
             "A small dog sat beside its owner and watched the pigeons with great interest.",
             "When the train finally arrived, the doors opened and the crowd moved forward.",
             "By the time it left the station, the sun had risen over the quiet town.",
             "Nobody spoke much on the way, but the ride felt shorter than usual.",
             "At the last stop the dog jumped down first and ran toward the park.",
             "Its owner followed slowly, smiling at the bright and windy day.",
             "It was, after all, the first warm morning of the whole year."]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--folder", default="/tmp/ckpt0b6")
    ap.add_argument("--quantize", default=None, choices=(None, "int8", "int4"))
    ap.add_argument("--frames", type=int, default=160)
    ap.add_argument("--segments", type=int, default=4)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args(argv)
    sys.path.insert(0, ROOT)
    sys.path.insert(0, HERE)
    from qwen3_tts_jax import Qwen3TTS, segments

    if not os.path.isdir(args.folder):
        from bench_server import build_checkpoint

        build_checkpoint(args.folder, "0b6")
    text = " ".join(SENTENCES[:2 * args.segments])
    chars = -(-len(text) // args.segments) + 20          # two sentences a segment
    parts = segments.split(text, chars)
    assert len(parts) == args.segments, parts
    per = args.frames // args.segments
    tts = Qwen3TTS.from_pretrained(args.folder, quantize=args.quantize)
    kw = dict(speaker="ryan", language="english", do_sample=False, subtalker_dosample=False)
    calls = {"one pass": lambda: tts.generate_custom_voice(text, max_new_tokens=args.frames + 1,
                                                           **kw),
             f"{args.segments} segments": lambda: tts.generate_custom_voice(
                 text, segment_chars=chars, segment_pause=0.0, max_new_tokens=per + 1, **kw)}
    load0 = os.getloadavg()[0]
    rates = {name: [] for name in calls}
    for call in calls.values():
        call()                                           # compiles
    for _ in range(args.runs):
        for name, call in calls.items():
            t = time.perf_counter()
            (wave,), sr = call()
            rates[name].append(len(wave) / 1920 / (time.perf_counter() - t))
    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    print(f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC, commit {commit}, load average "
          f"{load0:.2f} -> {os.getloadavg()[0]:.2f}, weights {args.quantize or 'float32'}, "
          f"{len(text)} characters, {args.frames} frames of audio, greedy")
    print("| | frames of audio / s (median; runs) | x one pass |")
    print("| --- | --- | --- |")
    base = statistics.median(rates["one pass"])
    for name, r in rates.items():
        m = statistics.median(r)
        print(f"| {name} | {m:.2f} ({', '.join(f'{x:.2f}' for x in r)}) | {m / base:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
