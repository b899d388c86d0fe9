"""LoRA adapters of the talker and the code predictor: their file, and their merge at load time.

An adapter adds to each targeted product W (our layout: y = x @ W, W of shape (in, out)) the
low-rank update scale * A @ B, A (in, r), B (r, out), scale = alpha / r. In the official (torch)
layout W_t = W.T this is W_t + scale * B.T @ A.T. Targets are the attention and MLP products of
every decoder layer of both stacks: q, k, v, o, gate, up, down (`TARGETS`).

    ADAPTER/adapter.safetensors   "{stack}.layers.{i}.{target}.A" (in, r), ".B" (r, out), float32;
                                  "speaker_rows" (S, D): the codec embedding rows of the speakers
                                  it adds (trained with the adapters from their mean x-vectors,
                                  or those x-vectors with finetune --freeze-speaker-rows)
    ADAPTER/adapter_config.json   {"format", "rank", "alpha", "targets", "base_sha256",
                                   "speakers": {name: codec id} in row order}

`merge(params, conf, folder, paths)` applies adapters to freshly loaded, unpacked params (before
packing for inference and before int8 quantization): each product is computed in float64 from
the float32 weights and rounded to float32 once, so the merge is exact to float32 rounding.
The speakers of the adapters make the model a CustomVoice one (as `merge-adapter` writes it).
"""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np

from .config import parse_config, read_json

ADAPTER_FILE = "adapter.safetensors"
CONFIG_FILE = "adapter_config.json"
FORMAT = "qwen3-tts-jax lora v1"
TARGETS = {"q": ("attn", "q"), "k": ("attn", "k"), "v": ("attn", "v"), "o": ("attn", "o"),
           "gate": ("mlp", "gate"), "up": ("mlp", "up"), "down": ("mlp", "down")}
STACKS = ("talker", "code_predictor")


class AdapterError(ValueError):
    """An adapter that cannot be applied to this base checkpoint."""


def parse_targets(spec) -> tuple[str, ...]:
    """"q,k,v,o,gate,up,down" (or a sequence) -> the target names, checked, in TARGETS order."""
    names = [t.strip() for t in (spec.split(",") if isinstance(spec, str) else spec) if t.strip()]
    bad = [t for t in names if t not in TARGETS]
    if bad or not names:
        raise ValueError(f"LoRA targets {bad or names} are not among {list(TARGETS)}")
    return tuple(t for t in TARGETS if t in names)


def scale_of(rank: int, alpha: float) -> float:
    return float(alpha) / int(rank)


def init_adapters(params, rank: int, targets, seed: int = 0) -> dict:
    """Fresh adapters for the unpacked params: A uniform in +-1/sqrt(in) (PEFT's default), B zero,
    so the adapted model starts as the base one. {stack: {"layers": [{target: {"a", "b"}}]}}."""
    if int(rank) < 1:
        raise AdapterError(f"LoRA rank must be >= 1, got {rank}")
    rng = np.random.default_rng([int(seed), 0x10AA])
    out = {}
    for stack in STACKS:
        layers = []
        for lp in params[stack]["layers"]:
            d = {}
            for t in targets:
                w = lp[TARGETS[t][0]][TARGETS[t][1]]
                fan_in, fan_out = w.shape
                bound = 1.0 / np.sqrt(fan_in)
                d[t] = {"a": rng.uniform(-bound, bound, (fan_in, rank)).astype(np.float32),
                        "b": np.zeros((rank, fan_out), np.float32)}
            layers.append(d)
        out[stack] = {"layers": layers}
    return out


def flatten(adapters) -> dict[str, np.ndarray]:
    return {f"{stack}.layers.{i}.{t}.{ab.upper()}": np.asarray(m, np.float32)
            for stack in STACKS for i, lp in enumerate(adapters[stack]["layers"])
            for t, d in lp.items() for ab, m in d.items()}


def unflatten(tensors: dict[str, np.ndarray]) -> dict:
    out = {s: {"layers": []} for s in STACKS}
    for k, v in tensors.items():
        if k == "speaker_rows":
            continue
        stack, _, i, t, ab = k.split(".")
        layers = out[stack]["layers"]
        while len(layers) <= int(i):
            layers.append({})
        layers[int(i)].setdefault(t, {})[ab.lower()] = v
    return out


