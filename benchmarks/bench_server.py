"""The HTTP server under load: time to first audio and streaming speed at batch 1, then throughput
and latency percentiles with 1, 4 and 16 concurrent clients. One command:

    python benchmarks/bench_server.py                      # tiny random-weight model (seconds)
    python benchmarks/bench_server.py --size 0b6           # full-size 0.6B shapes, random weights
    python benchmarks/bench_server.py --max-new-tokens 16 31 61 121 --continuous both
                                       # mixed lengths, continuous batching on and off
    python benchmarks/bench_server.py --faults --duration 120 --clients 4
                                       # a soak: good, bad and dropped traffic (`soak`)
    python benchmarks/bench_server.py --poisson 10 20 40 --duration 60 --size 1b7
                                       # open-loop Poisson arrivals (`poisson`, below)

The checkpoint has random weights (no download): `--size tiny` is the `--random-weights` demo
checkpoint; `--size 0b6|1b7` gives the released CustomVoice shapes (talker, code predictor, codec
decoder; benchmarks/full_configs.py) with the demo's small tokenizer. Random weights almost
never sample EOS, so every request generates exactly `--max-new-tokens` - 1 frames: the work per
request is fixed and the figures compare across concurrency levels.

The server is `qwen3-tts-jax serve` in a subprocess on 127.0.0.1 (a free port; stopped at the end);
the clients are threads in this process, each sending its requests one after another with
`response_format: pcm` (streamed) and reading the body as it arrives. All traffic is local, the
number of requests is fixed and every request has a timeout.

  TTFA         time from sending the request to the first audio bytes
  xRT          seconds of audio per second of wall time (per request at batch 1; for the whole
               run under load: audio of all requests / wall time = throughput)
  stall        playing each stream from its first byte, the total time playback would wait for
               audio that had not arrived yet (0 = real time after the first chunk)
  batches      how many batches of each size the server formed, and how many requests started
               in a running batch's free row (continuous batching; from its /health statistics)

Before measuring, each concurrency level runs every length once per client, twice over, which
compiles the shapes (batch buckets are the concurrency levels; requests that start in a running
batch reach their own cache sizes). Results are appended to
benchmarks/RESULTS.md.

--poisson RATE [RATE ...]: OPEN-loop load, one run of `--duration` seconds (default 60) per rate
(requests/s). Arrival times are drawn up front (exponential gaps, `--seed`) and each request is
sent at its time from a thread of its own, however many are in flight; how late each send began
is recorded (max send lag: a saturated client shows there). A request is a sentence of 5-15 words
(`sentence`: "Hello" and words that are one token each, so every prompt is in one prompt bucket)
in a random preset voice, streamed pcm, with max_new_tokens = 5 x words + 1 (`tokens_for`: random
weights never sample EOS, so it runs the frames a voice at 2.5 words/s would speak). The server
runs continuous batching with one batch bucket of `--max-batch-size` rows (64; 8 on the CPU): a
running batch takes newcomers into its free rows only, and its size is fixed when it forms.
Per request: send time and lag, TTFA, each piece's arrival time and bytes, status (ok; timeout:
past `--timeout`, default 30 s, or the server's 504; failed: the rest, e.g. 429 queue full).

  underrun     a piece that arrives after the audio before it has finished playing (playback
               from the first piece; the player waits and plays on from the late piece: `playback`)
  completed/s  ok requests / wall (from the start of the schedule to the last request's end)
  server:      the server's own side, from its GET /metrics histograms over the run: submitted
               -> first audio out of the engine, and submitted -> started in a batch; percentiles
               as the bound of the bucket they fall in (10, 20, 30, 50, 75, 100, 150 ms, ...)

Warm-up, not measured: the closed-loop pattern above with the shortest and the longest sentence,
then rounds of `--warmup-s` seconds (10) of open-loop traffic at the highest rate until one has no
first audio later than 1 s (a compile; at most 3 rounds). `--json PATH` writes the figures and
every request's pieces; SIGTERM reports the rates done.
"""
from __future__ import annotations

import argparse
import datetime
import http.client
import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
FRAME_RATE = 12.5
BYTES_PER_SECOND = 24000 * 2          # pcm: s16le mono 24 kHz
TEXTS = ["Hello there, this is a test of the server.", "The quick brown fox jumps over it.",
         "Streaming speech, one chunk at a time.", "Numbers like 42 are read aloud too."]
SPEAKERS = ["ryan", "vivian", "serena", "aiden"]


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------
# Checkpoints
# ------------------------------------------------------------------------------------------------

def build_checkpoint(folder: str, size: str) -> str:
    """The demo checkpoint; for 0b6/1b7 its config and weights are replaced by the released
    CustomVoice shapes (random float32 weights; the demo's tokenizer and special ids stay)."""
    from qwen3_tts_jax import checkpoint, demo

    demo.build(folder)
    if size == "tiny":
        return folder
    from safetensors.numpy import save_file

    from qwen3_tts_jax.codec import decoder as codec_decoder
    from qwen3_tts_jax.codec.config import parse_config as parse_codec_config
    from qwen3_tts_jax.config import parse_config

    sys.path.insert(0, HERE)
    from full_configs import CODEC, talker

    rng = np.random.default_rng(0)

    def weights(shapes: dict, scale) -> dict:
        out = {}
        for k, shape in shapes.items():
            if len(shape) == 1 and ("norm" in k or k.endswith("cluster_usage")):
                out[k] = np.ones(shape, np.float32)
            elif k.endswith(("scale", "gamma", ".alpha", ".beta")) and len(shape) == 1:
                out[k] = np.full(shape, 0.01 if not k.endswith((".alpha", ".beta")) else 0.1,
                                 np.float32)
            else:
                out[k] = (rng.standard_normal(shape, np.float32) * scale(k, shape)).astype(
                    np.float32)
        return out

    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    full = talker(size, "custom_voice")
    text_vocab = config["talker_config"]["text_vocab_size"]
    config["talker_config"] = dict(full, text_vocab_size=max(text_vocab, 151936))
    config["speaker_encoder_config"] = {"enc_dim": full["hidden_size"], "sample_rate": 24000}
    config["tts_model_size"] = size
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    shapes = checkpoint.expected_shapes(parse_config(config))
    save_file(weights(shapes, lambda k, s: 0.02), os.path.join(folder, "model.safetensors"))

    sub = os.path.join(folder, "speech_tokenizer")
    with open(os.path.join(sub, "config.json")) as f:
        codec = json.load(f)
    codec["decoder_config"] = dict(CODEC["decoder_config"])
    with open(os.path.join(sub, "config.json"), "w") as f:
        json.dump(codec, f, indent=2)
    dec_shapes = codec_decoder.expected_shapes(parse_codec_config(codec).decoder)
    fan_in = lambda k, s: 1.0 if k.endswith("embedding_sum") else 1 / np.sqrt(
        max(int(np.prod(s[1:])), 1))
    save_file(weights(dec_shapes, fan_in), os.path.join(sub, "model.safetensors"))
    return folder


