"""A request that arrives while another runs alone in a one-row batch (batch buckets 1, 2, 4):
the running batch widens to a larger bucket and it starts at once, the batch narrowing again when
rows end and none wait (`BatchEngine(widen=True)`, the default), against waiting for a free row,
i.e. for the running request to end (`widen=False`), side by side in one process, warm, the
settings taking turns each round:

    python benchmarks/ab_widen.py --folder /tmp/ckpt0b6 [--quantize int4] [--codec-precision bf16]
        [--rounds 3] [--late 3] [--seed 0]

Each round as in ab_admit.py (one long request, then --late requests arriving at seeded random
times over the first 3/4 of its time alone; the engine warmed up as the server does, every batch
bucket; each measured run after an unmeasured one with the same arrivals). Reported per setting:
the late requests' time to first audio (median, max), the round's time and frames per second,
underruns, and how many late requests started in a running batch. `--compare codec-rows`: with
widening on both sides, the streaming codec decoding each call's due rows at the smallest batch
bucket that holds them (`StreamDecoder(row_buckets=)`, as the engine makes it) against all the
batch's rows. `--compare ramp`: (widening on) each stream's chunks growing from its first, none
longer than its audio out (`BatchEngine(chunk_ramp=True)`) against the fixed cadence.
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--folder", default="/tmp/ckpt0b6")
    ap.add_argument("--quantize", choices=["int8", "int4"], default=None)
    ap.add_argument("--codec-precision", choices=["float32", "bf16"], default="float32")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rows", type=int, default=4, help="the largest batch bucket")
    ap.add_argument("--long", type=int, default=60)
    ap.add_argument("--short", type=int, default=20)
    ap.add_argument("--late", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--compare", choices=["widen", "codec-rows", "ramp"], default="widen",
                    help="widen: widen=True against False; codec-rows: (widening on) the streaming "
                         "codec decoding a call's due rows at the smallest batch bucket that holds "
                         "them against all the batch's rows; ramp: chunk_ramp on against off")
    ap.add_argument("--results", default=None)
    args = ap.parse_args(argv)
    sys.path.insert(0, ROOT)
    sys.path.insert(0, HERE)
    from ab_admit import job_of, make_engine, one_round

    from qwen3_tts_jax import Qwen3TTS
    from qwen3_tts_jax.buckets import power_of_two

    load0 = os.getloadavg()
    tts = Qwen3TTS.from_pretrained(args.folder, quantize=args.quantize,
                                   codec_precision=args.codec_precision)
    buckets = tuple(sorted({power_of_two(n, 1) for n in range(1, args.rows + 1)}))
    kw = {"batch_buckets": buckets}
    make_engine(tts, 3, args.rows, **kw).warmup([job_of(tts, 0, args.long, None)])
    from qwen3_tts_jax.codec import streaming

    settings = {"widen": ["widen", "no widen"], "codec-rows": ["due rows", "all rows"],
                "ramp": ["ramp", "no ramp"]}[args.compare]
    init = streaming.StreamDecoder.__init__

    def every_row(self, *a, **k):      # the codec decoding all of a call's rows
        init(self, *a, **{**k, "row_buckets": ()})

    def one(setting, offsets):
        streaming.StreamDecoder.__init__ = every_row if setting == "all rows" else init
        try:
            return one_round(tts, 3, args.rows, args.long, args.short, offsets,
                             widen=setting != "no widen", chunk_ramp=setting == "ramp", **kw)
        finally:
            streaming.StreamDecoder.__init__ = init

    for w in settings:     # compiles (the widened shapes too); the long request alone sets the span
        one(w, [0.3] * args.late)
    alone = one(settings[0], [])[1]
    span = 0.75 * alone
    rng = random.Random(args.seed)
    res = {w: [] for w in settings}
    for _ in range(args.rounds):
        offsets = sorted(rng.uniform(0.1, span) for _ in range(args.late))
        for w in settings:
            one(w, offsets)
            res[w].append(one(w, offsets))
    lines = ["| setting | late requests' TTFA median / max ms | round s | frames/s | underruns (most "
             "in a round) | late requests started in a running batch |",
             "| --- | --- | --- | --- | --- | --- |"]
    for w in settings:
        ttfa = [t for out in res[w] for t in out[0]]
        lines.append(f"| {w} | {1000 * statistics.median(ttfa):.0f} / {1000 * max(ttfa):.0f} | "
                     f"{statistics.median(out[1] for out in res[w]):.2f} | "
                     f"{statistics.median(out[2] / out[1] for out in res[w]):.2f} | "
                     f"{max(out[3] for out in res[w])} | "
                     f"{sum(out[5] for out in res[w])} of {args.late * args.rounds} |")
        print(lines[-1], flush=True)
    from bench_generate import ab_report

    title = {"widen": "A running batch widened for waiting requests",
             "codec-rows": "The streaming codec on a call's due rows only",
             "ramp": "A stream's chunks growing from its first (chunk_ramp)"}[args.compare]
    ab_report(title, "ab_widen.py", argv, args, load0,
              f"{args.rounds} rounds, the settings in turn, each measured run after an unmeasured one; "
              f"one {args.long}-frame request, then {args.late} of {args.short} frames arriving "
              f"over {span:.1f} s; batch buckets {list(buckets)}, chunks of 3 then 12 frames, "
              f"admission steps of 3 frames", lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
