#!/usr/bin/env bash
# Sets up qwen3-tts-jax in ./.venv on a fresh machine.
#   bash scripts/setup.sh          the package and its runtime dependencies (JAX on CPU)
#   bash scripts/setup.sh --test   also pytest, ruff (`.venv/bin/ruff check .`, as CI runs it), the
#                                  official PyTorch reference stack (CPU torch, qwen-tts 0.1.1)
#                                  that the parity tests compare against, and (apt, where it can)
#                                  espeak-ng and the headless Chromium of the playground test
# On a CUDA 12 machine, add the GPU build of JAX afterwards: .venv/bin/pip install -e ".[cuda12]"
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
if [ "${1:-}" = "--test" ]; then
  # espeak-ng records the speech-like reference audio of the cloning tests (they fall back to a
  # synthetic voice without it).
  if ! command -v espeak-ng >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    { apt-get update -qq && apt-get install -y -qq espeak-ng; } >/dev/null 2>&1 \
      || echo "espeak-ng not installed: the tests use synthetic speech instead"
  fi
  # Debian's chromium and chromium-driver: tests/test_playground.py drives the page that `serve`
  # shows at / in headless Chromium (it skips without them).
  if ! command -v chromedriver >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium \
        chromium-driver; } >/dev/null 2>&1 \
      || echo "chromium not installed: tests/test_playground.py will be skipped"
  fi
  python -m pip install -q -e ".[test]"
  python -c "import qwen_tts" >/dev/null 2>&1 || bash scripts/install_reference.sh
else
  python -m pip install -q -e .
fi
python -c "import jax, qwen3_tts_jax; print('qwen3-tts-jax ready: jax', jax.__version__, jax.default_backend())"
