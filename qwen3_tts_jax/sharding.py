"""Meshes for running over several devices with JAX's own SPMD machinery (`jax.sharding`): the
rows of a batch split over a "data" axis, and, for a model too large for one device, the decoder
weights split over a "model" axis (tensor parallel). Used by the API, the batch tool and
fine-tuning."""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def data_sharding(model_parallel: int = 1):
    """(rows, replicated) shardings over all local devices. With `model_parallel` = m > 1 the
    devices form a (data, model) mesh of shape (n / m, m): rows split over "data", and
    `model_sharding` splits the weights over "model"."""
    devices = np.array(jax.local_devices())
    if model_parallel < 1 or len(devices) % model_parallel:
        raise ValueError(f"model_parallel={model_parallel} does not divide the {len(devices)} "
                         "local devices")
    mesh = Mesh(devices.reshape(-1, model_parallel), ("data", "model"))
    return NamedSharding(mesh, P("data")), NamedSharding(mesh, P())


# Tensor-parallel layout (Megatron style): the matmuls that widen (packed q|k|v, gate|up, the heads)
# split their output columns (and an int8 weight's scale), the ones that narrow (o, down) their
# input rows (their scale stays whole); XLA's SPMD partitioner inserts the collectives.
# Everything else (norms, embeddings, the speaker encoder) is replicated.
_COLUMNS = ("qkv", "q", "k", "v", "gate_up", "gate", "up", "codec_head", "lm_head")
_ROWS = ("o", "down")


def model_sharding(params, model_parallel: int):
    """Shardings for `params` (same tree) that split the decoder weights over the "model" axis
    of the `data_sharding(model_parallel)` mesh; a dimension that does not divide stays whole."""
    rows, _ = data_sharding(model_parallel)
    mesh, m = rows.mesh, model_parallel

    def key(k):   # a dict key, or a field of `layers.Attention` / `layers.MLP` / `Int8Weight`
        return getattr(k, "key", None) or getattr(k, "name", None)

    def spec(path, x):
        name, field = key(path[-1]), None
        if name in ("values", "scale") and len(path) > 1:   # a field of a `quantize.Int8Weight`
            name, field = key(path[-2]), name
        if name in _COLUMNS and x.shape and x.shape[-1] % m == 0 and (x.ndim >= 2 or
                                                                       field == "scale"):
            return NamedSharding(mesh, P(*([None] * (x.ndim - 1)), "model"))
        if name in _ROWS and x.ndim == 2 and x.shape[0] % m == 0:
            return NamedSharding(mesh, P("model", None))
        return NamedSharding(mesh, P())

    return jax.tree_util.tree_map_with_path(spec, params)
