"""The CPU peer qwentts.cpp (GGML, C++; the pip wheel `realtimetts-qwen-native-cpu`) beside us,
in one run, on the same full-size random-weight checkpoint and the same text.

    python benchmarks/bench_peer_cpu.py --folder /tmp/ckpt0b6 --gguf /tmp/peergguf \\
        --peer-python /work/peer-venv/bin/python --rounds 2 --runs 3 --json out.json

The peer needs its own virtual environment (the wheel, `gguf`, numpy), named by --peer-python;
`benchmarks/peer_gguf.py` (run with that python) converts our checkpoint into its GGUF files, F32
and Q8_0, unless --gguf already holds them.

Four configurations, each in its own subprocess (so that one model at a time is in memory), in
rounds: peer F32, ours float32, peer Q8_0, ours `quantize="int8"`, then again. Both at 2 threads
(the peer: `cpu_threads=2`; ours: JAX's CPU client on this machine's 2 cores), batch 1, greedy
(talker and code predictor), repetition penalty 1.05 (the checkpoint's default, applied by both),
FRAMES frames (the checkpoint's codec head never picks EOS, so both stop at the frame limit),
speaker ryan, English, non-streaming text mode (the whole text in the prompt: the peer's only
mode). Each subprocess loads, warms up (our compiles), then times RUNS repetitions of:

  codes        text to codes, prefill included, in frames/s. Ours: `generate_custom_voice_codes`.
               The peer: its own native timers of one buffered `synthesize` ([Perf] Total minus
               [Perf] CodecDecode: prompt build, prefill, talker, code predictor).
  whole        text to 24 kHz samples, codec included, in frames/s, timed around one call:
               ours `generate_custom_voice`, the peer `synthesize` (buffered).
  codec        seconds to decode the FRAMES frames (3.2 s of audio at 40) to samples. Ours:
               `decode` of the codes; the peer: [Perf] CodecDecode of the buffered run above.
  first audio  streaming time to the first audio chunk, from the call: ours
               `generate_custom_voice_streaming(first_chunk_frames=FIRST)`, the peer `stream`
               (its first chunk is one frame; FIRST defaults to 1 to match); ours in the
               official default text mode of `generate_custom_voice` (non-streaming: the whole
               text in the prompt), and in the streaming text mode (`non_streaming_mode=False`:
               the text fed one token per frame, the mode of text that arrives in pieces) in a
               column of its own.

Figures are medians over every round's runs. The text goes to both through their tokenizers: the
peer's GGUF carries a synthetic vocabulary in which the text's ids are known
(`peer_gguf.prompt_ids`), and ours gets a `tokenizers` BPE built from the same vocabulary, so both
prompts are the same ids (checked: the peer's dumped prompt ids, ours' tokenizer output).

Agreement: with --codes the peer also runs once with its debug dump (its codes; the dump slows
that run, which is not timed) and the greedy codes are compared with ours on the same weights:
the first frame where they differ, and the fraction of equal codes over the FRAMES frames. With
F32 and `--repetition-penalty 1.0` it checks the converter (identical codes, 39 of 39 frames on
2026-12-06); at the default 1.05 the codes differ from frame 1 on, because the peer's greedy path
skips the repetition penalty that the official (and ours) apply. Q8_0 against our int8 compares
two different quantizations.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
ROOT = os.path.dirname(HERE)
FRAME_RATE = 12.5
TEXT = "Hello world, quick test."          # no "as" (peer_gguf.prompt_ids)
SPEAKER, LANGUAGE = "ryan", "english"
CONFIGS = [("peer", "F32"), ("ours", "float32"), ("peer", "Q8_0"), ("ours", "int8")]
LABELS = {("peer", "F32"): "qwentts.cpp F32", ("ours", "float32"): "ours float32",
          ("peer", "Q8_0"): "qwentts.cpp Q8_0", ("ours", "int8"): "ours `--quantize int8`"}


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def median(xs):
    return statistics.median(xs) if xs else float("nan")


# ------------------------------------------------------------------------------------------------
# the peer (runs in the peer's virtual environment)
# ------------------------------------------------------------------------------------------------

def run_peer(args) -> dict:
    import numpy as np
    from qwentts_cpp_cpu import QwenTTS

    talker = os.path.join(args.gguf, f"talker-{args.quant}.gguf")
    codec = os.path.join(args.gguf, f"codec-{args.quant}.gguf")
    t = time.perf_counter()
    tts = QwenTTS(talker, codec, cpu_threads=args.threads)
    load_s = time.perf_counter() - t
    lines: list[str] = []
    tts.library.set_log_callback(lambda level, msg: lines.append(str(msg)))
    kw = dict(text=TEXT, lang=LANGUAGE, speaker=SPEAKER, max_new_tokens=args.frames, seed=0,
              do_sample=False, subtalker_do_sample=False, repetition_penalty=args.repetition_penalty)

    def perf(name: str) -> float:
        got = [ln for ln in lines if ln.startswith(f"[Perf] {name} ")]
        return float(got[-1].split()[2]) / 1000

    def buffered():
        lines.clear()
        t = time.perf_counter()
        wav, sr = tts.synthesize(**kw)
        whole = time.perf_counter() - t
        frames = int(round(len(wav) / 1920))
        return {"whole_s": whole, "codes_s": perf("Total") - perf("CodecDecode"),
                "codec_s": perf("CodecDecode"), "frames": frames, "sr": sr}

    def first_audio():
        t = time.perf_counter()
        chunks = tts.stream(**kw)
        chunk, _ = next(chunks)
        ttfa = time.perf_counter() - t
        chunks.close()
        return ttfa, len(chunk)

    out = {"load_s": load_s, "version": tts.library.version()}
    # warm-up (nothing compiles; first-call allocations): a full run with the debug dump when
    # the codes are wanted, else two frames
    if args.codes:
        with tempfile.TemporaryDirectory() as d:
            tts.synthesize(**kw, dump_dir=d)

            def read(name):
                with open(os.path.join(d, name + ".bin"), "rb") as f:
                    b = f.read()
                nd = int(np.frombuffer(b[:4], np.int32)[0])
                shape = np.frombuffer(b[4:4 + 4 * nd], np.int32)
                return np.frombuffer(b[4 + 4 * nd:], np.float32).reshape(shape)
            out["codes"] = read("codes-full").astype(int).tolist()
            out["prompt_ids"] = read("prompt-ids").astype(int).tolist()
    else:
        tts.synthesize(**dict(kw, max_new_tokens=2))
    first_audio()
    runs = []
    for _ in range(args.runs):
        r = buffered()
        r["ttfa_s"], r["first_chunk_samples"] = first_audio()
        runs.append(r)
        log(f"peer {args.quant}: {json.dumps(r)}")
    out["runs"] = runs
    return out


# ------------------------------------------------------------------------------------------------
# ours (runs in our environment)
# ------------------------------------------------------------------------------------------------

def synthetic_tokenizer(cfg: dict):
    """Our TextTokenizer over the peer's synthetic vocabulary (peer_gguf.vocabulary)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    sys.path.insert(0, HERE)
    import peer_gguf
    from qwen3_tts_jax import text as text_mod

    tokens, merges = peer_gguf.vocabulary(cfg)
    specials = [t for t in tokens if t.startswith("<|") and not t.startswith("<|peer-")]
    vocab = {t: i for i, t in enumerate(tokens)}
    backend = Tokenizer(models.BPE(vocab, [tuple(m.split(" ")) for m in merges]))
    split = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
             r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return text_mod.TextTokenizer(backend)


