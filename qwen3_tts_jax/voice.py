"""Cloned voices: the official `VoiceClonePromptItem`, and a file format to encode a voice once and
reuse it.

File format (`save_voice` / `load_voice`): one safetensors file holding N items.
  tensors   "{i}.ref_spk_embedding"  float32 (D,)      the x-vector (speaker encoder output)
            "{i}.ref_code"           int32 (T, 16)     reference codes (ICL items only)
  metadata  "format": "qwen3-tts-jax voice v1", "count": N,
            "{i}.x_vector_only_mode", "{i}.icl_mode": "true"/"false", "{i}.ref_text": the transcript
The x-vector's width is the talker's hidden size, so a voice fits only checkpoints of that width
(`Qwen3TTS.generate_voice_clone` checks it).
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

FORMAT = "qwen3-tts-jax voice v1"


@dataclasses.dataclass
class VoiceClonePromptItem:
    """One reference voice, as the official `create_voice_clone_prompt` returns it."""
    ref_code: np.ndarray | None          # (T, 16) int32, ICL mode only
    ref_spk_embedding: np.ndarray        # (D,) float32
    x_vector_only_mode: bool
    icl_mode: bool
    ref_text: str | None = None


def save_voice(items: list[VoiceClonePromptItem], path: str) -> None:
    """Write items atomically (temp file + rename)."""
    tensors, meta = {}, {"format": FORMAT, "count": str(len(items))}
    for i, it in enumerate(items):
        tensors[f"{i}.ref_spk_embedding"] = np.asarray(it.ref_spk_embedding, np.float32)
        if it.ref_code is not None:
            tensors[f"{i}.ref_code"] = np.asarray(it.ref_code, np.int32)
        meta[f"{i}.x_vector_only_mode"] = str(bool(it.x_vector_only_mode)).lower()
        meta[f"{i}.icl_mode"] = str(bool(it.icl_mode)).lower()
        if it.ref_text is not None:
            meta[f"{i}.ref_text"] = it.ref_text
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
    except BaseException:               # a full disk, Ctrl-C, ...: leave no half-written temp file
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_voice(path: str) -> list[VoiceClonePromptItem]:
    try:
        with safe_open(path, framework="np") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise ValueError(f"{path} is not a qwen3-tts-jax voice file (format "
                                 f"{meta.get('format')!r}, expected {FORMAT!r})")
            keys = set(f.keys())
            items = []
            for i in range(int(meta["count"])):
                code = f.get_tensor(f"{i}.ref_code") if f"{i}.ref_code" in keys else None
                items.append(VoiceClonePromptItem(
                    ref_code=code, ref_spk_embedding=f.get_tensor(f"{i}.ref_spk_embedding"),
                    x_vector_only_mode=meta[f"{i}.x_vector_only_mode"] == "true",
                    icl_mode=meta[f"{i}.icl_mode"] == "true",
                    ref_text=meta.get(f"{i}.ref_text")))
            return items
    except (OSError, KeyError) as e:
        raise ValueError(f"cannot read voice file {path}: {e}") from None
    except Exception as e:
        if isinstance(e, ValueError):
            raise
        raise ValueError(f"cannot read voice file {path}: {e} (corrupt?)") from None
