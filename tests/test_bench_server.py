"""benchmarks/bench_server.py --poisson (open-loop load on the server): the playback/underrun rule
on hand-made arrivals, the seeded Poisson schedule and its sentences, the open-loop sender (a slow
response does not delay the next send), and one short run against the tiny server (slow)."""
import json
import os
import sys
import threading
import time

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "benchmarks"))

import bench_server as bs  # noqa: E402

SECOND = bs.BYTES_PER_SECOND          # bytes of one second of pcm


def test_playback_underruns_and_stall():
    play = bs.playback
    assert play([]) == {"underruns": 0, "stall": 0.0}
    assert play([(0.3, SECOND)]) == {"underruns": 0, "stall": 0.0}
    # each piece before the audio before it has played (from the first piece at 0.2 s)
    assert play([(0.2, SECOND), (0.7, SECOND), (2.1, SECOND // 2)])["underruns"] == 0
    # exactly at the boundary (1.0 s of audio from 0.0): in time; a hair later: an underrun
    assert play([(0.0, SECOND), (1.0, SECOND)]) == {"underruns": 0, "stall": 0.0}
    late = play([(0.0, SECOND), (1.0 + 1e-6, SECOND)])
    assert late["underruns"] == 1 and abs(late["stall"] - 1e-6) < 1e-9
    # a stall moves playback: after waiting 0.5 s for piece 1 (0.5 s of audio, played 1.5-2.0),
    # piece 2 at 2.0 is in time, piece 3 at 3.0 waits again (its audio was due at 2.25)
    r = play([(0.0, SECOND), (1.5, SECOND // 2), (2.0, SECOND // 4), (3.0, SECOND)])
    assert r["underruns"] == 2 and abs(r["stall"] - (0.5 + 0.75)) < 1e-9
    # the rate of the audio counts: at half the bytes per second each piece lasts twice as long
    assert play([(0.0, SECOND), (1.5, SECOND)], bytes_per_second=SECOND / 2)["underruns"] == 0


def test_arrivals_seeded_and_at_the_rate():
    a, b = bs.arrival_times(20, 60, seed=3), bs.arrival_times(20, 60, seed=3)
    assert np.array_equal(a, b) and not np.array_equal(a, bs.arrival_times(20, 60, seed=4))
    assert np.all(np.diff(a) > 0) and a[0] >= 0 and a[-1] < 60
    # many draws: the mean rate within 2 % (20 x 2000 s: 40,000 arrivals, sd 0.5 %), gaps
    # exponential (sd = mean) and counts per second Poisson (variance = mean)
    times = bs.arrival_times(20, 2000, seed=0)
    assert abs(len(times) / 2000 - 20) < 0.4
    gaps = np.diff(times)
    assert abs(gaps.std() / gaps.mean() - 1) < 0.05
    counts = np.bincount(times.astype(int), minlength=2000)
    assert abs(counts.var() / counts.mean() - 1) < 0.1
    # low rates and short runs draw enough too
    assert abs(np.mean([len(bs.arrival_times(0.5, 4, seed=s)) for s in range(2000)]) - 2) < 0.1


def test_schedule_sentences_voices_and_frames(tmp_path):
    from tokenizers import Tokenizer

    from qwen3_tts_jax import demo

    sched = bs.poisson_schedule(10, 60, seed=1)
    assert sched == bs.poisson_schedule(10, 60, seed=1)
    assert [r["at"] for r in sched] == list(bs.arrival_times(10, 60, seed=1))
    assert {r["voice"] for r in sched} == set(bs.SPEAKERS)            # mixed preset voices
    assert {r["words"] for r in sched} == set(range(5, 16))
    assert bs.tokens_for(5) == 26 and bs.tokens_for(15) == 76       # 5 frames a word, + 1
    demo._tokenizer(str(tmp_path))
    tok = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    for r in sched:
        words = r["text"][:-1].split()
        assert len(words) == r["words"] and r["text"].endswith(".")
        assert r["max_new_tokens"] == 5 * r["words"] + 1
        # one token a word and the full stop: every prompt in one bucket (see WORDS)
        assert len(tok.encode(r["text"]).ids) == r["words"] + 1, r["text"]


def test_open_loop_sends_on_time_whatever_is_in_flight():
    times = [0.05 * i for i in range(20)]          # 20 requests over 1 s, each taking 0.6 s
    began, in_flight, most = {}, [0], [0]
    lock = threading.Lock()

    def send(i):
        with lock:
            began[i] = time.perf_counter()
            in_flight[0] += 1
            most[0] = max(most[0], in_flight[0])
        time.sleep(0.6)
        with lock:
            in_flight[0] -= 1
        if i == 7:
            raise ValueError("broken")
        return {"status": 200, "i": i}

    t = time.perf_counter()
    results, lags, start = bs.open_loop(times, send)
    assert start >= t and time.perf_counter() - start < 1.0 + 0.6 + 0.5
    assert [r.get("i") for r in results] == [i if i != 7 else None for i in range(20)]
    assert results[7]["status"] == "ValueError: broken"
    # each send began at its time (a closed loop would have begun the last at 11.4 s)
    for i, at in enumerate(times):
        assert -0.001 < began[i] - (start + at) < 0.1, (i, began[i] - start, at)
        assert abs(lags[i] - (began[i] - (start + at))) < 0.05
    assert max(lags) < 0.1 and most[0] >= 10

    # a saturated sender shows: 1000 arrivals at once start one after another, and each lag is
    # how late its send began
    began.clear()
    _, lags, start = bs.open_loop([0.0] * 1000, lambda i: began.__setitem__(i, time.perf_counter()))
    assert max(lags) > 0.01
    assert all(abs(lags[i] - (began[i] - start)) < 0.005 for i in range(1000))


def test_bucket_quantile_is_the_bound_of_the_bucket_it_falls_in():
    """Percentiles from two /metrics scrapes' cumulative buckets: only the requests between
    them, the speech route only, the smallest bound holding q % of them."""
    def scrape(counts, route="speech"):
        return {("h_bucket", (("le", str(le)), ("route", route))): float(n)
                for le, n in counts.items()}
    before = scrape({0.01: 5, 0.05: 5, 0.1: 5, float("inf"): 5})
    before.update(scrape({0.01: 0, 0.05: 0, 0.1: 0, float("inf"): 50}, route="session"))
    after = scrape({0.01: 6, 0.05: 15, 0.1: 24, float("inf"): 25})    # 1, 9, 9, 1 new
    after.update(scrape({0.01: 90, 0.05: 90, 0.1: 90, float("inf"): 90}, route="session"))
    assert bs.bucket_quantile(before, after, "h", 5) == 10
    assert bs.bucket_quantile(before, after, "h", 50) == 50
    assert bs.bucket_quantile(before, after, "h", 95) == 100
    assert bs.bucket_quantile(before, after, "h", 99) == float("inf")
    assert np.isnan(bs.bucket_quantile(after, after, "h", 50))


@pytest.mark.slow
def test_poisson_run_against_the_tiny_server(tmp_path):
    """The whole command at a low rate for 4 s (the tiny model on the CPU): every request
    streamed audio, the figures add up, and the JSON has every request's pieces. Slow: with a
    cold compilation cache the server compiles for a minute or more on two cores."""
    out = tmp_path / "poisson.json"
    rc = bs.main(["--size", "tiny", "--poisson", "1.5", "--duration", "4", "--seed", "2",
                  "--warmup-s", "0", "--max-batch-size", "4", "--no-append", "--json", str(out),
                  "--results", str(tmp_path / "RESULTS.md")])
    assert rc == 0 and not (tmp_path / "RESULTS.md").exists()
    data = json.loads(out.read_text())
    (run,) = data["runs"]
    sched = bs.poisson_schedule(1.5, 4, seed=2)
    assert run["rate"] == 1.5 and run["requests"] == len(sched) == len(run["per_request"])
    assert run["ok"] == run["requests"] and run["failed"] == run["timeouts"] == 0
    for r, s in zip(run["per_request"], sched):
        assert r["status"] == 200 and abs(r["at"] - s["at"]) < 1e-3
        frames = s["max_new_tokens"] - 1
        audio = sum(n for _, n in r["arrivals"]) / bs.BYTES_PER_SECOND
        assert abs(audio - frames / bs.FRAME_RATE) < 0.01            # all the audio came
        assert r["ttfa"] == r["arrivals"][0][0]
        assert r["lag"] < 0.5
    t = run["ttfa_ms"]
    assert 0 < t["50"] <= t["95"] <= t["99"] <= t["max"]
    assert run["underrun_chunks"] >= run["underrun_requests"] >= 0
    assert sum(int(k) * v for k, v in run["batch_sizes"].items()) + run["joined"] == run["requests"]
    # the server's own first audio (GET /metrics) is no later than the client's, request by
    # request, so its bucket-bound percentile is at most the client's in the same buckets
    from qwen3_tts_jax.server.metrics import LATENCY_BUCKETS
    client = sorted(r["ttfa"] for r in run["per_request"])
    for q in ("50", "95"):
        bound = next(b for b in LATENCY_BUCKETS + (float("inf"),)
                     if sum(x <= b for x in client) >= int(q) / 100 * len(client))
        assert 0 < run["server_ttfa_ms"][q] <= 1000 * bound
        assert 0 < run["server_queue_ms"][q] <= run["server_ttfa_ms"][q]