def run_ours(args) -> dict:
    import jax
    import numpy as np

    sys.path.insert(0, ROOT)
    sys.path.insert(0, HERE)
    import peer_gguf
    from qwen3_tts_jax import Qwen3TTS, prompts

    with open(os.path.join(args.folder, "config.json")) as f:
        cfg = json.load(f)
    t = time.perf_counter()
    tts = Qwen3TTS.from_pretrained(args.folder, quantize=None if args.quant == "float32"
                                   else args.quant)
    jax.block_until_ready(tts.params)
    load_s = time.perf_counter() - t
    tts.tokenizer = synthetic_tokenizer(cfg)
    want = peer_gguf.prompt_ids(cfg, TEXT)
    kw = dict(speaker=SPEAKER, language=LANGUAGE, max_new_tokens=args.frames, do_sample=False,
              subtalker_dosample=False, repetition_penalty=args.repetition_penalty)
    ids = prompts.input_ids(tts.tokenizer, TEXT)       # what the API feeds the model
    if ids != want:
        raise SystemExit(f"our tokenizer gives {ids}, the peer's {want}")

    def timed(f):
        t = time.perf_counter()
        x = f()
        return x, time.perf_counter() - t

    def first_audio(non_streaming_mode=None):
        t = time.perf_counter()
        chunks = tts.generate_custom_voice_streaming(TEXT, first_chunk_frames=args.first_chunk,
                                                     non_streaming_mode=non_streaming_mode, **kw)
        chunk = next(chunks)
        ttfa = time.perf_counter() - t
        chunks.close()
        return ttfa, len(np.asarray(chunk).reshape(-1))

    t = time.perf_counter()
    codes = tts.generate_custom_voice_codes(TEXT, **kw)
    tts.generate_custom_voice(TEXT, **kw)
    first_audio()
    first_audio(False)
    warm_s = time.perf_counter() - t
    runs = []
    for _ in range(args.runs):
        codes, codes_s = timed(lambda: tts.generate_custom_voice_codes(TEXT, **kw))
        _, codec_s = timed(lambda: tts.decode(codes))
        (wavs, sr), whole_s = timed(lambda: tts.generate_custom_voice(TEXT, **kw))
        r = {"codes_s": codes_s, "codec_s": codec_s, "whole_s": whole_s,
             "frames": int(len(codes[0])), "samples": int(len(wavs[0]))}
        r["ttfa_s"], r["first_chunk_samples"] = first_audio()
        r["ttfa_streaming_text_s"] = first_audio(False)[0]
        runs.append(r)
        log(f"ours {args.quant}: {json.dumps(r)}")
    return {"load_s": load_s, "warmup_s": warm_s, "runs": runs, "jax": jax.__version__,
            "codes": np.asarray(codes[0]).tolist()}


