"""Finding a checkpoint (local folder or hub id) and loading the model's params from it.

A model folder is the released layout: config.json, generation_config.json, model.safetensors
(keys `talker.*`, and `speaker_encoder.*` on Base), the tokenizer files, speech_tokenizer/. After
`python -m convert` it also holds `jax_params.safetensors` (our names, transposed and cast), which
loads without conversion; either form works.
"""
from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import pickle

import jax
import jax.numpy as jnp
import numpy as np

from . import code_predictor, layers, cpu_kernels, speaker_encoder, talker, weights
from . import quantize as quantize_mod
from .config import Qwen3TTSConfig
from .options import Options
from .weights import CheckpointError

log = logging.getLogger("qwen3_tts_jax")

FAST_FILE = "jax_params.safetensors"
RULES = talker.RULES + code_predictor.RULES
PACKED_FORMAT = "qwen3-tts-jax packed params v1"


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


def check_quantize(quantize: str | None, options: Options) -> None:
    """A ValueError for an unknown method, or for "int4" where the CPU kernels are off (it has no
    other implementation worth running: XLA would dequantize every weight in every product)."""
    quantize_mod.check_method(quantize)
    if quantize == "int4" and not options.cpu_kernels:
        import jax

        devices = jax.local_device_count()
        why = (f"the {jax.default_backend()!r} backend with {devices} local device(s)"
               if jax.default_backend() != "cpu" or devices != 1 else
               "Options.cpu_kernels is off (or the kernels did not build: see the warning above)")
        raise ValueError(f"quantize='int4' runs on the CPU kernels only (the CPU backend, one "
                         f"device, the kernels built); here: {why}. Use quantize='int8' or none")


def pack_for_inference(params, consume: bool = False, quantize: str | None = None,
                       options: Options | None = None):
    """The generation layout, one per `options` (None: `Options.for_backend()`): each decoder
    layer's attention and MLP as `layers.Attention` / `layers.MLP` blocks (q|k|v and gate|up
    concatenated, `layers.pack_layer`), with `quantize="int8"` its products as int8
    (`quantize.py`), and with `options.cpu_kernels` the float32 or int8 products packed for the
    CPU kernel (`cpu_kernels`), as are the code predictor's stacked heads
    (`cpu_kernels.PackedStack`; int8 `PackedInt8DotStack` where the products are int8 x int8
    or int4, see quantize.py); `quantize="int4"` needs `options.cpu_kernels`
    (`check_quantize`).
    With `consume`, the caller's layer lists are emptied as each layer is packed, so that memory
    peaks one layer above the weights (for a freshly loaded tree nobody else holds). Training and
    the converters use the unpacked form."""
    options = options or Options.for_backend()
    check_quantize(quantize, options)
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
    heads = out["code_predictor"].get("lm_head")
    if options.cpu_kernels and cpu_kernels.stackable(heads):
        # with int8 x int8 (or int4) products the heads are int8 x int8 too (quantize.py)
        int8 = quantize == "int4" or (quantize == "int8" and options.int8_activations == "int8")
        out["code_predictor"] = {**out["code_predictor"],
                                 "lm_head": cpu_kernels.pack_stack(heads, int8=int8)}
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


# ------------------------------------------------------------------ the packed-weights cache
# A warm start reads the generation layout (`pack_for_inference`'s output: concatenated, packed,
# quantized) from one file instead of reading the checkpoint, transposing, concatenating, packing
# and quantizing it again (benchmarks/RESULTS.md, Decisions: "packed-weights cache").

def _layout_modules():
    """The modules whose code decides the packed layout: a change to any of them is a new key."""
    import sys

    return [sys.modules[__name__], code_predictor, layers, cpu_kernels, quantize_mod,
            speaker_encoder, talker, weights]


def _source_files(folder: str) -> list[str]:
    fast = os.path.join(folder, FAST_FILE)
    return [fast] if os.path.exists(fast) else weights.safetensors_files(folder)


def packed_cache_slot(folder: str, dtype, quantize: str | None, options: Options) -> str:
    """The cache file's name for this checkpoint folder and these choices: one file per folder and
    choices, rewritten when its key goes stale (so the folder holds one copy per model, not one
    per edit of the checkpoint or of the code)."""
    h = hashlib.sha256(json.dumps([os.path.realpath(folder), str(jnp.dtype(dtype)), quantize,
                                   repr(options)]).encode())
    return f"packed-{h.hexdigest()[:20]}.safetensors"


