"""`qwen3-tts-jax convert`: a checkpoint folder converted once into the fast-loading form
(registered in cli.EXTRA_COMMANDS).

    qwen3-tts-jax convert SRC DST [--dtype bfloat16|float32]

SRC is a released checkpoint folder (or hub id). DST gets a copy of every non-weight file (configs,
tokenizer files), `jax_params.safetensors` (the talker and code predictor under our names, already
transposed and cast) instead of model.safetensors, and speech_tokenizer/ in the codec's fast form.
`Qwen3TTS.from_pretrained(DST)` then loads with no conversion work.

Top-level imports stay light: `qwen3-tts-jax --help` imports this module.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys

DTYPES = ("bfloat16", "float32")
ABOUT = __doc__.split("\n\n")[2]        # the paragraph after the usage line


def convert(src: str, dst: str, dtype: str = "bfloat16") -> str:
    """Write the fast-loading form of checkpoint `src` (folder or hub id) to folder `dst`; returns
    `dst`. Bad input raises ValueError, FileNotFoundError/OSError, ConfigError or CheckpointError."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    import jax.numpy as jnp

    from . import checkpoint
    from .codec import SpeechTokenizer
    from .config import load_config

    folder = checkpoint.resolve(src)
    if os.path.realpath(folder) == os.path.realpath(dst):
        raise ValueError(f"DST {dst!r} is the source checkpoint: give a new folder")
    if os.path.exists(dst) and not os.path.isdir(dst):
        raise ValueError(f"DST {dst!r} is an existing file, not a folder")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise FileNotFoundError(f"SRC {src!r} has no config.json: not a Qwen3-TTS checkpoint folder")
    cfg = load_config(folder)
    params = checkpoint.load_params(folder, cfg, {"bfloat16": jnp.bfloat16,
                                                  "float32": jnp.float32}[dtype])
    codec_src = os.path.join(folder, "speech_tokenizer")
    codec = SpeechTokenizer.from_pretrained(codec_src) if os.path.isdir(codec_src) else None
    try:           # everything is read and checked: only writing is left
        os.makedirs(dst, exist_ok=True)
        for name in os.listdir(folder):
            path = os.path.join(folder, name)
            if os.path.isfile(path) and not name.startswith("model.safetensors"):
                shutil.copy2(path, os.path.join(dst, name))
        checkpoint.save_fast(params, dst, source=os.path.abspath(folder))
        if codec is not None:
            codec_dst = os.path.join(dst, "speech_tokenizer")
            codec.save_converted(codec_dst)
            for name in os.listdir(codec_src):
                if name.endswith(".json") and name != "config.json":
                    shutil.copy2(os.path.join(codec_src, name), os.path.join(codec_dst, name))
    except OSError as e:
        where = f" ({e.filename})" if e.filename and e.filename != dst else ""
        raise OSError(f"cannot write DST {dst!r}: {e.strerror or e}{where}") from e
    return dst


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", metavar="SRC", help="checkpoint folder or Hugging Face hub id")
    p.add_argument("dst", metavar="DST", help="output folder")
    p.add_argument("--dtype", default="bfloat16", choices=DTYPES,
                   help="dtype of the stored talker and code predictor weights (default bfloat16)")


def add_parser(sub, common) -> None:
    del common  # convert takes no generation options
    p = sub.add_parser("convert", help="convert a checkpoint once into the fast-loading form",
                       description=ABOUT,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _arguments(p)
    p.set_defaults(run=lambda args: run(args, "qwen3-tts-jax convert"))


def run(args: argparse.Namespace, prog: str) -> int:
    """Bad input ends with one line naming the problem (exit 2), not a traceback."""
    from .config import ConfigError
    from .weights import CheckpointError

    try:
        out = convert(args.src, args.dst, args.dtype)
    except (CheckpointError, ConfigError, ValueError, OSError) as e:  # FileNotFoundError is one
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted (DST {args.dst} may be incomplete)", file=sys.stderr)
        return 130
    print(f"converted {args.src} -> {out} ({args.dtype})")
    return 0


def main(argv=None) -> int:
    """`python -m convert SRC DST` from a source checkout (the same as `qwen3-tts-jax convert`)."""
    p = argparse.ArgumentParser(prog="python -m convert", description=ABOUT,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    _arguments(p)
    return run(p.parse_args(argv), "convert")


if __name__ == "__main__":
    sys.exit(main())
