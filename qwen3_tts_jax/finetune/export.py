"""The fine-tuned checkpoint: a CustomVoice folder in the official layout (official sft_12hz.py).

    OUTPUT/checkpoint-epoch-N/
      config.json          the Base config with tts_model_type "custom_voice",
                           talker_config.spk_id = {NAME: 3000}, spk_is_dialect = {NAME: false}
      model.safetensors    every talker.* tensor of the Base checkpoint, trained, in its original
                           dtype and key names; no speaker_encoder.*; codec_embedding row 3000 =
                           the speaker's x-vector
      ...                  everything else of the Base folder, copied (tokenizer, speech_tokenizer/,
                           generation_config.json, ...)

Both `Qwen3TTS.from_pretrained` and the official `Qwen3TTSModel.from_pretrained` load it;
`generate_custom_voice(text, speaker=NAME)` then puts row 3000 at the speaker slot, which is
exactly the x-vector the model was trained with.
"""
from __future__ import annotations

import json
import os
import re
import shutil

import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from .. import checkpoint, weights
from ..config import load_config

SPEAKER_ID = 3000            # hard-coded by the official sft_12hz.py
# Files of the Base folder that must not be copied: the weights are rewritten, and our fast form
# (convert/) would hold the untrained Base weights and be preferred by our loader.
_SKIP = re.compile(r"^(model.*\.safetensors(\.index\.json)?|jax_params\.safetensors)$")
_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "F64": np.float64}


def check_base(init_model: str, speaker_name: str):
    """(folder, config, speaker name lowercased) or ValueError: the checkpoint must be a Base
    one (it has the speaker encoder) and the name must be usable and new."""
    folder = checkpoint.resolve(init_model)
    cfg = load_config(folder)
    if cfg.tts_model_type != "base":
        raise ValueError(f"{init_model} is a {cfg.tts_model_type} checkpoint; fine-tuning a voice "
                         "starts from a Base checkpoint (e.g. Qwen/Qwen3-TTS-12Hz-0.6B-Base), "
                         "which has the speaker encoder")
    name = (speaker_name or "").strip()
    if not name or any(c.isspace() for c in name) or not name.isprintable():
        raise ValueError(f"speaker name {speaker_name!r} must be non-empty, without spaces")
    # The official generate_custom_voice looks up speaker.lower() in spk_id, so a key with capitals
    # could never be found: store it lowercased.
    name = name.lower()
    if name in cfg.speakers:
        raise ValueError(f"speaker name {name!r} is already a speaker of {init_model}; choose "
                         f"another (taken: {sorted(cfg.speakers)})")
    if name in cfg.languages or name in {k.lower() for k in cfg.talker.codec_language_id}:
        raise ValueError(f"speaker name {name!r} is a language name of {init_model}; choose another")
    t = cfg.talker
    used = {v: f"speaker {k!r}" for k, v in t.spk_id.items()}
    used.update({v: f"language {k!r}" for k, v in t.codec_language_id.items()})
    if SPEAKER_ID in used or SPEAKER_ID >= t.vocab_size:
        raise ValueError(f"codec id {SPEAKER_ID} (the official fine-tuned speaker slot) is "
                         f"{used.get(SPEAKER_ID, 'outside the codec vocabulary')} in {init_model}")
    return folder, cfg, name


def _lookup(tree, path: str):
    """params["a"]["b"][3]...: list indices and indices into stacked arrays alike."""
    node = tree
    for part in path.split("/"):
        node = node[part] if isinstance(node, dict) else node[int(part)]
    return node


def official_tensors(init_folder: str, params) -> dict[str, np.ndarray]:
    """Our trained params back under the Base checkpoint's official keys (talker.* only), each in
    its original dtype and layout."""
    files = weights.safetensors_files(init_folder)
    out = {}
    for file in files:
        with safe_open(file, framework="np") as f:
            for k in f.keys():
                if not k.startswith("talker."):
                    continue
                dst, transform = weights.map_key(checkpoint.RULES, k)
                a = np.asarray(_lookup(params, dst), np.float32)
                if transform == "linear":
                    a = a.T
                out[k] = np.ascontiguousarray(a.astype(_DTYPES[f.get_slice(k).get_dtype()]))
    return out


def export_checkpoint(init_folder: str, out_folder: str, params, cfg, speaker: str,
                      xvector) -> str:
    """Write the CustomVoice folder (see the module docstring) to `out_folder`; built beside it
    and renamed into place, so a kill never leaves half a checkpoint. Returns out_folder."""
    tmp = out_folder.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(init_folder, tmp, ignore=lambda d, names: [
        n for n in names if d == init_folder and _SKIP.match(n)])
    with open(os.path.join(init_folder, "config.json"), encoding="utf-8") as f:
        conf = json.load(f)
    conf["tts_model_type"] = "custom_voice"
    tc = conf.setdefault("talker_config", {})
    tc["spk_id"] = {speaker: SPEAKER_ID}
    tc["spk_is_dialect"] = {speaker: False}
    with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
        json.dump(conf, f, indent=2, ensure_ascii=False)
    tensors = official_tensors(init_folder, params)
    emb = tensors["talker.model.codec_embedding.weight"]
    emb[SPEAKER_ID] = np.asarray(xvector, np.float32).astype(emb.dtype)
    save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    if os.path.exists(out_folder):
        shutil.rmtree(out_folder)
    os.replace(tmp, out_folder)
    return out_folder
