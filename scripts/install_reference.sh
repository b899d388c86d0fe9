#!/usr/bin/env bash
# Installs the official Qwen3-TTS PyTorch stack (qwen-tts 0.1.1, CPU torch 2.13.0) into the active
# Python environment, for parity tests and side-by-side benchmarks. Never pulls a CUDA torch.
# Usage: bash scripts/install_reference.sh   (inside the virtual environment the tests use;
#        scripts/setup.sh --test runs it). A copy of the recipe in the shared reference notes.
set -euo pipefail
python -m pip install -q torch==2.13.0
python -m pip install -q --no-deps qwen-tts==0.1.1
python -m pip install -q "transformers==4.57.3" "accelerate==1.12.0" librosa soundfile einops onnxruntime sox
# `import qwen_tts` also imports the unused 25 Hz tokenizer, which imports torchaudio; no build of
# torchaudio matches torch 2.13, and its native library wants CUDA. Without the .so files it
# imports as pure Python, which is all that the import needs.
python -m pip install -q --no-deps torchaudio==2.11.0
site=$(python -c "import torchaudio, os; print(os.path.dirname(torchaudio.__file__))" 2>/dev/null || \
       python -c "import site; print(site.getsitepackages()[0] + '/torchaudio')")
rm -f "$site"/lib/*.so
python - <<'PY'
import torch, qwen_tts, transformers
assert "+cpu" in torch.__version__ or not torch.cuda.is_available(), torch.__version__
print("official reference ready: torch", torch.__version__, "| transformers", transformers.__version__)
PY
