"""Codes per second through the public API only (`Qwen3TTS.generate_custom_voice_codes`), so that
two versions of the library are timed by the same script:

    cd <checkout> && PYTHONPATH=$PWD python benchmarks/bench_api.py CKPT out.json

CKPT: a checkpoint folder with a text tokenizer (e.g. `bench_scale.py --role build` plus the
tokenizer files of `qwen3_tts_jax.demo.build`). Greedy, 41 tokens (40 frames) per row, batch 1
and 8; best of 3 runs after one that compiles. Prints and writes {batch: frames/s}."""
import json
import sys
import time

import jax.numpy as jnp

from qwen3_tts_jax import Qwen3TTS


def main(folder: str, out: str) -> None:
    tts = Qwen3TTS.from_pretrained(folder, jnp.float32)
    result = {}
    for B in (1, 8):
        texts = [f"Hello there number {i}, this is a speed test of the library." for i in range(B)]
        kw = dict(speaker="ryan", language="english", do_sample=False, subtalker_dosample=False,
                  max_new_tokens=41, seed=0)
        tts.generate_custom_voice_codes(texts, **kw)          # compiles
        times = []
        for _ in range(3):
            t = time.perf_counter()
            codes = tts.generate_custom_voice_codes(texts, **kw)
            times.append(time.perf_counter() - t)
        frames = sum(len(c) for c in codes)
        result[B] = frames / min(times)
        print(B, frames, [round(x, 2) for x in times], round(result[B], 3), flush=True)
    with open(out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(*sys.argv[1:3])
