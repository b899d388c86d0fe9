"""qwen3-tts-jax: Qwen3-TTS text-to-speech in JAX.

    from qwen3_tts_jax import Qwen3TTS
    tts = Qwen3TTS.from_pretrained("Qwen/Qwen3-TTS-12Hz-0.6B-CustomVoice")
    wavs, sr = tts.generate_custom_voice("Hello.", speaker="ryan", language="english")
"""
from .api import GenerationSettings, Qwen3TTS, enable_compilation_cache
from .config import ConfigError
from .voice import VoiceClonePromptItem, load_voice, save_voice
from .weights import CheckpointError

__all__ = ["Qwen3TTS", "GenerationSettings", "CheckpointError", "ConfigError", "SpeechTokenizer",
           "enable_compilation_cache", "VoiceClonePromptItem", "load_voice", "save_voice"]


def __getattr__(name):
    if name == "SpeechTokenizer":  # the codec loads lazily: the codes-only path does not need it
        from .codec import SpeechTokenizer

        return SpeechTokenizer
    raise AttributeError(name)
