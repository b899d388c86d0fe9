"""qwen3-tts-jax: Qwen3-TTS text-to-speech in JAX.

    from qwen3_tts_jax import Qwen3TTS
    tts = Qwen3TTS.from_pretrained("Qwen/Qwen3-TTS-12Hz-0.6B-CustomVoice")
    wavs, sr = tts.generate_custom_voice("Hello.", speaker="ryan", language="english")
"""
import importlib

# name -> module: imported on first use, so that `import qwen3_tts_jax` (and the command line's
# `--help`, or a Ctrl-C at its start) does not wait for JAX; the codes-only path never loads the
# codec.
_EXPORTS = {
    "Qwen3TTS": "api", "GenerationSettings": "settings", "SettingError": "settings",
    "BudgetReached": "budget",
    "enable_compilation_cache": "compilation_cache",
    "ConfigError": "config", "CheckpointError": "weights", "SpeechTokenizer": "codec",
    "VoiceClonePromptItem": "voice", "load_voice": "voice", "save_voice": "voice",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