# ------------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------------

def child(args, who: str, quant: str, codes: bool) -> dict:
    python = args.peer_python if who == "peer" else sys.executable
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    cmd = [python, os.path.abspath(__file__), "--role", who, "--quant", quant, "--out", out,
           "--folder", args.folder, "--gguf", args.gguf, "--frames", str(args.frames),
           "--runs", str(args.runs), "--threads", str(args.threads),
           "--first-chunk", str(args.first_chunk),
           "--repetition-penalty", str(args.repetition_penalty)] + (["--codes"] if codes else [])
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    load_before = os.getloadavg()
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, timeout=args.timeout)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode}", "wall_s": wall}
    with open(out) as f:
        result = json.load(f)
    os.unlink(out)
    result.update(wall_s=wall, loadavg_before=load_before, loadavg_after=os.getloadavg())
    return result


def agreement(a, b) -> dict:
    n = min(len(a), len(b))
    first = next((i for i in range(n) if a[i] != b[i]), None)
    equal = sum(x == y for i in range(n) for x, y in zip(a[i], b[i]))
    return {"frames": n, "first_diverging_frame": first,
            "equal_codes": equal / (16 * n) if n else float("nan"),
            "equal_first_codebook": sum(a[i][0] == b[i][0] for i in range(n)) / n if n else 0}


def summarize(results: dict, frames: int) -> dict:
    rows = {}
    for key, rounds in results.items():
        runs = [r for res in rounds if "runs" in res for r in res["runs"]]
        if not runs:
            rows[key] = {"error": [res.get("error") for res in rounds]}
            continue
        rows[key] = {
            "codes_fps": median([r["frames"] / r["codes_s"] for r in runs]),
            "whole_fps": median([r["frames"] / r["whole_s"] for r in runs]),
            "codec_s": median([r["codec_s"] for r in runs]),
            "ttfa_s": median([r["ttfa_s"] for r in runs]),
            "ttfa_streaming_text_s": (median([r["ttfa_streaming_text_s"] for r in runs])
                                      if all("ttfa_streaming_text_s" in r for r in runs)
                                      else None),
            "first_chunk_samples": runs[0].get("first_chunk_samples"),
            "frames": sorted({r["frames"] for r in runs}), "n": len(runs),
            "load_s": median([res["load_s"] for res in rounds if "load_s" in res]),
            "loadavg": [res.get("loadavg_before") for res in rounds],
        }
    return rows


