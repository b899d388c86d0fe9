"""`python -m convert SRC DST [--dtype bfloat16|float32]` from a source checkout: the same as
`qwen3-tts-jax convert SRC DST` (qwen3_tts_jax/convert.py). This folder is not installed."""
import sys

from qwen3_tts_jax.convert import main

if __name__ == "__main__":
    sys.exit(main())
