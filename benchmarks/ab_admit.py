"""When a request that arrives while a batch runs starts: within `admit_frames` frames (the frame
loop runs that many frames a call while the batch has a free row) against at the running chunk's
end (`admit_frames=0`), side by side in one process, warm, the settings taking turns each round:

    python benchmarks/ab_admit.py --folder /tmp/ckpt0b6 [--quantize int4] [--codec-precision bf16]
        [--admit 3,0] [--rounds 3] [--late 3] [--seed 0]

Each round: one long request (--long frames) starts an engine batch of --rows rows (first chunk 3
frames, then 12); --late more requests (--short frames each) arrive at seeded random times while
it runs (uniform over the long request's expected span). Reported per setting: the late
requests' time to first audio (median, max; from their submission), the whole round's time and
frames per second over all requests (the cost of the extra read-backs), underruns (as
`bench_server.playback`), and how many requests' audio equals the first setting's in the same
round (within 1e-4 of the peak): a row's arithmetic depends at the float-rounding level on the
frame it joins at (its cache slots), which flips near-tied greedy codes of random weights at full
size, and quantized activations (int8 / int4) turn such differences into flips sooner.

Arrival times decide the shapes a round meets (the codec windows of odd-sized chunks, the caches'
growth), and a shape met for the first time compiles during the round: the engine is warmed up
first as the server does (every codec window of a chunk), each measured run follows an unmeasured
one with the same arrivals (--no-rehearse: not), and the compilations that still fell in measured
runs are counted in the table.
"""
from __future__ import annotations

import argparse
import logging
import os
import random
import statistics
import sys
import threading
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SR = 24000
TEXTS = ["The quick brown fox jumps over the lazy dog, and then it runs far away into the woods.",
         "Hello there, how are you doing today?", "One two three four five six.",
         "A short one.", "Streaming speech should start at once."]


def make_engine(tts, admit, rows, **kw):
    from qwen3_tts_jax.engine import BatchEngine

    return BatchEngine(tts, **{"max_batch_size": rows, "batch_window": 0.0, "chunk_frames": 12,
                               "first_chunk_frames": 3, "batch_buckets": (rows,),
                               "admit_frames": admit, **kw})


def job_of(tts, i, frames, emit):
    from qwen3_tts_jax.engine import Job
    from qwen3_tts_jax.settings import GenerationSettings

    settings = GenerationSettings.merge(tts.generate_defaults, max_new_tokens=frames + 1,
                                        do_sample=False, subtalker_dosample=False)
    prompt = tts.custom_voice_prompts([TEXTS[i % len(TEXTS)]], "ryan", "english", None, False)[0]
    return Job(prompt, settings, emit=emit, seed=i)


CODEC_CALLS = [0]                # streaming codec calls (StreamDecoder.submit) so far


def count_codec_calls():
    from qwen3_tts_jax.codec import streaming

    submit = streaming.StreamDecoder.submit

    def counted(self, new):
        CODEC_CALLS[0] += 1
        return submit(self, new)

    streaming.StreamDecoder.submit = counted