# ------------------------------------------------------------------------------------------------
# Server and clients
# ------------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, folder: str, port: int, continuous: bool = True, max_batch: int = 0,
                 buckets: list[int] | None = None, max_new_tokens: int = 0,
                 min_prompt_bucket: int = 48) -> subprocess.Popen:
    """`serve` on `port`; the batch size, buckets and token cap default to the closed-loop
    levels' (`--clients`, `--max-new-tokens`)."""
    max_batch = max_batch or max(args.clients)
    buckets = ",".join(str(c) for c in sorted(set(buckets or args.clients)))
    cmd = [sys.executable, "-m", "qwen3_tts_jax.cli", "serve", "--model", folder,
           "--port", str(port), "--quiet", "--max-new-tokens",
           str(max_new_tokens or max(args.lengths)),
           "--max-batch-size", str(max_batch), "--batch-buckets", buckets,
           "--min-prompt-bucket", str(min_prompt_bucket),
           "--batch-window-ms", str(args.batch_window_ms),
           "--max-queue", str(4 * max_batch), "--voices-dir",
           os.path.join(args.workdir, "voices")]
    if args.dtype:
        cmd += ["--dtype", args.dtype]
    if not continuous:
        cmd += ["--no-continuous-batching"]
    if getattr(args, "admit_frames", None) is not None:
        cmd += ["--admit-frames", str(args.admit_frames)]
    if getattr(args, "first_chunk_frames", None) is not None:
        cmd += ["--first-chunk-frames", str(args.first_chunk_frames)]
    if getattr(args, "chunk_ramp", False):
        cmd += ["--chunk-ramp"]
    log("server:", " ".join(cmd))
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL,
                         stderr=open(os.path.join(args.workdir, "server.log"), "w"))
    deadline = time.time() + 1800
    while True:
        if p.poll() is not None or time.time() > deadline:
            with open(os.path.join(args.workdir, "server.log")) as f:
                tail = f.read()[-3000:]
            raise RuntimeError(f"the server did not start:\n{tail}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5):
                return p
        except OSError:
            time.sleep(0.5)


def stop_server(server: subprocess.Popen, wait: float = 60) -> None:
    server.terminate()
    try:
        server.wait(wait)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def health(url: str) -> dict:
    with urllib.request.urlopen(url + "/health", timeout=30) as r:
        return json.loads(r.read())


def playback(arrivals: list[tuple[float, int]],
             bytes_per_second: float = BYTES_PER_SECOND) -> dict:
    """Playing a stream from its first piece: `arrivals` are (seconds, bytes) of each piece in
    order. Playback starts when the first piece arrives and plays the audio in order; piece k
    (k >= 1) UNDERRUNS if it arrives after all the audio before it has finished playing (strictly
    after: arriving exactly as the earlier audio ends is in time). The player then waits for it
    (a stall of the difference) and plays on from its arrival, so later deadlines move with it.
    Returns {"underruns": pieces that arrived late, "stall": seconds waited in all}."""
    underruns, stall, played_until = 0, 0.0, None
    for t, n in arrivals:
        if played_until is None:
            played_until = t
        elif t > played_until:
            underruns += 1
            stall += t - played_until
            played_until = t
        played_until += n / bytes_per_second
    return {"underruns": underruns, "stall": stall}


def stream_request(url: str, i: int, max_new_tokens: int, timeout: float, text: str | None = None,
                   voice: str | None = None) -> dict:
    """One streamed pcm request: arrival time and size of every piece of the body. `timeout`
    bounds the whole request (status "timeout" past it); text and voice default to the i-th of
    TEXTS and SPEAKERS."""
    body = {"model": "bench", "input": text or TEXTS[i % len(TEXTS)],
            "voice": voice or SPEAKERS[i % len(SPEAKERS)],
            "response_format": "pcm", "seed": i, "max_new_tokens": max_new_tokens,
            "language": "english"}
    req = urllib.request.Request(url + "/v1/audio/speech", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    arrivals = []
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            while True:
                piece = r.read1(1 << 16)
                if not piece:
                    status = 200
                    break
                arrivals.append((time.perf_counter() - t0, len(piece)))
                if arrivals[-1][0] > timeout:
                    status = "timeout"
                    break
    except urllib.error.HTTPError as e:
        status = e.code
    except (OSError, http.client.HTTPException) as e:   # refused, timed out, a cut stream
        timed_out = isinstance(e, TimeoutError) or isinstance(getattr(e, "reason", None),
                                                              TimeoutError)
        status = "timeout" if timed_out else f"{type(e).__name__}: {e}"
    total = time.perf_counter() - t0
    nbytes = sum(n for _, n in arrivals)
    return {"status": status, "ttfa": arrivals[0][0] if arrivals else None, "total": total,
            "audio_s": nbytes / BYTES_PER_SECOND, "stall": playback(arrivals)["stall"],
            "pieces": len(arrivals), "sent": t0, "arrivals": arrivals}


def run_clients(url: str, clients: int, per_client: int, lengths: list[int],
                timeout: float, texts: list[str] | None = None) -> dict:
    """`clients` threads, each sending `per_client` requests back to back; client c's k-th
    request asks for `lengths[(c + k) % len(lengths)]` tokens (mixed lengths at every moment)
    and says `texts[(c + k) % len(texts)]` (default: TEXTS)."""
    def client(c):
        return [stream_request(url, c * per_client + k, lengths[(c + k) % len(lengths)], timeout,
                               text=texts[(c + k) % len(texts)] if texts else None)
                for k in range(per_client)]

    stats = health(url)["stats"]
    before, joined = stats["batch_sizes"], stats.get("joined", 0)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [r for rs in pool.map(client, range(clients)) for r in rs]
    wall = time.perf_counter() - t0
    stats = health(url)["stats"]
    after = stats["batch_sizes"]
    sizes = {int(k): v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}
    return {"clients": clients, "results": results, "wall": wall, "batch_sizes": sizes,
            "joined": stats.get("joined", 0) - joined}


def pct(xs, q) -> float:
    return float(np.percentile(np.asarray(xs, float), q)) if xs else float("nan")


# ------------------------------------------------------------------------------------------------

def versions() -> str:
    from importlib.metadata import version

    return ", ".join(f"{p} {version(p)}" for p in ("jax", "jaxlib", "fastapi", "uvicorn"))


def device() -> str:
    out = subprocess.run([sys.executable, "-c", "import jax; d = jax.devices()[0]; "
                          "print('CPU' if d.platform == 'cpu' else d.device_kind)"],
                         capture_output=True, text=True)
    return out.stdout.strip() or "unknown device"


def cpu_model() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    names = [ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")]
    return names[0] if names else "unknown CPU"


def report(args, runs, loads, dev) -> str:
    """`runs`: [(continuous batching on?, batch-1 results, levels)]."""
    load = lambda avg: "/".join(f"{x:.2f}" for x in avg)
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    if len(set(args.lengths)) == 1:
        frames = args.lengths[0] - 1
        work = f"{frames} frames ({frames / FRAME_RATE:.2f} s of audio) per request"
    else:
        work = (f"mixed lengths: client c's k-th request asks for max_new_tokens "
                f"{args.lengths}[(c + k) % {len(args.lengths)}] (frames = tokens - 1)")
    lines = [
        f"## Server, {args.size} CustomVoice, {dev} ({now})", "",
        f"`python benchmarks/bench_server.py {' '.join(args.argv)}`: `qwen3-tts-jax serve` on "
        f"localhost, random weights ({args.size}{', ' + args.dtype if args.dtype else ''}), "
        f"{work}, streamed pcm, first chunk after 3 frames then every 12, sampling with the "
        f"default settings.",
        f"Machine: {cpu_model()}, {os.cpu_count()} cores; {versions()}. Load average "
        f"(1/5/15 min) at start {load(loads[0])}, at end {load(loads[-1])}.", ""]
    tput = lambda lv: sum(r["audio_s"] for r in lv["results"] if r["status"] == 200) / lv["wall"]
    for continuous, single, levels in runs:
        ok = [r for r in single if r["status"] == 200]
        ttfa1 = [r["ttfa"] for r in ok]
        lines += [
            f"Continuous batching {'on' if continuous else 'off (--no-continuous-batching)'}. "
            f"Batch 1 ({len(ok)} requests one after another): TTFA p50 "
            f"{pct(ttfa1, 50) * 1000:.0f} ms (min {min(ttfa1) * 1000:.0f}, max "
            f"{max(ttfa1) * 1000:.0f}); streaming xRT p50 "
            f"{pct([r['audio_s'] / r['total'] for r in ok], 50):.2f}; playback stall p50 "
            f"{pct([r['stall'] for r in ok], 50):.2f} s per request.", "",
            "| clients | requests | failed | wall s | throughput (audio s / s) | requests/s "
            "| latency p50 / p90 / p99 s | TTFA p50 / p90 / p99 s | stall p50 s "
            "| batches formed | started in a running batch |",
            "|" + " --- |" * 11]
        for lv in levels:
            rs = lv["results"]
            good = [r for r in rs if r["status"] == 200 and r["audio_s"] > 0]
            lat = [r["total"] for r in good]
            ttfa = [r["ttfa"] for r in good]
            lines.append(
                f"| {lv['clients']} | {len(rs)} | {len(rs) - len(good)} | {lv['wall']:.1f} "
                f"| {tput(lv):.2f} | {len(good) / lv['wall']:.2f} "
                f"| {pct(lat, 50):.2f} / {pct(lat, 90):.2f} / {pct(lat, 99):.2f} "
                f"| {pct(ttfa, 50):.2f} / {pct(ttfa, 90):.2f} / {pct(ttfa, 99):.2f} "
                f"| {pct([r['stall'] for r in good], 50):.2f} "
                f"| {', '.join(f'{k}x{v}' for k, v in sorted(lv['batch_sizes'].items()))} "
                f"| {lv['joined']} |")
        base = levels[0]
        lines += ["", "Throughput relative to 1 client: " + ", ".join(
            f"{lv['clients']} clients {tput(lv) / tput(base):.2f}x" for lv in levels) + ".", ""]
    if len(runs) == 2:
        (_, _, on), (_, _, off) = runs
        lines += ["Continuous batching on / off, same run: throughput " + ", ".join(
            f"{a['clients']} clients {tput(a) / tput(b):.2f}x" for a, b in zip(on, off))
            + "; TTFA p90 " + ", ".join(
            f"{a['clients']} clients {pct([r['ttfa'] for r in a['results'] if r['ttfa']], 90):.2f}"
            f" vs {pct([r['ttfa'] for r in b['results'] if r['ttfa']], 90):.2f} s"
            for a, b in zip(on, off)) + ".", ""]
    return "\n".join(lines)


def serve_and_measure(args, folder: str, continuous: bool):
    """Start a server, compile its buckets, then the batch-1 requests and the client levels."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    t = time.perf_counter()
    server = start_server(args, folder, port, continuous)
    log(f"server up (continuous batching {continuous}): {time.perf_counter() - t:.0f} s")
    try:
        for c in sorted(set(args.clients)) * 2:   # compile every batch bucket and length;
            t = time.perf_counter()                # twice: the shapes rows that join reach
            warm = run_clients(url, c, len(args.lengths), args.lengths, args.timeout)
            bad = [r["status"] for r in warm["results"] if r["status"] != 200]
            log(f"warm-up {c} clients: {time.perf_counter() - t:.0f} s, batch sizes "
                f"{warm['batch_sizes']}, failed {bad}")
        single = [stream_request(url, i, args.lengths[i % len(args.lengths)], args.timeout)
                  for i in range(args.single_requests)]
        log("batch 1:", [f"{r['ttfa']:.3f}/{r['total']:.2f}" for r in single
                         if r["ttfa"] is not None])
        levels = []
        for c in args.clients:
            lv = run_clients(url, c, args.requests_per_client, args.lengths, args.timeout)
            log(f"{c} clients: {lv['wall']:.1f} s, batch sizes {lv['batch_sizes']}, "
                f"started in a running batch {lv['joined']}")
            levels.append(lv)
    finally:
        stop_server(server)
    return continuous, single, levels


# ------------------------------------------------------------------------------------------------
# --poisson: open-loop arrivals of short sentences
# ------------------------------------------------------------------------------------------------

# Words that are one token each in the demo checkpoint's small BPE (with their leading space; in
# Qwen's too), so that a sentence of w words ("Hello" and w - 1 of these, a full stop) is a prompt of
# 12 + w tokens, about as many as real text of w words with Qwen's tokenizer. Every prompt is then
# in one prompt bucket (any request can start in the running batch's free rows; one that does not
# fit closes the batch) and the prefill runs at one of two compute lengths: few compiled programs.
# (Words of the demo BPE's byte-sized pieces would be ~6 tokens a word: several times real length.)
WORDS = ("a", "is", "of", "this", "demo", "random", "world", "Qwen", "TTS")
WORDS_PER_SECOND = 2.5        # speaking pace: a sentence of w words is w / 2.5 s of speech
SENTENCE_WORDS = (5, 15)      # words per sentence, uniform
POISSON_PROMPT_BUCKET = 48    # every sentence's prompt (17-27 tokens with a preset voice)
# The open-loop warm-up repeats (at most WARMUP_ROUNDS times) until no request of a round waited
# WARM_TTFA_MS for its first audio: a longer wait is a program compiling (the KV-cache sizes that
# rows starting in a running batch reach depend on the traffic)
WARMUP_ROUNDS, WARM_TTFA_MS = 3, 1000.0


def sentence(rng: np.random.Generator) -> tuple[str, int]:
    """A sentence of 5-15 words (uniform): "Hello", then words drawn from WORDS, a full stop:
    (text, words). Deterministic for a seeded Generator."""
    n = int(rng.integers(SENTENCE_WORDS[0], SENTENCE_WORDS[1] + 1))
    return " ".join(["Hello"] + [WORDS[k] for k in rng.integers(0, len(WORDS), n - 1)]) + ".", n


def tokens_for(words: int) -> int:
    """max_new_tokens for a sentence of `words` words. Random weights never sample EOS, so a request
    runs max_new_tokens - 1 frames; those are the frames a voice at WORDS_PER_SECOND speaks:
    round(words / 2.5 * 12.5) = 5 a word (5 words: 25 frames, 2 s; 15 words: 75 frames, 6 s)."""
    return round(words / WORDS_PER_SECOND * FRAME_RATE) + 1


def arrival_times(rate: float, duration: float, seed: int) -> np.ndarray:
    """Open-loop Poisson arrivals in [0, duration): cumulative sums of exponential gaps of mean
    1 / rate, drawn up front from `np.random.default_rng(seed)`."""
    rng = np.random.default_rng(seed)
    expected = rate * duration
    gaps = rng.exponential(1 / rate, int(expected + 10 * np.sqrt(expected) + 10))
    times = np.cumsum(gaps)
    while times[-1] < duration:           # (practically never) extend with further draws
        times = np.concatenate([times, times[-1] + np.cumsum(rng.exponential(1 / rate, 64))])
    return times[times < duration]


def poisson_schedule(rate: float, duration: float, seed: int) -> list[dict]:
    """The requests of one run: arrival time (s from the start), sentence, word count, voice (a
    preset, mixed) and max_new_tokens (`tokens_for`). Arrivals and contents come from separate
    generators of `seed`, so the same seed gives the same arrivals whatever the sentences."""
    times = arrival_times(rate, duration, seed)
    rng = np.random.default_rng([seed, 1])
    out = []
    for t in times:
        text, words = sentence(rng)
        out.append({"at": float(t), "text": text, "words": words,
                    "voice": SPEAKERS[int(rng.integers(len(SPEAKERS)))],
                    "max_new_tokens": tokens_for(words)})
    return out


def open_loop(times, send) -> tuple[list, list[float], float]:
    """Calls `send(i)` at `start + times[i]` (start: now), each in a thread of its own, however
    many are in flight: the sender only sleeps until the next arrival and starts a thread, so slow
    responses do not delay it. Returns (send's results in order, lags, start): lag i is how late
    send(i) actually began (seconds; grows only when the client machine itself is saturated). A
    send that raises gives {"status": "<exception>"}."""
    n = len(times)
    results, lags = [None] * n, [0.0] * n
    start = time.perf_counter()

    def one(i):
        lags[i] = time.perf_counter() - (start + times[i])
        try:
            results[i] = send(i)
        except Exception as e:  # noqa: BLE001 - recorded as the request's status
            results[i] = {"status": f"{type(e).__name__}: {e}"}

    threads = []
    for i, at in enumerate(times):
        wait = start + at - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        th = threading.Thread(target=one, args=(i,), daemon=True)
        th.start()
        threads.append(th)
    for th in threads:
        th.join()
    return results, lags, start


def metrics(url: str) -> dict:
    """GET /metrics parsed: {(sample name, sorted labels): value}; {} where the server or this
    client has no prometheus-client (the server-side columns are then n/a)."""
    try:
        from prometheus_client.parser import text_string_to_metric_families

        with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
            text = r.read().decode()
    except (ImportError, urllib.error.HTTPError) as e:
        log(f"no server-side figures: {e}")
        return {}
    return {(x.name, tuple(sorted(x.labels.items()))): x.value
            for f in text_string_to_metric_families(text) for x in f.samples}


def bucket_quantile(before: dict, after: dict, name: str, q: float) -> float:
    """The q-th percentile (ms) of a /metrics histogram over the requests between two scrapes,
    as the bound of the bucket it falls in (the buckets' resolution: 10, 20, 30, 50, 75 ms...);
    nan without requests, inf past the last bound."""
    counts = {}
    for (n, labels), v in after.items():
        le = dict(labels).get("le")
        if n == name + "_bucket" and dict(labels).get("route") == "speech":
            counts[float(le)] = v - before.get((n, labels), 0.0)
    total = counts.get(float("inf"), 0.0)
    if not total:
        return float("nan")
    return 1000 * next(le for le in sorted(counts) if counts[le] >= q / 100 * total)


def run_poisson(url: str, rate: float, duration: float, seed: int, timeout: float) -> dict:
    """One open-loop run: `poisson_schedule(rate, duration, seed)` against the server, each
    request streamed (`stream_request`, its `timeout` bounding the whole request)."""
    schedule = poisson_schedule(rate, duration, seed)
    stats, m0 = health(url)["stats"], metrics(url)

    def send(i):
        r = schedule[i]
        return stream_request(url, i, r["max_new_tokens"], timeout, text=r["text"],
                              voice=r["voice"])

    results, lags, start = open_loop([r["at"] for r in schedule], send)
    ends = [r["sent"] + r["total"] for r in results if "sent" in r]
    wall = (max(ends) if ends else time.perf_counter()) - start
    after, m1 = health(url)["stats"], metrics(url)
    diff = lambda k: after.get(k, 0) - stats.get(k, 0)
    before = stats["batch_sizes"]
    sizes = {int(k): v - before.get(k, 0) for k, v in after["batch_sizes"].items()
             if v - before.get(k, 0)}
    requests = [dict(r, **{k: s[k] for k in ("at", "words", "voice", "max_new_tokens")}, lag=lag)
                for r, s, lag in zip(results, schedule, lags)]
    return {"rate": rate, "duration": duration, "seed": seed, "wall": wall, "requests": requests,
            "batch_sizes": sizes, "joined": diff("joined"),
            "rejected_queue_full": diff("rejected_queue_full"),
            # the server's side (GET /metrics): submitted -> first audio out of the engine, and
            # submitted -> started in a batch; bucket bounds
            "server_ttfa_ms": {q: bucket_quantile(m0, m1, "qwen3_tts_time_to_first_audio_seconds",
                                                  q) for q in (50, 95)},
            "server_queue_ms": {q: bucket_quantile(m0, m1, "qwen3_tts_queue_wait_seconds", q)
                                for q in (50, 95)}}


def summarize(run: dict) -> dict:
    """The figures of one open-loop run. ok: status 200 with audio; timeouts: past the client's
    deadline or the server's (504); failed: the rest (429 queue full, errors, cut streams).
    TTFA over the ok requests; underruns and stall (`playback`) over every request with audio."""
    rs = run["requests"]
    ok = [r for r in rs if r["status"] == 200 and r.get("audio_s", 0) > 0]
    timeouts = sum(r["status"] in ("timeout", 504) for r in rs)
    played = [playback(r["arrivals"]) for r in rs if r.get("arrivals")]
    ttfa = [r["ttfa"] for r in ok]
    audio = sum(r.get("audio_s", 0.0) for r in rs)
    return {"rate": run["rate"], "requests": len(rs), "wall_s": run["wall"],
            "completed_per_s": len(ok) / run["wall"], "ok": len(ok),
            "failed": len(rs) - len(ok) - timeouts, "timeouts": timeouts,
            "ttfa_ms": {q: pct(ttfa, q) * 1000 for q in (50, 95, 99)} | {
                "max": max(ttfa, default=float("nan")) * 1000},
            "underrun_chunks": sum(p["underruns"] for p in played),
            "underrun_requests": sum(p["underruns"] > 0 for p in played),
            "stall_s": sum(p["stall"] for p in played), "audio_s_per_s": audio / run["wall"],
            "max_send_lag_ms": max((r["lag"] for r in rs), default=0.0) * 1000,
            "batch_sizes": run["batch_sizes"], "joined": run["joined"],
            "rejected_queue_full": run["rejected_queue_full"],
            "server_ttfa_ms": run["server_ttfa_ms"], "server_queue_ms": run["server_queue_ms"]}


def bound(ms: float) -> str:
    """A bucket-bound percentile as a table cell."""
    return "n/a" if math.isnan(ms) else f"<= {ms:.0f}"


def poisson_report(args, summaries: list[dict], loads, dev: str) -> str:
    load = lambda avg: "/".join(f"{x:.2f}" for x in avg)
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip() or "unknown"
    first = 3 if args.first_chunk_frames is None else args.first_chunk_frames
    lines = [
        f"## Server under open-loop Poisson load, {args.size} CustomVoice, {dev} ({now}, "
        f"commit {commit})", "",
        f"`python benchmarks/bench_server.py {' '.join(args.argv)}`: `qwen3-tts-jax serve` on "
        f"localhost, random weights ({args.size}{', ' + args.dtype if args.dtype else ''}), "
        f"continuous batching, one batch bucket of {args.max_batch_size} rows, prompts padded to "
        f"{POISSON_PROMPT_BUCKET}. Requests arrive at Poisson times (seed {args.seed}) for "
        f"{args.duration:g} s, each sent at its time however many are in flight: a sentence of "
        f"5-15 random words, a random preset voice, 5 frames a word (2.5 words/s; random "
        f"weights never stop early), streamed pcm, first chunk after {first} frames then every "
        f"12{' (growing to it: --chunk-ramp)' if args.chunk_ramp else ''}; a request joins a "
        f"running batch within "
        f"{first if args.admit_frames is None else args.admit_frames} frames (`--admit-frames`; "
        f"0: at the next chunk). Warm-up before measuring (not counted). Underrun: a piece of "
        f"the body that arrives after the audio before it has finished playing (playback from "
        f"the first piece; stall: the waits).",
        f"Machine: {cpu_model()}, {os.cpu_count()} cores; {versions()}. Load average "
        f"(1/5/15 min) at start {load(loads[0])}, at end {load(loads[-1])}.", "",
        "| offered req/s | requests | wall s | completed/s | ok / failed / timeouts "
        "| TTFA p50 / p95 / p99 / max ms | underrun chunks / requests | stall s "
        "| audio s / s | max send lag ms | batches formed | started in a running batch "
        "| server: first audio p50 / p95 ms | server: queue wait p50 / p95 ms |",
        "|" + " --- |" * 14]
    for s in summaries:
        t = s["ttfa_ms"]
        lines.append(
            f"| {s['rate']:g} | {s['requests']} | {s['wall_s']:.1f} | {s['completed_per_s']:.2f} "
            f"| {s['ok']} / {s['failed']} / {s['timeouts']} "
            f"| {t[50]:.0f} / {t[95]:.0f} / {t[99]:.0f} / {t['max']:.0f} "
            f"| {s['underrun_chunks']} / {s['underrun_requests']} | {s['stall_s']:.2f} "
            f"| {s['audio_s_per_s']:.2f} | {s['max_send_lag_ms']:.1f} "
            f"| {', '.join(f'{k}x{v}' for k, v in sorted(s['batch_sizes'].items()))} "
            f"| {s['joined']} "
            f"| {bound(s['server_ttfa_ms'][50])} / {bound(s['server_ttfa_ms'][95])} "
            f"| {bound(s['server_queue_ms'][50])} / {bound(s['server_queue_ms'][95])} |")
    refused = sum(s["rejected_queue_full"] for s in summaries)
    if refused:
        lines += ["", f"Refused with 429 (queue full, --max-queue): {refused}."]
    if len(summaries) < len(args.poisson):
        lines += ["", f"Stopped (interrupted) before the rates "
                      f"{', '.join(f'{r:g}' for r in args.poisson[len(summaries):])} req/s."]
    return "\n".join(lines + [""])


def poisson(args, folder: str) -> tuple[str, dict]:
    """Start the server, warm it up, then one open-loop run per `--poisson` rate."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    loads, dev = [os.getloadavg()], device()
    if not args.max_batch_size:
        args.max_batch_size = 8 if dev == "CPU" else 64
    longest = tokens_for(SENTENCE_WORDS[1])
    t = time.perf_counter()
    server = start_server(args, folder, port, max_batch=args.max_batch_size,
                          buckets=[args.max_batch_size], max_new_tokens=longest,
                          min_prompt_bucket=POISSON_PROMPT_BUCKET)
    log(f"server up: {time.perf_counter() - t:.0f} s")
    warm_timeout = max(args.timeout, 900.0)     # the first requests of each shape compile
    runs = []
    try:
        # compile, none of it measured: the closed-loop levels' pattern (twice over, the
        # shortest and the longest sentence: both prefill lengths, as a batch's first rows and
        # as rows started in it), then open-loop traffic at the highest rate (rows starting at
        # every moment, caches growing and shifting)
        texts = [" ".join(["Hello"] + ["world"] * (w - 1)) + "." for w in SENTENCE_WORDS]
        lengths = [tokens_for(SENTENCE_WORDS[0]), longest]
        for c in (1, 4) * 2:
            t = time.perf_counter()
            warm = run_clients(url, c, len(lengths), lengths, warm_timeout, texts)
            bad = [r["status"] for r in warm["results"] if r["status"] != 200]
            log(f"warm-up {c} clients: {time.perf_counter() - t:.0f} s, batch sizes "
                f"{warm['batch_sizes']}, failed {bad}")
        for k in range(WARMUP_ROUNDS if args.warmup_s > 0 else 0):
            t = time.perf_counter()
            warm = summarize(run_poisson(url, max(args.poisson), args.warmup_s,
                                         args.seed + 1 + k, warm_timeout))
            log(f"warm-up at {max(args.poisson):g} req/s for {args.warmup_s:g} s: "
                f"{time.perf_counter() - t:.0f} s, TTFA max {warm['ttfa_ms']['max']:.0f} ms, "
                f"ok/failed/timeouts {warm['ok']}/{warm['failed']}/{warm['timeouts']}")
            if warm["ttfa_ms"]["max"] < WARM_TTFA_MS:
                break
        try:
            for rate in args.poisson:
                run = run_poisson(url, rate, args.duration, args.seed, args.timeout)
                s = summarize(run)
                log(f"{rate:g} req/s: {s['requests']} requests, TTFA p95 "
                    f"{s['ttfa_ms'][95]:.0f} ms, underruns {s['underrun_chunks']}, "
                    f"ok/failed/timeouts {s['ok']}/{s['failed']}/{s['timeouts']}, max send lag "
                    f"{s['max_send_lag_ms']:.1f} ms")
                runs.append((run, s))
        except KeyboardInterrupt:       # Ctrl-C or SIGTERM (`timeout`): report the rates done
            log(f"stopped after {len(runs)} of {len(args.poisson)} rates")
    finally:
        stop_server(server, wait=60 if len(runs) == len(args.poisson) else 5)
    loads.append(os.getloadavg())
    summaries = [s for _, s in runs]
    text = poisson_report(args, summaries, loads, dev)
    r3 = lambda x: round(x, 4)
    data = {"device": dev, "machine": f"{cpu_model()}, {os.cpu_count()} cores",
            "versions": versions(), "command": args.argv, "size": args.size,
            "max_batch_size": args.max_batch_size, "admit_frames": args.admit_frames,
            "first_chunk_frames": args.first_chunk_frames, "chunk_ramp": args.chunk_ramp,
            "duration": args.duration, "seed": args.seed,
            "runs": [dict(s, per_request=[
                {"at": r3(r["at"]), "lag": r3(r["lag"]), "status": r["status"],
                 "words": r["words"], "voice": r["voice"], "max_new_tokens": r["max_new_tokens"],
                 "ttfa": r.get("ttfa") and r3(r["ttfa"]),
                 "arrivals": [[r3(a), n] for a, n in r.get("arrivals", [])]}
                for r in run["requests"]]) for run, s in runs]}
    return text, data


# ------------------------------------------------------------------------------------------------
# --faults: a soak of mixed good, bad and dropped traffic
# ------------------------------------------------------------------------------------------------

def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(ln.split()[1]) / 1024 for ln in f if ln.startswith("VmRSS:"))


def bad_request(url: str, i: int) -> int:
    """One request the server must refuse (and survive): its status."""
    long_instructions = " ".join(["a"] * 20_000)           # ~20,000 prompt tokens
    bodies = [b"{not json", json.dumps({"model": "m", "input": "Hi.", "voice": "nobody"}).encode(),
              json.dumps({"model": "m", "input": "Hi.", "voice": "ryan",
                          "instructions": long_instructions}).encode(),
              json.dumps({"model": "m", "input": "Hi.", "voice": "ryan",
                          "temperature": 10 ** 400}).encode(),
              json.dumps({"model": "m", "input": "Hi.", "voice": "ryan",
                          "max_new_tokens": 10 ** 9}).encode()]
    req = urllib.request.Request(url + "/v1/audio/speech", data=bodies[i % len(bodies)],
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            r.read()
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return -1


def dropped_request(port: int, i: int) -> None:
    """A streamed request whose client goes away after the first bytes (or before any)."""
    body = json.dumps({"model": "m", "input": TEXTS[i % len(TEXTS)], "voice": "ryan",
                       "response_format": "pcm", "seed": i}).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(b"POST /v1/audio/speech HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                  b"application/json\r\nContent-Length: " + str(len(body)).encode() +
                  b"\r\n\r\n" + body)
        if i % 2:
            try:
                s.recv(1024)
            except OSError:
                pass


def idle_session(port: int) -> None:
    """A WebSocket text session that sends its settings, no text, and leaves."""
    from websockets.sync.client import connect

    try:
        with connect(f"ws://127.0.0.1:{port}/v1/audio/speech/stream", open_timeout=30) as ws:
            ws.send(json.dumps({"voice": "ryan"}))
            time.sleep(1.0)
    except Exception:  # noqa: BLE001 - a refused session (429) is part of the soak
        pass


def soak(args, folder: str) -> str:
    """`--duration` seconds of traffic from `--clients` threads: each request is good (60 %:
    a streamed pcm request), bad (20 %: malformed JSON, unknown voice, a prompt past
    --max-prompt-tokens, a number past float's range, max_new_tokens past the cap), dropped
    (15 %: the client leaves after the first bytes or before) or an idle text session (5 %).
    Reports the good requests' success rate and latency, and the server's RSS."""
    import random

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args.clients = [max(args.clients)]
    server = start_server(args, folder, port)
    try:
        for i in range(2 * max(args.clients)):                         # compile the shapes
            stream_request(url, i, args.lengths[0], args.timeout)
        rss0, t0 = rss_mib(server.pid), time.perf_counter()
        end = t0 + args.duration

        def client(c):
            rng, out = random.Random(c), []
            i = 0
            while time.perf_counter() < end:
                i += 1
                x = rng.random()
                if x < 0.6:
                    out.append(("good", stream_request(url, 1000 * c + i, args.lengths[0],
                                                       args.timeout)))
                elif x < 0.8:
                    out.append(("bad", bad_request(url, i)))
                elif x < 0.95:
                    dropped_request(port, i)
                    out.append(("dropped", None))
                else:
                    idle_session(port)
                    out.append(("session", None))
            return out

        with ThreadPoolExecutor(max(args.clients)) as pool:
            done = [r for rs in pool.map(client, range(max(args.clients))) for r in rs]
        wall = time.perf_counter() - t0
        time.sleep(2)
        rss1 = rss_mib(server.pid)
        try:
            with urllib.request.urlopen(url + "/health", timeout=30) as r:
                state = f"{r.status} {json.loads(r.read())['status']}"
        except urllib.error.HTTPError as e:
            state = f"{e.code}"
    finally:
        stop_server(server)
    good = [r for k, r in done if k == "good"]
    ok = [r for r in good if r["status"] == 200 and r["audio_s"] > 0]
    bad = [r for k, r in done if k == "bad"]
    lat = [r["total"] for r in ok]
    count = lambda kind: sum(k == kind for k, _ in done)
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip() or "unknown"
    return "\n".join([
        f"## Server fault soak, {args.size} CustomVoice, {device()} ({now}, commit {commit})", "",
        f"`python benchmarks/bench_server.py {' '.join(args.argv)}`: {wall:.0f} s of traffic "
        f"from {max(args.clients)} clients against `qwen3-tts-jax serve` (random weights, "
        f"max_new_tokens {args.lengths[0]}): 60 % good streamed requests, 20 % bad ones "
        f"(malformed JSON, unknown voice, a ~20,000-token prompt, a number past float's range, "
        f"max_new_tokens past the cap), 15 % dropped after the first bytes or before, 5 % idle "
        f"text sessions. Machine: {cpu_model()}, {os.cpu_count()} cores; {versions()}.", "",
        "| good requests | good succeeded | latency p50 / p95 s | bad (refused 4xx) "
        "| dropped | idle sessions | RSS start / end MiB | /health at the end |",
        "|" + " --- |" * 8,
        f"| {len(good)} | {len(ok)} ({100 * len(ok) / max(len(good), 1):.1f} %) "
        f"| {pct(lat, 50):.2f} / {pct(lat, 95):.2f} "
        f"| {len(bad)} ({sum(400 <= s < 500 for s in bad)}) | {count('dropped')} "
        f"| {count('session')} | {rss0:.0f} / {rss1:.0f} | {state} |", ""])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=["tiny", "0b6", "1b7"], default="tiny")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    ap.add_argument("--model", help="an existing checkpoint folder instead of building one")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--requests-per-client", type=int, default=3)
    ap.add_argument("--single-requests", type=int, default=5,
                    help="requests for the batch-1 TTFA / streaming figures")
    ap.add_argument("--max-new-tokens", type=int, nargs="+", default=[61], dest="lengths",
                    help="per request (frames + 1); several: request i takes the (i mod n)-th")
    ap.add_argument("--continuous", choices=["on", "off", "both"], default="on",
                    help="continuous batching in the server; both: two servers, one after the "
                         "other, and their ratio")
    ap.add_argument("--batch-window-ms", type=float, default=10.0)
    ap.add_argument("--timeout", type=float, default=None,
                    help="per request, seconds (default 900; with --poisson 30)")
    ap.add_argument("--results", default=os.path.join(HERE, "RESULTS.md"))
    ap.add_argument("--no-append", action="store_true", help="print the table only")
    ap.add_argument("--faults", action="store_true",
                    help="a soak instead: mixed good, bad and dropped traffic and idle sessions "
                         "from the largest --clients count for --duration seconds")
    ap.add_argument("--poisson", type=float, nargs="+", metavar="RATE",
                    help="open-loop Poisson arrivals instead, one run of --duration seconds per "
                         "rate (requests/s): short sentences, mixed voices, streamed pcm")
    ap.add_argument("--duration", type=float, default=None,
                    help="seconds of traffic: with --faults (default 600), with --poisson per "
                         "rate (default 60)")
    ap.add_argument("--seed", type=int, default=0, help="with --poisson: arrivals and sentences")
    ap.add_argument("--warmup-s", type=float, default=10.0,
                    help="with --poisson: seconds of unmeasured traffic at the highest rate "
                         "before measuring (after the closed-loop warm-up)")
    ap.add_argument("--max-batch-size", type=int, default=None,
                    help="with --poisson: the server's batch size, its only bucket (a running "
                         "batch takes new requests into its free rows; default 64, on the CPU 8)")
    ap.add_argument("--admit-frames", type=int, default=None,
                    help="with --poisson: the server's --admit-frames (default: its own, the "
                         "first chunk's frames)")
    ap.add_argument("--first-chunk-frames", type=int, default=None,
                    help="with --poisson: the server's --first-chunk-frames (default: its 3)")
    ap.add_argument("--chunk-ramp", action="store_true",
                    help="with --poisson: the server's --chunk-ramp")
    ap.add_argument("--folder", help="reuse (or build once into) this checkpoint folder")
    ap.add_argument("--json", help="with --poisson: also write the figures and every request's "
                                   "chunk arrivals here")
    args = ap.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)     # the command, for the reports
    if args.duration is None:
        args.duration = 60.0 if args.poisson else 600.0
    if args.timeout is None:
        args.timeout = 30.0 if args.poisson else 900.0
    if args.folder and not args.model:
        if not os.path.exists(os.path.join(args.folder, "model.safetensors")):
            t = time.perf_counter()
            build_checkpoint(args.folder, args.size)
            log(f"checkpoint {args.folder}: {time.perf_counter() - t:.0f} s")
        args.model = args.folder
    if args.faults or args.poisson:
        # with --poisson, SIGTERM (e.g. from `timeout`) as Ctrl-C: the rates done are reported
        term = signal.signal(signal.SIGTERM, signal.default_int_handler) if args.poisson else None
        try:
            with tempfile.TemporaryDirectory(prefix="bench-server-") as workdir:
                args.workdir = workdir
                folder = args.model or build_checkpoint(os.path.join(workdir, "ckpt"), args.size)
                text, data = poisson(args, folder) if args.poisson else (soak(args, folder), None)
        finally:
            if term is not None:
                signal.signal(signal.SIGTERM, term)
        print(text)
        if not args.no_append:
            with open(args.results, "a") as f:
                f.write("\n" + text)
        if data is None:
            return 0
        if args.json:
            with open(args.json, "w") as f:
                json.dump(data, f)
        return 0 if all(r["ok"] for r in data["runs"]) else 1     # overload is a result
    loads = [os.getloadavg()]
    modes = {"on": [True], "off": [False], "both": [True, False]}[args.continuous]
    with tempfile.TemporaryDirectory(prefix="bench-server-") as workdir:
        args.workdir = workdir
        t = time.perf_counter()
        folder = args.model or build_checkpoint(os.path.join(workdir, "ckpt"), args.size)
        log(f"checkpoint {folder}: {time.perf_counter() - t:.0f} s")
        runs = [serve_and_measure(args, folder, m) for m in modes]
        loads.append(os.getloadavg())
    text = report(args, runs, loads, device())
    print(text)
    if not args.no_append:
        with open(args.results, "a") as f:
            f.write("\n" + text)
    failed = sum(r["status"] != 200 for _, _, levels in runs for lv in levels
                 for r in lv["results"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
