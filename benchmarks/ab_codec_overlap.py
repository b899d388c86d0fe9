"""A streamed chunk's codec beside the next chunk's frames (`Options.codec_overlap`: "off",
"queue", "thread"), side by side in one process, warm, the modes taking turns each round:

    python benchmarks/ab_codec_overlap.py --folder /tmp/ckpt0b6 [--quantize int4]
        [--codec-precision bf16] [--modes off,queue,thread] [--rounds 5] [--frames 40]
        [--engine-rows 4] [--results benchmarks/RESULTS.md]
    python benchmarks/ab_codec_overlap.py --folder /tmp/ckpt06srv --build 0b6 --modes off,queue
        --frames 100 --engine-rows 8                                # gpu_session.sh overlap

  api     `generate_custom_voice_streaming` of one sentence, streaming text mode, greedy,
          --frames frames (no EOS on random weights: max_new_tokens = frames + 1), first chunk 1
          frame, then chunks of 12 and of 4: time to first audio, the whole utterance's time
          (text to every sample) and frames per second.
  engine  `engine.BatchEngine` (the server's path) with --engine-rows streamed requests
          submitted together (one cohort), first chunk 3 frames then 12: the time until every
          request ended, frames per second over all rows, the median time to first audio, and
          underruns (a chunk that arrives after the audio before it has finished playing, playback
          starting at the first chunk: `bench_server.underruns`).

The modes share one loaded model (the field is host-side: the same compiled programs). Every
mode's audio is checked equal to "off"'s. Prints a table (and appends it to --results if given).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import statistics
import sys
import threading
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TEXT = "The quick brown fox jumps over the lazy dog, and then it runs far away into the woods."
SR, UP = 24000, 1920


def with_mode(tts, mode):
    other = copy.copy(tts)
    other.options = dataclasses.replace(tts.options, codec_overlap=mode)
    return other


def api_run(tts, frames, chunk, first=1):
    kw = dict(speaker="ryan", language="english", do_sample=False, subtalker_dosample=False,
              max_new_tokens=frames + 1, non_streaming_mode=False)
    t0, ttfa, out = time.perf_counter(), None, []
    for w in tts.generate_custom_voice_streaming(TEXT, chunk_frames=chunk,
                                                 first_chunk_frames=first, **kw):
        ttfa = time.perf_counter() - t0 if ttfa is None else ttfa
        out.append(w)
    return time.perf_counter() - t0, ttfa, np.concatenate(out)


def engine_run(tts, rows, frames):
    from bench_server import playback
    from qwen3_tts_jax.engine import BatchEngine, Job
    from qwen3_tts_jax.settings import GenerationSettings

    settings = GenerationSettings.merge(tts.generate_defaults, max_new_tokens=frames + 1,
                                        do_sample=False, subtalker_dosample=False)
    engine = BatchEngine(tts, max_batch_size=rows, batch_window=0.05, chunk_frames=12,
                         first_chunk_frames=3)
    arrivals = [[] for _ in range(rows)]
    waves = [[] for _ in range(rows)]
    done = [threading.Event() for _ in range(rows)]

    def emit_of(i):
        def emit(x):
            if x is None or isinstance(x, BaseException):
                if isinstance(x, BaseException):
                    print(f"request {i} failed: {x!r}", file=sys.stderr)
                done[i].set()
            else:
                arrivals[i].append((time.perf_counter(), len(x)))
                waves[i].append(np.asarray(x))
        return emit

    texts = [TEXT, "Hello there, how are you doing today?", "One two three four five six.",
             "A short one."]
    jobs = [Job(tts.custom_voice_prompts([texts[i % len(texts)]], "ryan", "english", None,
                                         False)[0], settings, emit=emit_of(i), seed=i)
            for i in range(rows)]
    engine.start()
    t0 = time.perf_counter()
    for j in jobs:
        engine.submit(j)
    try:
        assert all(d.wait(600) for d in done), "a request did not end"
    finally:
        engine.stop()
    total = time.perf_counter() - t0
    ttfa = statistics.median(a[0][0] - t0 for a in arrivals)
    under = sum(playback([(t - t0, n) for t, n in a], SR)["underruns"] for a in arrivals)
    n = sum(sum(len(w) for w in ws) for ws in waves) // UP
    return total, ttfa, under, n, [np.concatenate(w) for w in waves]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--folder", default="/tmp/ckpt0b6")
    ap.add_argument("--quantize", choices=["int8", "int4"], default=None)
    ap.add_argument("--codec-precision", choices=["float32", "bf16"], default="float32")
    ap.add_argument("--modes", default="off,queue,thread")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--frames", type=int, default=40)
    ap.add_argument("--engine-rows", type=int, default=4, help="0: no engine part")
    ap.add_argument("--build", choices=["tiny", "0b6", "1b7"], default=None,
                    help="build a random-weight CustomVoice checkpoint of these shapes into "
                         "--folder first if it has none (bench_server.py's builder)")
    ap.add_argument("--results", default=None)
    args = ap.parse_args(argv)
    sys.path.insert(0, ROOT)
    sys.path.insert(0, HERE)

    if args.build and not os.path.exists(os.path.join(args.folder, "config.json")):
        from bench_server import build_checkpoint
        build_checkpoint(args.folder, args.build)

    from qwen3_tts_jax import Qwen3TTS

    load0 = os.getloadavg()
    tts = Qwen3TTS.from_pretrained(args.folder, quantize=args.quantize,
                                   codec_precision=args.codec_precision)
    modes = args.modes.split(",")
    models = {m: with_mode(tts, m) for m in modes}
    lines = ["| path | chunks (first, then) | mode | TTFA ms | whole s | frames/s | vs off |"
             + (" underruns |" if args.engine_rows else ""),
             "| --- | --- | --- | --- | --- | --- | --- |" + (" --- |" if args.engine_rows else "")]
    parts = [("api", 1, 12), ("api", 1, 4)] + ([("engine", 3, 12)] if args.engine_rows else [])
    for path, first, chunk in parts:
        res = {m: [] for m in modes}
        ref = None
        for r in range(args.rounds + 1):             # round 0 warms up (compiles) and checks
            for m in modes:
                if path == "api":
                    t, ttfa, wave = api_run(models[m], args.frames, chunk, first)
                    got, row = [wave], (t, ttfa, 0, args.frames)
                else:
                    t, ttfa, under, n, got = engine_run(models[m], args.engine_rows,
                                                        args.frames)
                    row = (t, ttfa, under, n)
                if r == 0:
                    ref = got if ref is None else ref
                    assert all(np.array_equal(a, b) for a, b in zip(got, ref)), \
                        f"{m}: audio differs from {modes[0]}'s"
                else:
                    res[m].append(row)
        base = statistics.median(x[0] for x in res[modes[0]])
        for m in modes:
            t = statistics.median(x[0] for x in res[m])
            ttfa = statistics.median(x[1] for x in res[m])
            n = res[m][0][3]
            line = (f"| {path}{f' x {args.engine_rows}' if path == 'engine' else ''} | "
                    f"{first}, {chunk} | {m} | {1000 * ttfa:.0f} | {t:.3f} | {n / t:.2f} | "
                    f"{base / t:.2f}x |")
            if args.engine_rows:
                line += f" {max(x[2] for x in res[m]) if path == 'engine' else '-'} |"
            lines.append(line)
            print(line, flush=True)
    from bench_generate import ab_report

    ab_report("The codec beside the next chunk's frames", "ab_codec_overlap.py", argv, args,
              load0,
              f"medians of {args.rounds} rounds, the modes in turn; audio equal in every mode; "
              f"underruns: the most in a round, over all requests", lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
