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


VOICE_FIELDS = ("ref_code", "ref_spk_embedding", "x_vector_only_mode", "icl_mode", "ref_text")


def _broadcast(x, n: int, name: str) -> list:
    xs = list(x) if isinstance(x, (list, tuple)) else [x]
    if len(xs) == 1 and n > 1:
        xs = xs * n
    if len(xs) != n:
        raise ValueError(f"{name} has {len(xs)} values for {n} voices")
    return xs


def items_from_dict(d: dict) -> list[VoiceClonePromptItem]:
    """The official wrapper's dict form of voice_clone_prompt (one list per field, as its
    `_prompt_items_to_voice_clone_prompt` makes it) as items. `ref_text` (a list) may be added:
    ICL voices need their transcript."""
    missing = [k for k in VOICE_FIELDS[:4] if k not in d]
    unknown = sorted(set(d) - set(VOICE_FIELDS))
    if missing or unknown:
        raise TypeError(f"a voice_clone_prompt dict needs the keys {list(VOICE_FIELDS[:4])} "
                        f"(and may have 'ref_text'); missing {missing}, unknown {unknown}")
    emb = d["ref_spk_embedding"]
    n = len(emb) if isinstance(emb, (list, tuple)) else 1
    cols = [_broadcast(d.get(k), n, f"voice_clone_prompt[{k!r}]") for k in VOICE_FIELDS]
    return [VoiceClonePromptItem(None if code is None else np.asarray(code),
                                 np.asarray(x, np.float32), bool(xo), bool(icl), text)
            for code, x, xo, icl, text in zip(*cols)]


def as_items(voice_clone_prompt) -> list[VoiceClonePromptItem]:
    """Every form a voice_clone_prompt takes, as items: a voice file path (`save_voice`), the
    official dict form, one item or a list of items."""
    if isinstance(voice_clone_prompt, (str, os.PathLike)):
        return load_voice(os.fspath(voice_clone_prompt))
    if isinstance(voice_clone_prompt, dict):
        return items_from_dict(voice_clone_prompt)
    if isinstance(voice_clone_prompt, (list, tuple)):
        return list(voice_clone_prompt)
    return [voice_clone_prompt]


def check_items(items: list, hidden_size: int, groups: int, vocab: int) -> None:
    """Each item usable by a checkpoint of this talker width, code groups and codec vocabulary;
    a ValueError / TypeError naming the item and the problem otherwise."""
    for i, it in enumerate(items):
        if not all(hasattr(it, a) for a in VOICE_FIELDS):
            raise TypeError(f"voice_clone_prompt item {i} is a {type(it).__name__}; expected "
                            "the items of create_voice_clone_prompt, a voice file path, or "
                            f"the official dict form with keys {list(VOICE_FIELDS[:4])}")
        if np.shape(it.ref_spk_embedding) != (hidden_size,):
            raise ValueError(f"voice {i} has a {np.shape(it.ref_spk_embedding)} x-vector; this "
                             f"checkpoint needs ({hidden_size},): was it made with another model "
                             "size?")
        if not np.all(np.isfinite(np.asarray(it.ref_spk_embedding, np.float32))):
            raise ValueError(f"voice {i}'s x-vector (ref_spk_embedding) has NaN or inf values")
        if it.icl_mode and it.ref_code is not None and (
                not isinstance(it.ref_text, str) or not it.ref_text.strip()):
            raise ValueError(f"voice {i} is an ICL voice (reference codes) without ref_text: "
                             "the transcript of its reference audio is required in ICL mode")
        if it.icl_mode and it.ref_code is not None:
            code = np.asarray(it.ref_code)
            if (code.ndim != 2 or code.shape[1] != groups or not len(code)
                    or not np.issubdtype(code.dtype, np.integer)
                    or code.min() < 0 or code.max() >= vocab):
                raise ValueError(
                    f"voice {i}'s reference codes are {code.dtype} {code.shape} in "
                    f"[{code.min() if code.size else '-'}, {code.max() if code.size else '-'}]"
                    f"; this checkpoint needs integers (frames, {groups}) in [0, {vocab}) "
                    "(codes of its speech tokenizer, frames first)")
