"""Shared fixtures: tiny random-weight checkpoints in the official layout (built once per session
with the official code, see tests/official.py) and float32 JAX on CPU."""
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "float32")
sys.path.insert(0, os.path.dirname(__file__))

from official import SPECS, build_checkpoint, build_codec, build_text_tokenizer  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _drop_compiled_programs():
    """Each test module's compiled programs are dropped when it ends: the suite compiles
    thousands in one process, and each holds executable memory and its own memory maps."""
    yield
    jax.clear_caches()


@pytest.fixture(scope="session")
def ckpt_root(tmp_path_factory):
    return tmp_path_factory.mktemp("ckpts")


@pytest.fixture(scope="session")
def text_tokenizer(ckpt_root):
    return build_text_tokenizer(str(ckpt_root / "_tok"))


@pytest.fixture(scope="session")
def codec_dir(ckpt_root):
    path = str(ckpt_root / "_codec")
    build_codec(path)
    return path


@pytest.fixture(scope="session")
def make_checkpoint(ckpt_root, text_tokenizer, codec_dir):
    """make_checkpoint(name) -> path of the checkpoint for tests/official.py SPECS[name]."""
    built = {}

    def make(name):
        if name not in built:
            built[name] = build_checkpoint(str(ckpt_root / name), SPECS[name],
                                           codec_dir=codec_dir, tokenizer=text_tokenizer)
        return built[name]

    return make


@pytest.fixture(scope="session")
def model_pair(make_checkpoint):
    """model_pair(name) -> (official Qwen3TTSModel, our Qwen3TTS) for SPECS[name], loaded once."""
    from official import load_official
    from qwen3_tts_jax import Qwen3TTS

    loaded = {}

    def get(name):
        if name not in loaded:
            path = make_checkpoint(name)
            loaded[name] = (load_official(path), Qwen3TTS.from_pretrained(path))
        return loaded[name]

    return get
