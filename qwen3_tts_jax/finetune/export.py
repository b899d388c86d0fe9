"""The fine-tuned checkpoint: a CustomVoice folder in the official layout (official sft_12hz.py).

    OUTPUT/checkpoint-epoch-N/
      config.json          the Base config with tts_model_type "custom_voice",
                           talker_config.spk_id = {NAME: 3000, ...} (several speakers: the lowest
                           free ids from 3000; a CustomVoice start keeps its own speakers),
                           spk_is_dialect = {NAME: false, ...}
      model.safetensors    every talker.* tensor of the Base checkpoint, trained, in its original
                           dtype and key names; no speaker_encoder.*; codec_embedding row of
                           each speaker = its x-vector
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

from .. import checkpoint, lora, weights
from ..config import load_config
from . import data

SPEAKER_ID = 3000            # hard-coded by the official sft_12hz.py
# Files of the Base folder that must not be copied: the weights are rewritten, and our fast form
# (convert/) would hold the untrained Base weights and be preferred by our loader.
_SKIP = re.compile(r"^(model.*\.safetensors(\.index\.json)?|jax_params\.safetensors)$")
_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "F64": np.float64}


def _specials(t) -> dict[int, str]:
    out = {getattr(t, f): f for f in ("codec_eos_token_id", "codec_think_id", "codec_nothink_id",
                                      "codec_think_bos_id", "codec_think_eos_id", "codec_pad_id",
                                      "codec_bos_id")}
    out.update({v: f"language {k!r}" for k, v in t.codec_language_id.items()})
    return out


def check_init(init_model: str, names, replace: bool = False,
               speaker_encoder: str | None = None):
    """Check the starting checkpoint and the speaker names; returns (folder, config,
    {name: codec id} of the speakers this run writes, the folder whose speaker encoder makes the
    x-vectors). ValueError on any problem.

    The start is a Base checkpoint (it has the speaker encoder), or a CustomVoice one with
    `speaker_encoder` = a Base checkpoint of the same size: its speakers are kept, a new name is
    added, and an existing name is an error unless `replace` (it then keeps its codec id). Names
    are stored lowercased (the official looks up speaker.lower()). New names get the lowest free
    codec ids from 3000 (the official fine-tuned slot) up."""
    folder = checkpoint.resolve(init_model)
    cfg = load_config(folder)
    enc_folder = folder
    if cfg.tts_model_type == "custom_voice" and speaker_encoder:
        enc_folder = checkpoint.resolve(speaker_encoder)
        enc_cfg = load_config(enc_folder)
        if enc_cfg.tts_model_type != "base" or enc_cfg.speaker_encoder.enc_dim != cfg.talker.hidden_size:
            raise ValueError(f"--speaker-encoder {speaker_encoder} must be a Base checkpoint of "
                             f"the size of {init_model} (x-vectors of width "
                             f"{cfg.talker.hidden_size})")
    elif cfg.tts_model_type != "base":
        raise ValueError(f"{init_model} is a {cfg.tts_model_type} checkpoint; fine-tuning a voice "
                         "starts from a Base checkpoint (e.g. Qwen/Qwen3-TTS-12Hz-0.6B-Base), "
                         "which has the speaker encoder"
                         + (", or from a CustomVoice one with --speaker-encoder BASE (a Base "
                            "checkpoint of the same size)" if cfg.tts_model_type == "custom_voice"
                            else ""))
    t = cfg.talker
    # a Base checkpoint's own spk_id (none in released ones) is not carried over
    existing = cfg.speakers if cfg.tts_model_type == "custom_voice" else {}
    used = {v: f"speaker {k!r}" for k, v in existing.items()}
    used.update(_specials(t))
    ids = {}
    for raw in dict.fromkeys(names):
        why = data.check_speaker_name(raw)
        if why:
            raise ValueError(why)
        name = raw.lower()
        if name in cfg.languages or name in {k.lower() for k in t.codec_language_id}:
            raise ValueError(f"speaker name {name!r} is a language name of {init_model}; choose "
                             "another")
        if name in cfg.speakers and not (replace and name in existing):
            raise ValueError(f"speaker name {name!r} is already a speaker of {init_model}; choose "
                             f"another (taken: {sorted(cfg.speakers)})"
                             + (" or pass --replace-speaker" if name in existing else ""))
        if name in existing:
            ids[name] = existing[name]
            continue
        free = next((i for i in range(SPEAKER_ID, t.vocab_size) if i not in used), None)
        if free is None:
            raise ValueError(f"no free codec id from {SPEAKER_ID} up in {init_model} for speaker "
                             f"{name!r} (codec vocabulary {t.vocab_size})")
        ids[name] = free
        used[free] = f"speaker {name!r}"
    return folder, cfg, ids, enc_folder


def check_base(init_model: str, speaker_name: str):
    """(folder, config, speaker name lowercased): `check_init` for one speaker."""
    folder, cfg, ids, _ = check_init(init_model, [speaker_name])
    return folder, cfg, next(iter(ids))


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


def export_checkpoint(init_folder: str, out_folder: str, params, cfg, speaker,
                      xvector=None) -> str:
    """Write the CustomVoice folder (see the module docstring) to `out_folder`; built beside it
    and renamed into place, so a kill never leaves half a checkpoint. Returns out_folder.
    `speaker`: a name (with its `xvector`, at codec id 3000) or {name: (codec id, x-vector)}.
    The speakers of a CustomVoice `init_folder` are kept, with their rows as they were there."""
    rows = speaker if isinstance(speaker, dict) else {speaker: (SPEAKER_ID, xvector)}
    tmp = out_folder.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(init_folder, tmp, ignore=lambda d, names: [
        n for n in names if d == init_folder and _SKIP.match(n)])
    with open(os.path.join(init_folder, "config.json"), encoding="utf-8") as f:
        conf = json.load(f)
    conf = lora.with_speakers(conf, {n: i for n, (i, _) in rows.items()})
    tc = conf["talker_config"]
    spk = {k: v for k, v in tc["spk_id"].items() if k not in rows}
    with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
        json.dump(conf, f, indent=2, ensure_ascii=False)
    tensors = official_tensors(init_folder, params)
    key = "talker.model.codec_embedding.weight"
    emb = tensors[key]
    if spk:       # kept speakers: their rows as in the start checkpoint (no weight decay drift)
        with safe_open(_file_with(init_folder, key), framework="np") as f:
            start = f.get_tensor(key)
        for i in spk.values():
            emb[i] = start[i]
    for i, x in rows.values():
        emb[i] = np.asarray(x, np.float32).astype(emb.dtype)
    save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    if os.path.exists(out_folder):
        shutil.rmtree(out_folder)
    os.replace(tmp, out_folder)
    return out_folder


def _file_with(folder: str, key: str) -> str:
    for file in weights.safetensors_files(folder):
        with safe_open(file, framework="np") as f:
            if key in f.keys():
                return file
    raise KeyError(f"{key} not in {folder}")


def merge_adapters(base: str, adapters, out_folder: str) -> str:
    """`qwen3-tts-jax merge-adapter`: BASE with the LoRA adapters merged (lora.merge, float32)
    and their speakers added, written like a fine-tuned checkpoint (official layout, each tensor
    in the base file's dtype). Returns out_folder."""
    import jax.numpy as jnp

    folder = checkpoint.resolve(base)
    cfg = load_config(folder)
    params = checkpoint.load_params(folder, cfg, jnp.float32)
    merged, _ = lora.merge(params, cfg, folder, adapters)
    rows = {}
    for path in [adapters] if isinstance(adapters, str) else adapters:
        conf, _, r = lora.load_adapter(path)
        rows.update({n: (i, x) for (n, i), x in zip(conf["speakers"].items(), r)})
    return export_checkpoint(folder, out_folder, merged, cfg, rows)
