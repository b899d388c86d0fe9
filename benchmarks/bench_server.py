"""The HTTP server under load: time to first audio and streaming speed at batch 1, then throughput
and latency percentiles with 1, 4 and 16 concurrent clients. One command:

    python benchmarks/bench_server.py                      # tiny random-weight model (seconds)
    python benchmarks/bench_server.py --size 0b6           # full-size 0.6B shapes, random weights
    python benchmarks/bench_server.py --max-new-tokens 16 31 61 121 --continuous both
                                       # mixed lengths, continuous batching on and off
    python benchmarks/bench_server.py --faults --duration 120 --clients 4
                                       # a soak: good, bad and dropped traffic (`soak`)

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
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import subprocess
import sys
import tempfile
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


def start_server(args, folder: str, port: int, continuous: bool = True) -> subprocess.Popen:
    buckets = ",".join(str(c) for c in sorted(set(args.clients)))
    cmd = [sys.executable, "-m", "qwen3_tts_jax.cli", "serve", "--model", folder,
           "--port", str(port), "--quiet", "--max-new-tokens", str(max(args.lengths)),
           "--max-batch-size", str(max(args.clients)), "--batch-buckets", buckets,
           "--min-prompt-bucket", "48", "--batch-window-ms", str(args.batch_window_ms),
           "--max-queue", str(4 * max(args.clients)), "--voices-dir",
           os.path.join(args.workdir, "voices")]
    if args.dtype:
        cmd += ["--dtype", args.dtype]
    if not continuous:
        cmd += ["--no-continuous-batching"]
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


def health(url: str) -> dict:
    with urllib.request.urlopen(url + "/health", timeout=30) as r:
        return json.loads(r.read())


def stream_request(url: str, i: int, max_new_tokens: int, timeout: float) -> dict:
    """One streamed pcm request: arrival time and size of every piece of the body."""
    body = {"model": "bench", "input": TEXTS[i % len(TEXTS)], "voice": SPEAKERS[i % len(SPEAKERS)],
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
                    break
                arrivals.append((time.perf_counter() - t0, len(piece)))
        status = 200
    except urllib.error.HTTPError as e:
        status = e.code
    except OSError as e:
        status = f"{type(e).__name__}: {e}"
    total = time.perf_counter() - t0
    nbytes = sum(n for _, n in arrivals)
    # playback from the first byte: piece k can play once the audio before it has played
    stall, played_until = 0.0, None
    for t, n in arrivals:
        if played_until is None:
            played_until = t
        elif t > played_until:
            stall += t - played_until
            played_until = t
        played_until += n / BYTES_PER_SECOND
    return {"status": status, "ttfa": arrivals[0][0] if arrivals else None, "total": total,
            "audio_s": nbytes / BYTES_PER_SECOND, "stall": stall, "pieces": len(arrivals)}


def run_clients(url: str, clients: int, per_client: int, lengths: list[int],
                timeout: float) -> dict:
    """`clients` threads, each sending `per_client` requests back to back; client c's k-th
    request asks for `lengths[(c + k) % len(lengths)]` tokens (mixed lengths at every moment)."""
    def client(c):
        return [stream_request(url, c * per_client + k, lengths[(c + k) % len(lengths)], timeout)
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
        f"`python benchmarks/bench_server.py {' '.join(sys.argv[1:])}`: `qwen3-tts-jax serve` on "
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
        server.terminate()
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    return continuous, single, levels


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
        server.terminate()
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
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
        f"`python benchmarks/bench_server.py {' '.join(sys.argv[1:])}`: {wall:.0f} s of traffic "
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
    ap.add_argument("--timeout", type=float, default=900.0, help="per request, seconds")
    ap.add_argument("--results", default=os.path.join(HERE, "RESULTS.md"))
    ap.add_argument("--no-append", action="store_true", help="print the table only")
    ap.add_argument("--faults", action="store_true",
                    help="a soak instead: mixed good, bad and dropped traffic and idle sessions "
                         "from the largest --clients count for --duration seconds")
    ap.add_argument("--duration", type=float, default=600.0,
                    help="with --faults: seconds of traffic (default 600)")
    args = ap.parse_args(argv)
    if args.faults:
        with tempfile.TemporaryDirectory(prefix="bench-server-") as workdir:
            args.workdir = workdir
            folder = args.model or build_checkpoint(os.path.join(workdir, "ckpt"), args.size)
            text = soak(args, folder)
        print(text)
        if not args.no_append:
            with open(args.results, "a") as f:
                f.write("\n" + text)
        return 0
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