def packed_cache_key(folder: str, cfg: Qwen3TTSConfig, dtype, quantize: str | None,
                     options: Options) -> str:
    """What a cached file must have been made from: the checkpoint's weight files by identity
    (path, size, modification time; hashing gigabytes of data would cost what the cache saves),
    its config, the dtype, the quantization, the options, and the source of the code that packs.
    """
    h = hashlib.sha256()
    for f in _source_files(folder):
        st = os.stat(f)
        h.update(f"{os.path.realpath(f)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    h.update(repr(cfg).encode())
    h.update(json.dumps([str(jnp.dtype(dtype)), quantize, repr(options), PACKED_FORMAT]).encode())
    for m in _layout_modules():
        with open(m.__file__, "rb") as fh:
            h.update(fh.read())
    return h.hexdigest()


def abstract_packed(cfg: Qwen3TTSConfig, dtype, quantize: str | None, options: Options):
    """The packed params' tree with `jax.ShapeDtypeStruct` leaves, from the config alone (traced,
    not computed): what a cached file must hold, leaf by leaf."""
    shapes = fast_expected_shapes(cfg)
    tree = weights.nest({k: jax.ShapeDtypeStruct(s, _f32_encoder(k) or dtype)
                         for k, s in shapes.items()})
    return jax.eval_shape(lambda p: pack_for_inference(p, quantize=quantize, options=options),
                          tree)


def _leaf_names(tree) -> list:
    paths, treedef = jax.tree_util.tree_flatten_with_path(tree)
    return [jax.tree_util.keystr(p) for p, _ in paths], [leaf for _, leaf in paths], treedef


def save_packed_cache(params, path: str, key: str) -> None:
    """Write packed params to `path` (atomically: a temp file renamed), with their tree (leaf
    names in order and the pickled tree structure), so that a load needs no tracing."""
    from safetensors.numpy import save_file

    names, leaves, treedef = _leaf_names(params)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        save_file({n: np.asarray(x) for n, x in zip(names, leaves)}, tmp,
                  metadata={"format": PACKED_FORMAT, "key": key, "names": json.dumps(names),
                            "tree": base64.b64encode(pickle.dumps(treedef)).decode()})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_packed_cache(path: str, key: str, abstract):
    """The packed params from `path` if it was made with `key` and holds exactly the leaves of
    `abstract` (names, shapes, dtypes); None if the file is missing or stale. A file that cannot
    be read (truncated, not safetensors) is None too, with a warning. `abstract` may be a
    function that returns it, called only for a file without its own tree (the key covers
    everything that decides the tree: the config, the choices and the packing code)."""
    if not os.path.exists(path):
        return None
    try:
        with weights.TensorFile(path) as f:
            meta = f.metadata
            if meta.get("format") != PACKED_FORMAT or meta.get("key") != key:
                log.info("packed-weights cache %s is stale; repacking", path)
                return None
            if "tree" in meta and "names" in meta:
                names, treedef = json.loads(meta["names"]), pickle.loads(
                    base64.b64decode(meta["tree"]))
                specs = [jax.ShapeDtypeStruct(f.shape(n), f.dtype(n)) for n in names]
                if treedef.num_leaves != len(names):
                    raise ValueError("its tree does not match its tensors")
            else:
                names, specs, treedef = _leaf_names(abstract() if callable(abstract)
                                                    else abstract)
            if sorted(f.keys()) != sorted(names):
                log.warning("packed-weights cache %s does not hold this layout; repacking", path)
                return None
            leaves = []
            for n, spec in zip(names, specs):
                if f.shape(n) != tuple(spec.shape) or f.dtype(n) != spec.dtype:
                    log.warning("packed-weights cache %s: %s is %s %s, expected %s %s; "
                                "repacking", path, n, f.dtype(n), f.shape(n), spec.dtype,
                                spec.shape)
                    return None
                leaves.append(weights.to_device(f.read(n)))
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file: load the checkpoint
        log.warning("packed-weights cache %s cannot be read (%s: %s); loading the checkpoint",
                    path, type(e).__name__, str(e)[:200])
        return None
    return jax.tree_util.tree_unflatten(treedef, leaves)


def load_for_inference(folder: str, cfg: Qwen3TTSConfig, dtype=None,
                       quantize: str | None = None, options: Options | None = None,
                       cache_dir: str | None = None, load=None):
    """`pack_for_inference(load_params(folder, cfg, dtype), ...)`; with `cache_dir`, the packed
    params are read from the cache file made by an earlier load with the same checkpoint, dtype,
    quantization, options and code, and written there after a load without one (a failed write
    warns and is otherwise ignored). `load()` replaces `load_params` (the caller's own reading,
    e.g. with adapters merged; then give no cache_dir: the key does not cover them)."""
    dtype = dtype or default_dtype()
    options = options or Options.for_backend(dtype=dtype)
    check_quantize(quantize, options)
    load = load or (lambda: load_params(folder, cfg, dtype))
    if cache_dir is None:
        return pack_for_inference(load(), consume=True, quantize=quantize, options=options)
    path = os.path.join(cache_dir, packed_cache_slot(folder, dtype, quantize, options))
    key = packed_cache_key(folder, cfg, dtype, quantize, options)
    params = load_packed_cache(path, key, lambda: abstract_packed(cfg, dtype, quantize, options))
    if params is not None:
        return params
    params = pack_for_inference(load(), consume=True, quantize=quantize, options=options)
    try:
        save_packed_cache(params, path, key)
    except (OSError, ValueError) as e:   # read-only or full disk: run without the cache
        log.warning("packed-weights cache: cannot write %s (%s)", path, e)
    return params
