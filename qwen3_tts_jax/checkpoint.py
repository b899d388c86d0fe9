"""Finding a checkpoint (local folder or hub id) and loading the model's params from it.

A model folder is the released layout: config.json, generation_config.json, model.safetensors
(keys `talker.*`, and `speaker_encoder.*` on Base), the tokenizer files, speech_tokenizer/. After
`python -m convert` it also holds `jax_params.safetensors` (our names, transposed and cast), which
loads without conversion; either form works.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp

from . import code_predictor, layers, cpu_kernels, speaker_encoder, talker, weights
from . import quantize as quantize_mod
from .config import Qwen3TTSConfig
from .options import Options
from .weights import CheckpointError

FAST_FILE = "jax_params.safetensors"
RULES = talker.RULES + code_predictor.RULES


def default_dtype():
    """bf16 transformers on GPU/TPU, f32 on CPU."""
    return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16


def expected_shapes(cfg: Qwen3TTSConfig) -> dict:
    """Every `talker.*` tensor of the official model, from the config."""
    return {**talker.expected_shapes(cfg.talker), **code_predictor.expected_shapes(cfg.talker)}


def resolve(path_or_id: str, what: str = "model") -> str:
    """A local folder as is; otherwise a hub id fetched through huggingface_hub."""
    if os.path.isdir(path_or_id):
        return path_or_id
    looks_like_id = path_or_id.count("/") == 1 and not path_or_id.startswith((".", "/", "~"))
    if not looks_like_id:
        raise FileNotFoundError(f"{what} folder {path_or_id!r} does not exist")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(path_or_id)
    except Exception as e:  # noqa: BLE001 - offline, unknown repo, no disk: one clear message
        raise FileNotFoundError(
            f"could not get {path_or_id!r} from the Hugging Face hub ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}).\n"
            f"Download it on a machine with internet access, e.g. "
            f"`huggingface-cli download {path_or_id} --local-dir ./{path_or_id.split('/')[-1]}`, "
            f"copy the folder here and pass its path instead of the hub id.") from None


def _f32_encoder(path: str):
    """The speaker encoder stays float32 whatever the transformers' dtype."""
    return jnp.float32 if path.startswith("speaker_encoder/") else None


def load_params(folder: str, cfg: Qwen3TTSConfig, dtype=None):
    """Params pytree {"talker", "code_predictor"[, "speaker_encoder" on Base]} from either form."""
    dtype = dtype or default_dtype()
    expected = expected_shapes(cfg)
    fast = os.path.join(folder, FAST_FILE)
    if os.path.exists(fast):
        return weights.load_params(fast, fast_expected_shapes(cfg), dtype, what=fast,
                                   dtype_for=lambda p: _f32_encoder(p) or dtype)
    files = weights.safetensors_files(folder)
    header = weights.read_header(files)
    # The speaker encoder (Base checkpoints) is loaded separately; anything else is checked here.
    others = sorted(k for k in header if not k.startswith(("talker.", "speaker_encoder.")))
    if others or (cfg.tts_model_type != "base"
                  and any(k.startswith("speaker_encoder.") for k in header)):
        bad = others or [k for k in header if k.startswith("speaker_encoder.")][:5]
        raise CheckpointError(f"{folder}: unexpected tensors for a {cfg.tts_model_type} "
                              f"checkpoint: {bad[:10]}")
    params = weights.load_official(files, RULES, expected, dtype,
                                   what=f"{folder}/model.safetensors", prefix="talker.")
    params = code_predictor.stack_tables(params)
    if cfg.tts_model_type == "base":
        params["speaker_encoder"] = speaker_encoder.load_params(folder, cfg.speaker_encoder)
    return params


def pack_for_inference(params, consume: bool = False, quantize: str | None = None,
                       options: Options | None = None):
    """The generation layout, one per `options` (None: `Options.for_backend()`): each decoder
    layer's attention and MLP as `layers.Attention` / `layers.MLP` blocks (q|k|v and gate|up
    concatenated, `layers.pack_layer`), with `quantize="int8"` its products as int8
    (`quantize.py`), and with `options.cpu_kernels` the float32 or int8 products packed for the
    CPU kernel (`cpu_kernels`).
    With `consume`, the caller's layer lists are emptied as each layer is packed, so that memory
    peaks one layer above the weights (for a freshly loaded tree nobody else holds). Training and
    the converters use the unpacked form."""
    quantize_mod.check_method(quantize)
    options = options or Options.for_backend()
    out = dict(params)
    for part in ("talker", "code_predictor"):
        sub = dict(out[part])
        src = sub["layers"] if consume else list(sub["layers"])
        packed = []
        for i in range(len(src)):
            layer = layers.pack_layer(src[i])
            if quantize:
                layer = quantize_mod.quantize_layer(layer, quantize)
            packed.append(cpu_kernels.pack_layer(layer, options.int8_activations)
                          if options.cpu_kernels else layer)
            src[i] = None
        sub["layers"] = packed
        out[part] = sub
    return out


def fast_expected_shapes(cfg: Qwen3TTSConfig) -> dict:
    """{our path: shape} of the params as held in memory (and in the fast form)."""
    ours = weights.expected_ours(RULES, expected_shapes(cfg))
    abstract = weights.nest({k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in ours.items()})
    arranged = jax.eval_shape(code_predictor.stack_tables, abstract)
    out = {k: v.shape for k, v in weights.flatten(arranged).items()}
    if cfg.tts_model_type == "base":
        enc = weights.expected_ours(speaker_encoder.RULES,
                                    speaker_encoder.expected_shapes(cfg.speaker_encoder))
        out.update({f"speaker_encoder/{k}": s for k, s in enc.items()})
    return out


def save_fast(params, folder: str, source: str) -> str:
    out = os.path.join(folder, FAST_FILE)
    weights.save_params(params, out, {"source": source, "format": "qwen3-tts-jax params v1"})
    return out
