"""Convert a Qwen3-TTS checkpoint folder once into the fast-loading form.

    python -m convert SRC DST [--dtype bfloat16|float32]

SRC is a released checkpoint folder (or hub id). DST gets a copy of every non-weight file (configs,
tokenizer files), `jax_params.safetensors` (the talker and code predictor under our names, already
transposed and cast) instead of model.safetensors, and speech_tokenizer/ in the codec's fast form.
`Qwen3TTS.from_pretrained(DST)` then loads with no conversion work.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys


def convert(src: str, dst: str, dtype: str = "bfloat16") -> str:
    import jax.numpy as jnp

    from qwen3_tts_jax import checkpoint
    from qwen3_tts_jax.codec import SpeechTokenizer
    from qwen3_tts_jax.config import load_config

    folder = checkpoint.resolve(src)
    if os.path.realpath(folder) == os.path.realpath(dst):
        raise ValueError(f"DST {dst!r} is the source checkpoint: give a new folder")
    if os.path.exists(dst) and not os.path.isdir(dst):
        raise ValueError(f"DST {dst!r} is an existing file, not a folder")
    cfg = load_config(folder)
    params = checkpoint.load_params(folder, cfg, {"bfloat16": jnp.bfloat16,
                                                  "float32": jnp.float32}[dtype])
    os.makedirs(dst, exist_ok=True)
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if os.path.isfile(path) and not name.startswith("model.safetensors"):
            shutil.copy2(path, os.path.join(dst, name))
    checkpoint.save_fast(params, dst, source=os.path.abspath(folder))
    codec_src = os.path.join(folder, "speech_tokenizer")
    if os.path.isdir(codec_src):
        codec_dst = os.path.join(dst, "speech_tokenizer")
        SpeechTokenizer.from_pretrained(codec_src).save_converted(codec_dst)
        for name in os.listdir(codec_src):
            if name.endswith(".json") and name != "config.json":
                shutil.copy2(os.path.join(codec_src, name), os.path.join(codec_dst, name))
    return dst


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="checkpoint folder or hub id")
    p.add_argument("dst", help="output folder")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    a = p.parse_args(argv)
    from qwen3_tts_jax.config import ConfigError
    from qwen3_tts_jax.weights import CheckpointError

    try:
        out = convert(a.src, a.dst, a.dtype)
    except (CheckpointError, ConfigError, ValueError, OSError) as e:  # FileNotFoundError is one
        print(f"convert: error: {e}", file=sys.stderr)
        return 2
    print(f"converted {a.src} -> {out} ({a.dtype})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