def one_round(tts, admit, rows, long_frames, short_frames, offsets, **engine_kw):
    from bench_server import playback

    engine = make_engine(tts, admit, rows, **engine_kw)
    calls0 = CODEC_CALLS[0]
    n = 1 + len(offsets)
    sent, arrivals, waves = [None] * n, [[] for _ in range(n)], [[] for _ in range(n)]
    done = [threading.Event() for _ in range(n)]

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

    jobs = [job_of(tts, i, long_frames if i == 0 else short_frames, emit_of(i)) for i in range(n)]
    engine.start()
    t0 = time.perf_counter()

    def submit(i, at):
        time.sleep(max(0.0, t0 + at - time.perf_counter()))
        sent[i] = time.perf_counter()
        engine.submit(jobs[i])

    threads = [threading.Thread(target=submit, args=(i, at))
               for i, at in enumerate([0.0] + list(offsets))]
    for t in threads:
        t.start()
    try:
        assert all(d.wait(600) for d in done), "a request did not end"
    finally:
        for t in threads:
            t.join()
        engine.stop()
    total = time.perf_counter() - t0
    ttfa = [arrivals[i][0][0] - sent[i] for i in range(1, n)]
    under = sum(playback([(t - t0, k) for t, k in a], SR)["underruns"] for a in arrivals)
    frames = sum(sum(len(w) for w in ws) for ws in waves) // 1920
    return (ttfa, total, frames, under, [np.concatenate(w) for w in waves], engine.stats["joined"],
            CODEC_CALLS[0] - calls0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--folder", default="/tmp/ckpt0b6")
    ap.add_argument("--quantize", choices=["int8", "int4"], default=None)
    ap.add_argument("--codec-precision", choices=["float32", "bf16"], default="float32")
    ap.add_argument("--admit", default="3,0")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--long", type=int, default=60)
    ap.add_argument("--short", type=int, default=20)
    ap.add_argument("--late", type=int, default=3)
    ap.add_argument("--span", type=float, default=None,
                    help="seconds over which the late requests arrive (default: the first 3/4 "
                         "of the long request's time alone, measured warm)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rehearse", action=argparse.BooleanOptionalAction, default=True,
                    help="run each setting once unmeasured before its measured run, same arrivals")
    ap.add_argument("--results", default=None)
    args = ap.parse_args(argv)
    sys.path.insert(0, ROOT)
    sys.path.insert(0, HERE)
    import jax

    from qwen3_tts_jax import Qwen3TTS

    compiles = [0, 0.0, []]      # backend compilations seen, their seconds, the programs

    def on_event(event, secs, **_):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles[0] += 1
            compiles[1] += secs

    def on_log(record):          # jax_log_compiles' lines: the names kept, the lines dropped
        msg = record.getMessage()
        if msg.startswith("Finished XLA compilation of "):
            compiles[2].append(msg[len("Finished XLA compilation of "):].split(" in ")[0])
        return not msg.startswith(("Compiling ", "Finished "))

    jax.monitoring.register_event_duration_secs_listener(on_event)
    jax.config.update("jax_log_compiles", True)
    for name in ("jax._src.interpreters.pxla", "jax._src.pjit", "jax._src.dispatch"):
        logging.getLogger(name).addFilter(on_log)
    load0 = os.getloadavg()
    tts = Qwen3TTS.from_pretrained(args.folder, quantize=args.quantize,
                                   codec_precision=args.codec_precision)
    settings = [int(a) for a in args.admit.split(",")]
    rng = random.Random(args.seed)
    count_codec_calls()
    # as the server starts: its warm-up (every codec window a chunk can use, a refill)
    make_engine(tts, settings[0], args.rows).warmup([job_of(tts, 0, args.long, None)])
    for a in settings:     # compiles; then the long request alone, warm, sets the span
        one_round(tts, a, args.rows, args.long, args.short, [0.05] * args.late)
    alone = one_round(tts, settings[0], args.rows, args.long, args.short, [])[1]
    span = args.span or 0.75 * alone
    ref = None
    res = {a: [] for a in settings}
    same = {a: 0 for a in settings}
    compiled = {a: [0, 0.0, []] for a in settings}
    for r in range(args.rounds + 1):
        offsets = sorted(rng.uniform(0.1, span) for _ in range(args.late))
        for a in settings:
            if args.rehearse and r > 0:
                one_round(tts, a, args.rows, args.long, args.short, offsets)
            before = [compiles[0], compiles[1], len(compiles[2])]
            out = one_round(tts, a, args.rows, args.long, args.short, offsets)
            if r == 0:       # a warm-up of every setting (refills at new compute lengths)
                continue
            compiled[a][0] += compiles[0] - before[0]
            compiled[a][1] += compiles[1] - before[1]
            compiled[a][2] += compiles[2][before[2]:]
            if a == settings[0]:
                ref = out[4]
            same[a] += sum(x.shape == y.shape and np.allclose(x, y, atol=1e-4 * np.abs(y).max())
                           for x, y in zip(out[4], ref))
            res[a].append(out)
    lines = ["| admit_frames | late requests' TTFA median / max ms | round s | frames/s | "
             f"underruns (most in a round) | joined a running batch | audio as with "
             f"{settings[0]} | codec calls a round | compiled while measured |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for a in settings:
        ttfa = [t for out in res[a] for t in out[0]]
        total = statistics.median(out[1] for out in res[a])
        fps = statistics.median(out[2] / out[1] for out in res[a])
        late = (f"{1000 * statistics.median(ttfa):.0f} / {1000 * max(ttfa):.0f}" if ttfa
                else "-")
        lines.append(f"| {a} | {late} | "
                     f"{total:.2f} | {fps:.2f} | {max(out[3] for out in res[a])} | "
                     f"{sum(out[5] for out in res[a])} of {args.late * args.rounds} | "
                     f"{same[a]} of {(args.late + 1) * args.rounds} | "
                     f"{statistics.median(out[6] for out in res[a]):.0f} | "
                     f"{compiled[a][0]} ({compiled[a][1]:.1f} s"
                     f"{': ' + ', '.join(sorted(set(compiled[a][2]))) if compiled[a][2] else ''}) |")
        print(lines[-1], flush=True)
    from bench_generate import ab_report

    ab_report("A request arriving mid-chunk: admit_frames", "ab_admit.py", argv, args, load0,
              f"{args.rounds} rounds after a warm-up, the settings in turn"
              f"{', each measured run after an unmeasured one' if args.rehearse else ''}; "
              f"one {args.long}-frame request, then {args.late} of {args.short} frames arriving "
              f"over {span:.1f} s; batch of {args.rows} rows, chunks of 3 then 12 frames", lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