def table(rows: dict, agree: dict, frames: int) -> str:
    audio_s = frames / FRAME_RATE
    out = ["| | codes (frames/s, prefill incl.) | whole utterance incl. codec (frames/s) | "
           f"codec time for {audio_s:.1f} s of audio | streaming time to first audio | "
           "ours in the streaming text mode | runs |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
    for key in CONFIGS:
        k = f"{key[0]}:{key[1]}"
        r = rows.get(k)
        if r is None:
            continue
        if "error" in r:
            out.append(f"| {LABELS[key]} | failed: {r['error']} | | | | | |")
            continue
        st = r.get("ttfa_streaming_text_s")
        out.append(f"| {LABELS[key]} | {r['codes_fps']:.2f} | {r['whole_fps']:.2f} | "
                   f"{r['codec_s']:.2f} s | {r['ttfa_s']:.2f} s | "
                   f"{'' if st is None else f'{st:.2f} s'} | {r['n']} |")
    for k, a in agree.items():
        out.append("")
        out.append(f"Greedy codes, {k}: first differing frame {a['first_diverging_frame']} "
                   f"of {a['frames']}; equal codes {100 * a['equal_codes']:.1f} %, equal first "
                   f"codebook {100 * a['equal_first_codebook']:.1f} %.")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--folder", default="/tmp/ckpt0b6", help="our random-weight checkpoint")
    ap.add_argument("--gguf", default="/tmp/peergguf", help="the peer's GGUF files (made if absent)")
    ap.add_argument("--peer-python", default="/work/peer-venv/bin/python")
    ap.add_argument("--frames", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3, help="timed repetitions per subprocess")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--first-chunk", type=int, default=1, help="our first streamed chunk, frames")
    ap.add_argument("--configs", default="peer:F32,ours:float32,peer:Q8_0,ours:int8")
    ap.add_argument("--repetition-penalty", type=float, default=1.05)
    ap.add_argument("--codes", action="store_true", help="compare greedy codes (peer dump run)")
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--json", default=None, help="also write every figure here")
    ap.add_argument("--role", choices=["peer", "ours"], help=argparse.SUPPRESS)
    ap.add_argument("--quant", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.role:
        result = (run_peer if args.role == "peer" else run_ours)(args)
        with open(args.out, "w") as f:
            json.dump(result, f)
        return

    configs = [tuple(c.split(":")) for c in args.configs.split(",")]
    for quant in sorted({q for who, q in configs if who == "peer"}):
        if not os.path.exists(os.path.join(args.gguf, f"talker-{quant}.gguf")):
            subprocess.run([args.peer_python, os.path.join(HERE, "peer_gguf.py"), args.folder,
                            args.gguf, "--types", quant], check=True)
    started = datetime.datetime.now(datetime.timezone.utc)
    commit = git_commit()                   # the code as run (before any later commit)
    results: dict[str, list] = {f"{w}:{q}": [] for w, q in configs}
    codes: dict[str, list] = {}
    for rnd in range(args.rounds):
        for who, quant in configs:
            want_codes = args.codes and rnd == 0
            log(f"round {rnd + 1}/{args.rounds}: {who} {quant} (load {os.getloadavg()})")
            res = child(args, who, quant, want_codes)
            if "codes" in res:
                codes[f"{who}:{quant}"] = res.pop("codes")
            results[f"{who}:{quant}"].append(res)
    agree = {}
    import peer_gguf   # noqa: E402 (the prompt the peer tokenized)
    with open(os.path.join(args.folder, "config.json")) as f:
        want = peer_gguf.prompt_ids(json.load(f), TEXT)
    for key, rounds in results.items():
        for res in rounds:
            if "prompt_ids" in res and res["prompt_ids"] != want:
                raise SystemExit(f"{key}: the peer tokenized {res['prompt_ids']}, not {want}")
    for a, b in (("peer:F32", "ours:float32"), ("peer:Q8_0", "ours:int8"),
                 ("peer:Q8_0", "ours:float32"), ("peer:F32", "peer:Q8_0")):
        if a in codes and b in codes:
            agree[f"{a} vs {b}"] = agreement(codes[a], codes[b])
    rows = summarize(results, args.frames)
    report = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                          "processor": cpu_name()},
              "date": started.isoformat(timespec="seconds"), "commit": commit,
              "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
              "frames": args.frames, "text": TEXT, "rows": rows, "agreement": agree,
              "repetition_penalty": args.repetition_penalty, "codes": codes, "raw": results}
    print(table(rows, agree, args.frames))
    print("\nload average (1, 5, 15 min) before each subprocess: "
          + "; ".join(f"{k}: " + ", ".join("/".join(f"{x:.1f}" for x in la) for la in r["loadavg"])
                      for k, r in rows.items() if "loadavg" in r))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def git_commit() -> str:
    try:
        return subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True).stdout.strip()
    except OSError:
        return "?"


if __name__ == "__main__":
    main()