def base_hash(folder: str) -> str:
    """sha256 over the base checkpoint's official weight files (name and bytes, by name)."""
    from .weights import safetensors_files

    h = hashlib.sha256()
    for file in sorted(safetensors_files(folder), key=os.path.basename):
        h.update(os.path.basename(file).encode() + b"\0")
        with open(file, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()


def save_adapter(folder: str, adapters, *, rank: int, alpha: float, targets, base_sha256: str,
                 speakers: dict[str, tuple[int, np.ndarray]]) -> str:
    """Write ADAPTER/adapter.safetensors + adapter_config.json (built beside, renamed in)."""
    import shutil

    from safetensors.numpy import save_file

    tmp = folder.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    tensors = flatten(adapters)
    tensors["speaker_rows"] = np.stack([np.asarray(x, np.float32) for _, x in speakers.values()])
    save_file(tensors, os.path.join(tmp, ADAPTER_FILE), metadata={"format": FORMAT})
    conf = {"format": FORMAT, "rank": int(rank), "alpha": float(alpha), "targets": list(targets),
            "base_sha256": base_sha256, "speakers": {n: int(i) for n, (i, _) in speakers.items()}}
    with open(os.path.join(tmp, CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump(conf, f, indent=2, ensure_ascii=False)
    if os.path.exists(folder):
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return folder


def load_adapter(path: str):
    """(config dict, adapters tree, speaker rows (S, D)) of an adapter folder (or its
    adapter.safetensors); AdapterError when it is not a usable adapter."""
    from safetensors.numpy import load_file

    folder = os.path.dirname(path) if path.endswith(".safetensors") else path
    cfile, wfile = os.path.join(folder, CONFIG_FILE), os.path.join(folder, ADAPTER_FILE)
    if not (os.path.exists(cfile) and os.path.exists(wfile)):
        raise AdapterError(f"{path} is not a LoRA adapter (no {CONFIG_FILE} + {ADAPTER_FILE})")
    conf = read_json(cfile)
    rank = conf.get("rank")
    if not isinstance(rank, int) or rank < 1:
        raise AdapterError(f"{path}: LoRA rank {rank!r} is not usable (it must be an integer "
                           ">= 1)")
    tensors = load_file(wfile)
    tree = unflatten(tensors)
    shapes = {k: v.shape for k, v in tensors.items() if k != "speaker_rows"}
    if any((k.endswith(".A") and s[1] != rank) or (k.endswith(".B") and s[0] != rank)
           for k, s in shapes.items()):
        raise AdapterError(f"{path}: tensors do not have rank {rank}")
    rows = tensors.get("speaker_rows", np.zeros((0, 0), np.float32))
    if len(rows) != len(conf.get("speakers") or {}):
        raise AdapterError(f"{path}: {len(rows)} speaker rows for speakers {conf.get('speakers')}")
    return conf, tree, rows


def check_base(conf: dict, folder: str, path: str, sha: str | None = None) -> None:
    sha = sha or base_hash(folder)
    if conf.get("base_sha256") != sha:
        raise AdapterError(f"adapter {path} was trained on another base checkpoint (sha256 "
                           f"{str(conf.get('base_sha256'))[:12]}..., {folder} has {sha[:12]}...)")


def merge_weights(params, adapters, scale: float):
    """params (unpacked, float32 numpy or jax) with every adapted product replaced by
    float32(float64(W) + scale * float64(A) @ float64(B)). Other leaves are shared."""
    out = dict(params)
    for stack in STACKS:
        sub = dict(out[stack])
        layers = list(sub["layers"])
        for i, ad in enumerate(adapters[stack]["layers"]):
            if not ad:
                continue
            lp = {k: (dict(v) if isinstance(v, dict) else v) for k, v in layers[i].items()}
            for t, d in ad.items():
                part, name = TARGETS[t]
                w = np.asarray(lp[part][name], np.float64)
                delta = scale * (np.asarray(d["a"], np.float64) @ np.asarray(d["b"], np.float64))
                if delta.shape != w.shape:
                    raise AdapterError(f"adapter {stack} layer {i} {t}: shape {delta.shape}, the "
                                       f"base has {w.shape}")
                lp[part][name] = (w + delta).astype(np.float32)
            layers[i] = lp
        sub["layers"] = layers
        out[stack] = sub
    return out


def with_speakers(conf: dict, ids: dict[str, int]) -> dict:
    """config.json of the CustomVoice model that has `ids` ({name: codec id}) besides the
    speakers of a CustomVoice `conf` (a Base's own spk_id is not kept)."""
    conf = json.loads(json.dumps(conf))
    keep = conf.get("tts_model_type") == "custom_voice"
    conf["tts_model_type"] = "custom_voice"
    tc = conf.setdefault("talker_config", {})
    spk = {k: v for k, v in (tc.get("spk_id") or {}).items() if k.lower() not in ids} if keep else {}
    dialect = {k: v for k, v in (tc.get("spk_is_dialect") or {}).items() if k in spk}
    tc["spk_id"] = {**spk, **{n: int(i) for n, i in ids.items()}}
    tc["spk_is_dialect"] = {**dialect, **{n: False for n in ids}}
    return conf


def merge(params, cfg, folder: str, paths, dtype=None):
    """(params, cfg) of the base checkpoint in `folder` (params unpacked, float32, as loaded)
    with the adapters in `paths` merged, in order, and their speakers added (codec embedding rows,
    config): the model `merge-adapter` would write. Cast to `dtype` at the end."""
    import jax
    import jax.numpy as jnp

    paths = [paths] if isinstance(paths, str) else list(paths)
    if not paths:
        return params, cfg
    sha = base_hash(folder)
    params = jax.tree.map(np.asarray, params)
    ids: dict[str, int] = {}
    for path in paths:
        conf, tree, rows = load_adapter(path)
        check_base(conf, folder, path, sha)
        params = merge_weights(params, tree, scale_of(conf["rank"], conf["alpha"]))
        emb = np.array(params["talker"]["codec_embedding"], np.float32)
        for (name, i), row in zip(conf["speakers"].items(), rows):
            if name in ids:
                raise AdapterError(f"speaker {name!r} is in two adapters")
            ids[name] = i
            emb[i] = row
        params["talker"] = dict(params["talker"], codec_embedding=emb)
    if ids:
        cfg = parse_config(with_speakers(read_json(os.path.join(folder, "config.json")), ids))
        params = {k: v for k, v in params.items() if k != "speaker_encoder"}
    dtype = dtype or jnp.float32
    params = {k: jax.tree.map(lambda a: jnp.asarray(a, jnp.float32 if k == "speaker_encoder"
                                                    else dtype), v) for k, v in params.items()}
    return params, cfg

