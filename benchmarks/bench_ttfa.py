"""Time to first audio through the public streaming paths, one process, warm:

    python benchmarks/bench_ttfa.py --folder /tmp/ckpt0b6 [--quantize int8] [--runs 5]
    python benchmarks/bench_ttfa.py --folder /tmp/ckpt17srv --build 1b7     # gpu_session.sh icl

  api     `generate_custom_voice_streaming` of one sentence, in the official default text mode
          of custom voice (non-streaming: the whole text in the prompt) and in the streaming text
          mode (`non_streaming_mode=False`: a token per frame), with a first chunk of 1 and of 3
          frames; then where the streaming-mode 1-frame time goes (prefill, one frame, the
          streaming codec's decode of it).
  clone   `engine.BatchEngine` (the server's path, batch 1, first chunk 1 frame), streaming text
          mode: a preset speaker against a cloned voice (ICL: a random x-vector and 63 random
          reference frames, 5 s of reference, a 10-word transcript) with both per-voice caches
          off, both cold (cleared before the request) and both warm: the talker's prompt-prefix
          KV (`prefix_cache.PrefixCache`) and the codec's state after the reference codes
          (`codec.PrefixStates`). The kinds run in turn, --runs rounds; medians.

The checkpoint is any full-size CustomVoice folder with a tokenizer (random weights: the clone's
prompt is built with `prompts.build_prompt`, so its talker and codec work are a Base model's).
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import threading
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TEXT = "Hello there, this is a test of the streaming path, with a sentence of middling length."
REF = "I went to the market this morning to buy bread."


def median_ms(xs) -> str:
    return f"{1000 * statistics.median(xs):.0f}"


def api_table(tts, runs: int) -> list[str]:
    import jax

    from qwen3_tts_jax import generate as gen, runner

    kw = dict(speaker="ryan", language="english", do_sample=False, subtalker_dosample=False,
              max_new_tokens=40)

    def ttfa(nsm, first):
        t = time.perf_counter()
        g = tts.generate_custom_voice_streaming(TEXT, non_streaming_mode=nsm,
                                                first_chunk_frames=first, **kw)
        next(g)
        dt = time.perf_counter() - t
        g.close()
        return dt

    out = ["| text mode | first chunk frames | TTFA ms (median) | min ms |", "| --- | --- | --- | --- |"]
    for nsm in (True, False):
        for first in (1, 3):
            ttfa(nsm, first), ttfa(nsm, first)
            xs = [ttfa(nsm, first) for _ in range(runs)]
            out.append(f"| {'non-streaming (default)' if nsm else 'streaming'} | {first} | "
                       f"{median_ms(xs)} | {1000 * min(xs):.0f} |")
            print(out[-1], flush=True)
    items = tts.custom_voice_prompts(TEXT, "ryan", "english", None, False)
    settings = tts._settings(dict(do_sample=False, subtalker_dosample=False, max_new_tokens=40))
    batch, rs, ks = runner.prepare(tts.config, tts.options, items, settings)
    cap = gen.capacity(39, tts.options)
    codec = tts.speech_tokenizer.stream_decoder()

    def parts():
        t0 = time.perf_counter()
        st, ctx = gen.prefill(tts.params, tts.config, batch, rs, ks, frames=cap,
                              options=tts.options)
        jax.block_until_ready(st.token_B)
        t1 = time.perf_counter()
        st = gen.decode(tts.params, tts.config, st, ctx, rs, 1, tts.options)
        jax.block_until_ready(st.codes_BxFxG)
        t2 = time.perf_counter()
        codec.reset(0)
        codec.push([np.asarray(st.codes_BxFxG[0, :1])])
        return t1 - t0, t2 - t1, time.perf_counter() - t2

    parts(), parts()
    p = np.median([parts() for _ in range(runs)], axis=0)
    out.append("")
    out.append(f"Streaming text mode, 1 frame ({int(np.asarray(batch.mask_BxL).sum())} prompt "
               f"positions): prefill {1000 * p[0]:.0f} ms, first frame {1000 * p[1]:.0f} ms, "
               f"the codec's decode of it {1000 * p[2]:.0f} ms.")
    return out


def clone_table(tts, runs: int) -> list[str]:
    from qwen3_tts_jax import prompts
    from qwen3_tts_jax.engine import BatchEngine, Job
    from qwen3_tts_jax.settings import GenerationSettings
    from qwen3_tts_jax.text import ref_text

    cfg = tts.config
    rng = np.random.default_rng(0)
    codebook = tts.speech_tokenizer.config.decoder.codebook_size
    ref_code = rng.integers(0, codebook, (63, 16)).astype(np.int32)
    xvec = (rng.standard_normal(cfg.talker.hidden_size) * 0.02).astype(np.float32)
    ids = prompts.input_ids(tts.tokenizer, TEXT)
    icl = prompts.build_prompt(cfg, ids, "english", None, None, False, xvector=xvec,
                               ref_ids=tts.tokenizer.encode(ref_text(REF)), ref_code=ref_code)
    preset = tts.custom_voice_prompts(TEXT, "ryan", "english", None, False)[0]
    settings = GenerationSettings.merge(tts.generate_defaults, max_new_tokens=8, do_sample=False,
                                        subtalker_dosample=False)
    engine = BatchEngine(tts, max_batch_size=1, batch_window=0.0, first_chunk_frames=1)
    kv, states = tts.prefix_cache, tts.speech_tokenizer.prefix_states
    limits = kv.max_bytes, states.max_bytes

    def ttfa(prompt, rc):
        first, done = [None], threading.Event()

        def emit(a):
            if a is None or isinstance(a, Exception):
                done.set()
            elif first[0] is None:
                first[0] = time.perf_counter()
        t = time.perf_counter()
        engine.submit(Job(prompt, settings, emit, seed=0, ref_code=rc))
        done.wait(600)
        return first[0] - t

    def caches(on: bool) -> None:
        kv.clear()
        states.clear()
        kv.max_bytes, states.max_bytes = limits if on else (0, 0)

    def off():
        caches(False)
        try:
            return ttfa(icl, ref_code)
        finally:
            caches(True)

    def cold():
        caches(True)
        return ttfa(icl, ref_code)

    kinds = {"preset speaker": lambda: ttfa(preset, None), "clone, caches off": off,
             "clone, caches cold": cold, "clone, caches warm": lambda: ttfa(icl, ref_code)}
    engine.start()
    try:
        for _ in range(2):
            for f in kinds.values():
                f()
        res = {k: [] for k in kinds}
        for _ in range(runs):
            for k, f in kinds.items():
                res[k].append(f())
    finally:
        engine.stop()
    base = statistics.median(res["preset speaker"])
    out = [f"Prompt positions: preset {len(preset)}, clone {len(icl)} (of which "
           f"{icl.prefix_len} the stored prefix).", "",
           "| request | TTFA ms (median) | against the preset speaker |", "| --- | --- | --- |"]
    for k, v in res.items():
        out.append(f"| {k} | {median_ms(v)} | {statistics.median(v) / base:.2f}x |")
        print(out[-1], flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--folder", default="/tmp/ckpt0b6")
    ap.add_argument("--quantize", choices=["int8", "int4"], default=None)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--parts", default="api,clone")
    ap.add_argument("--build", choices=["tiny", "0b6", "1b7"], default=None,
                    help="build a random-weight CustomVoice checkpoint of these shapes into "
                         "--folder first if it has none (bench_server.py's builder)")
    args = ap.parse_args(argv)
    sys.path.insert(0, ROOT)
    from qwen3_tts_jax import Qwen3TTS

    if args.build and not os.path.exists(os.path.join(args.folder, "config.json")):
        sys.path.insert(0, HERE)
        from bench_server import build_checkpoint
        build_checkpoint(args.folder, args.build)

    load0 = os.getloadavg()[0]
    tts = Qwen3TTS.from_pretrained(args.folder, quantize=args.quantize)
    lines = []
    if "api" in args.parts:
        lines += api_table(tts, args.runs) + [""]
    if "clone" in args.parts:
        lines += clone_table(tts, args.runs)
    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    print(f"\n{time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC, commit {commit}, "
          f"{args.quantize or 'float32'}, load average {load0:.1f} -> {os.getloadavg()[0]:.1f}")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
