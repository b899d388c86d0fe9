"""Startup: a fresh process that loads a checkpoint and speaks one short sentence, timed from the
process's start, with an empty and then a warm cache folder.

    python benchmarks/bench_startup.py --folder /tmp/ckpt0b6 --variants f32,int8

Each run is a new Python process (`--role child`) that
  imports    jax and qwen3_tts_jax;
  loads      `Qwen3TTS.from_pretrained(folder, quantize=..., weights_cache=..., compile_cache=...)`
             and its codec
             (what the CLI does before it generates);
  speaks     `generate_custom_voice(TEXT, speaker, greedy, max_new_tokens=FRAMES)`: text to 24 kHz
             samples, the codec decode included (the first call: tracing, compiling or reading the
             persistent compilation cache, then running);
  again      the same call (warm: only the run itself).
The parent starts the child and takes the time from just before the start; "to first audio" is
import + load + first call, all from the process's start. Per variant the child runs twice with
the same cache folder (JAX's persistent compilation cache: `enable_compilation_cache(DIR/xla)`;
serialized programs: `compile_cache=DIR/programs`, off with `--no-programs`; packed weights:
`weights_cache=DIR/weights`): first empty ("cold"), then as the first run left it ("warm").
The child also reports where its time went: JAX's tracing, lowering and backend-compile events,
persistent-cache hits and misses, and the time inside the loading steps (checkpoint read,
packing/quantizing, weights-cache read, codec, tokenizer).

A random-weight checkpoint never says EOS (bench_scale.py zeroes that row), so every call makes
exactly FRAMES frames: the second call's time is the work, the first call minus the second is
what the first request waits for on top.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TEXT = "Hello there, this is a short sentence."
# name -> (quantize, codec precision)
VARIANTS = {"f32": (None, "float32"), "int8": ("int8", "float32"), "int4": ("int4", "float32"),
            "int8+bf16": ("int8", "bf16"), "int4+bf16": ("int4", "bf16")}
COMPILE_EVENTS = {"/jax/core/compile/jaxpr_trace_duration": "trace_s",
                  "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower_s",
                  "/jax/core/compile/backend_compile_duration": "backend_compile_s",
                  "/jax/compilation_cache/cache_retrieval_time_sec": "cache_read_s"}
COUNT_EVENTS = {"/jax/compilation_cache/cache_hits": "cache_hits",
                "/jax/compilation_cache/cache_misses": "cache_writes",
                "/jax/compilation_cache/compile_requests_use_cache": "cache_requests"}


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------
# child: one process start
# ------------------------------------------------------------------------------------------------

def run_child(args) -> dict:
    t_spawn = args.t0
    t_python = time.time()
    import jax

    sys.path.insert(0, ROOT)
    import qwen3_tts_jax
    from qwen3_tts_jax import Qwen3TTS, enable_compilation_cache
    from qwen3_tts_jax import checkpoint, runner, text as text_mod
    from qwen3_tts_jax.codec import SpeechTokenizer

    t_import = time.time()
    totals: dict = {}

    def add(name, seconds):
        totals[name] = totals.get(name, 0.0) + seconds

    jax.monitoring.register_event_duration_secs_listener(
        lambda event, duration, **_: add(COMPILE_EVENTS[event], duration)
        if event in COMPILE_EVENTS else None)
    jax.monitoring.register_event_listener(
        lambda event, **_: add(COUNT_EVENTS[event], 1) if event in COUNT_EVENTS else None)

    def timed(owner, name, key):   # wrap a loading step to time it
        f = getattr(owner, name)

        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return f(*a, **k)
            finally:
                add(key, time.perf_counter() - t)
        setattr(owner, name, wrapper)

    timed(checkpoint, "load_params", "read_checkpoint_s")
    timed(checkpoint, "pack_for_inference", "pack_s")
    if hasattr(checkpoint, "load_packed_cache"):
        timed(checkpoint, "load_packed_cache", "weights_cache_read_s")
    if hasattr(checkpoint, "save_packed_cache"):
        timed(checkpoint, "save_packed_cache", "weights_cache_write_s")
    timed(text_mod.TextTokenizer, "from_dir", "tokenizer_s")
    timed(SpeechTokenizer, "from_pretrained", "codec_load_s")
    timed(runner, "run", "codes_s")
    timed(SpeechTokenizer, "decode", "codec_decode_s")

    if args.preload:           # programs read ahead in a thread while the weights load
        from qwen3_tts_jax import compilation_cache
        init = compilation_cache.Executables.__init__

        def init_and_preload(self, *a, **k):
            init(self, *a, **k)
            self.preload()
        compilation_cache.Executables.__init__ = init_and_preload
    xla = enable_compilation_cache(os.path.join(args.cache, "xla"), **(
        {} if args.min_compile_secs is None else {"min_compile_time_secs": args.min_compile_secs}))
    kw = {}
    if not args.no_weights_cache:
        kw["weights_cache"] = os.path.join(args.cache, "weights")
    if not args.no_programs:
        kw["compile_cache"] = os.path.join(args.cache, "programs")
    quantize, codec_precision = VARIANTS[args.variant]
    tts = Qwen3TTS.from_pretrained(args.folder, quantize=quantize,
                                   codec_precision=codec_precision, **kw)
    _ = tts.speech_tokenizer
    jax.block_until_ready(tts.params)
    t_load = time.time()
    phases = {"load": dict(totals)}
    gen = dict(speaker=tts.get_supported_speakers()[0], language="english", do_sample=False,
               subtalker_dosample=False, max_new_tokens=args.frames)
    wavs, sr = tts.generate_custom_voice(TEXT, **gen)
    t_first = time.time()
    phases["first"] = {k: v - phases["load"].get(k, 0.0) for k, v in totals.items()}
    before = dict(totals)
    wavs2, _ = tts.generate_custom_voice(TEXT, **gen)
    t_second = time.time()
    phases["second"] = {k: v - before.get(k, 0.0) for k, v in totals.items()}
    return {"variant": args.variant, "jax": jax.__version__, "xla_cache": xla,
            "package": os.path.dirname(qwen3_tts_jax.__file__),
            "interpreter_s": t_python - t_spawn, "import_s": t_import - t_spawn,
            "load_s": t_load - t_import, "first_s": t_first - t_load,
            "to_first_audio_s": t_first - t_spawn, "second_s": t_second - t_first,
            "programs": dict(getattr(tts, "executables", None).stats)
            if getattr(tts, "executables", None) is not None else None,
            "audio_s": len(wavs[0]) / sr, "same_audio": bool(
                len(wavs[0]) == len(wavs2[0]) and float(abs(wavs[0] - wavs2[0]).max()) == 0.0),
            "phases": phases}


# ------------------------------------------------------------------------------------------------
# parent
# ------------------------------------------------------------------------------------------------

def child(args, variant: str, cache: str) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    cmd = [sys.executable, os.path.abspath(__file__), "--role", "child", "--variant", variant,
           "--folder", args.folder, "--cache", cache, "--frames", str(args.frames),
           "--out", out] + (["--no-weights-cache"] if args.no_weights_cache else []) + (
               ["--no-programs"] if args.no_programs else []) + (
               ["--preload"] if args.preload else []) + (
               [] if args.min_compile_secs is None
               else ["--min-compile-secs", str(args.min_compile_secs)])
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    t0 = time.time()
    try:
        subprocess.run(cmd + ["--t0", repr(t0)], check=True, env=env, timeout=args.timeout)
        with open(out) as f:
            return json.load(f)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        return {"error": str(e)[:300]}
    finally:
        os.remove(out)


def cache_bytes(folder: str) -> dict:
    out = {}
    for part in ("xla", "weights", "programs"):
        n = 0
        for root, _, files in os.walk(os.path.join(folder, part)):
            n += sum(os.path.getsize(os.path.join(root, f)) for f in files)
        out[part] = n
    return out


def machine() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        names = [ln.split(":", 1)[1].strip() for ln in out.splitlines()
                 if ln.startswith("Model name")]
        return f"{names[0] if names else platform.processor()}, {os.cpu_count()} CPUs"
    except OSError:
        return platform.processor()


def commit() -> str:
    try:
        return subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True).stdout.strip() or "?"
    except OSError:
        return "?"


def report(args, results: list[tuple[str, str, dict]], loads) -> str:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"## Startup, {machine()} ({now}, commit {commit()})", "",
             f"`python benchmarks/bench_startup.py {' '.join(sys.argv[1:])}`: a new process loads "
             f"{args.folder} and speaks one sentence ({args.frames} frames, greedy) to 24 kHz "
             f"samples, codec included; seconds from the process's start. Load average "
             f"{'/'.join(f'{x:.2f}' for x in loads[0])} at start, "
             f"{'/'.join(f'{x:.2f}' for x in loads[1])} at end. Weights cache "
             f"{'off' if args.no_weights_cache else 'on'}; serialized programs "
             f"{'off' if args.no_programs else 'on'}"
             f"{', read ahead' if args.preload else ''}.", "",
             "| variant | cache | import s | load s | first call s | to first audio s "
             "| second call s | first - second s | trace s | lower s | XLA compile s "
             "| cache hits / writes |", "|" + " --- |" * 12]
    for variant, run, r in results:
        if "error" in r:
            lines.append(f"| {variant} | {run} | failed: {r['error'][:80]} |" + " |" * 9)
            continue
        tot = {k: sum(p.get(k, 0.0) for p in r["phases"].values())
               for k in ("trace_s", "lower_s", "backend_compile_s", "cache_hits",
                         "cache_writes")}
        lines.append(f"| {variant} | {run} | {r['import_s']:.1f} | {r['load_s']:.1f} "
                     f"| {r['first_s']:.1f} | **{r['to_first_audio_s']:.1f}** "
                     f"| {r['second_s']:.1f} | {r['first_s'] - r['second_s']:.1f} "
                     f"| {tot['trace_s']:.1f} | {tot['lower_s']:.1f} "
                     f"| {tot['backend_compile_s']:.1f} "
                     f"| {int(tot['cache_hits'])} / {int(tot['cache_writes'])} |")
    lines.append("")
    for variant, run, r in results:
        if "error" in r:
            continue
        ld = r["phases"]["load"]
        parts = ", ".join(f"{k[:-2].replace('_', ' ')} {ld[k]:.1f} s" for k in (
            "read_checkpoint_s", "pack_s", "weights_cache_read_s", "weights_cache_write_s",
            "codec_load_s", "tokenizer_s", "trace_s", "lower_s", "backend_compile_s")
            if ld.get(k, 0) >= 0.05)
        calls = "; ".join(
            f"{name} call: codes {r['phases'][name].get('codes_s', 0):.1f} s, codec "
            f"{r['phases'][name].get('codec_decode_s', 0):.1f} s" for name in ("first", "second"))
        lines.append(f"- {variant}, {run}: load = {parts or 'nothing measurable'}; {calls}; "
                     f"{r['audio_s']:.2f} s of audio; python up after {r['interpreter_s']:.1f} "
                     f"s; second call's audio identical to the first: {r['same_audio']}; "
                     f"cache folder {r.get('cache_mb', 0):.0f} MB; serialized programs: "
                     f"{r.get('programs')}.")
    lines.append("")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--folder", default="/tmp/ckpt0b6",
                    help="checkpoint folder (bench_scale.py --role build makes a full-size one)")
    ap.add_argument("--variants", default="f32,int8", help=f"comma-separated, of {list(VARIANTS)}")
    ap.add_argument("--frames", type=int, default=12, help="frames per call (12: 0.96 s of audio)")
    ap.add_argument("--runs", type=int, default=2,
                    help="processes per variant on one cache folder (the first starts empty)")
    ap.add_argument("--cache", default=None,
                    help="cache folder to use (default: a new empty temporary one per variant)")
    ap.add_argument("--no-weights-cache", action="store_true",
                    help="load without the packed-weights cache (compiled programs only)")
    ap.add_argument("--no-programs", action="store_true",
                    help="load without serialized programs (from_pretrained(compile_cache=)): "
                         "JAX's jit with the persistent compilation cache only")
    ap.add_argument("--preload", action="store_true",
                    help="serialized programs read ahead in a thread while the weights load "
                         "(`Executables.preload`), not when first called")
    ap.add_argument("--min-compile-secs", type=float, default=None,
                    help="programs that compile faster are not kept on disk (default: "
                         "enable_compilation_cache's)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per child")
    ap.add_argument("--results", default=os.path.join(HERE, "RESULTS.md"),
                    help="append the section here ('' for none)")
    ap.add_argument("--json", default=None, help="also write every figure here")
    ap.add_argument("--role", choices=["child"], help=argparse.SUPPRESS)
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    ap.add_argument("--t0", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.role:
        res = run_child(args)
        with open(args.out, "w") as f:
            json.dump(res, f)
        return

    loads = [os.getloadavg()]
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_startup_") as tmp:
        for variant in args.variants.split(","):
            cache = args.cache or os.path.join(tmp, variant)
            for i in range(args.runs):
                run = "empty" if i == 0 and not args.cache else f"warm {i}" if not args.cache \
                    else f"given {i + 1}"
                r = child(args, variant, cache)
                if "error" not in r:
                    r["cache_mb"] = sum(cache_bytes(cache).values()) / 2**20
                    log(f"{variant} {run}: import {r['import_s']:.1f} s, load {r['load_s']:.1f} "
                        f"s, first call {r['first_s']:.1f} s, to first audio "
                        f"{r['to_first_audio_s']:.1f} s, second call {r['second_s']:.1f} s")
                else:
                    log(f"{variant} {run}: {r['error']}")
                results.append((variant, run, r))
    loads.append(os.getloadavg())
    section = report(args, results, loads)
    print(section)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{"variant": v, "run": n, **r} for v, n, r in results], f)
    if args.results:
        sys.path.insert(0, HERE)
        from bench_generate import append_results
        append_results(args.results, section)


if __name__ == "__main__":
    main()
