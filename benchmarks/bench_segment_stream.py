"""Cutting text that arrives in pieces into segments: `segments.Stream` (keeps the pieces found
and the packing of complete ones, so a push costs the work of its own text) against re-splitting
all the text received at each piece (`segments.split` of the text so far: the simple way, which
gives the same segments), one process, alternating. Pure Python on the host: no model.

    python benchmarks/bench_segment_stream.py [--chars 4096] [--piece 1] [--runs 3]

Each case is a text of --chars characters pushed --piece characters at a time (a server's
session gets one message per LLM token or less): ordinary English sentences; a worst case for
the re-split, one sentence of one-letter words; Chinese without punctuation (cut every
segment_chars characters); clauses without a sentence end. The figure is seconds for the whole
text (median of --runs), at segment_chars 50, 600 and 4096 (one segment: nothing is ever cut, the
open segment is the whole text).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from qwen3_tts_jax import segments  # noqa: E402

ENGLISH = "The quick brown fox jumps over the lazy dog, again and again. It was late. "


def cases(n: int) -> dict[str, str]:
    return {"english": (ENGLISH * (n // len(ENGLISH) + 1))[:n], "one-letter words": "a " * (n // 2),
            "chinese": "我" * n, "clauses": ("ab, " * n)[:n]}


def stream(text: str, limit: int, piece: int) -> list[str]:
    s, out = segments.Stream(limit), {}
    for i in range(0, len(text), piece):
        for j, t, _ in s.push(text[i:i + piece]):
            out[j] = out.get(j, "") + t
    for j, t, _ in s.push("", final=True):
        out[j] = out.get(j, "") + t
    return [t for _, t in sorted(out.items()) if t]


def resplit(text: str, limit: int, piece: int) -> list[str]:
    parts = []
    for i in range(0, len(text), piece):
        parts = segments.split(text[:i + piece], limit)   # what is certain is found the same way
    return segments.split(text, limit) if len(text) else parts


def timed(fn, *args) -> tuple[float, list[str]]:
    t = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t, out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--chars", type=int, default=4096)
    ap.add_argument("--piece", type=int, default=1)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args(argv)
    print("| text | segment_chars | Stream (s) | re-split (s) | ratio |\n| --- | --- | --- | --- | --- |")
    for name, text in cases(args.chars).items():
        for limit in (50, 600, 4096):
            a, b = [], []
            for _ in range(args.runs):
                ta, sa = timed(stream, text, limit, args.piece)
                tb, sb = timed(resplit, text, limit, args.piece)
                assert sa == sb == segments.split(text, limit), (name, limit)
                a.append(ta)
                b.append(tb)
            ma, mb = statistics.median(a), statistics.median(b)
            print(f"| {name} | {limit} | {ma:.3f} | {mb:.3f} | {mb / ma:.1f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
