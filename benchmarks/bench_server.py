"""The HTTP server under load: time to first audio and streaming speed at batch 1, then throughput
and latency percentiles with 1, 4 and 16 concurrent clients. One command:

    python benchmarks/bench_server.py                      # tiny random-weight model (seconds)
    python benchmarks/bench_server.py --size 0b6           # full-size 0.6B shapes, random weights
    python benchmarks/bench_server.py --max-new-tokens 16 31 61 121 --continuous both
                                       # mixed lengths, continuous batching on and off

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
    args = ap.parse_args(argv)
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
