"""The code predictor (official `Qwen3TTSTalkerCodePredictorModelForConditionalGeneration`): per frame,
a small Qwen3 stack predicts codebooks 1..15 from the talker's hidden state and code 0.

params["code_predictor"] = {
  "codec_embedding": (15, 2048, D_talker),     [g] embeds code group g+1; TALKER width
  "mtp_proj": {"w": (D_talker, D_cp), "b": (D_cp,)},   only when the widths differ (1.7B)
  "layers": [...], "norm": (D_cp,),
  "lm_head": (15, D_cp, 2048),                 [j] predicts code group j+1
The 15 tables and heads are stacked (`stack_tables`) so the predictor steps can be a scan.
}
`small_to_mtp_projection` maps EVERY predictor input (talker hidden and code embeddings) because the
embedding tables have the talker's width; at 0.6B it is the identity and has no weights.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from . import cpu_kernels, decode_kernels, layers
from .config import TalkerConfig
from .options import Options
from .talker import logits as head_logits
from .weights import Rule

_CP = "talker.code_predictor."
RULES = [
    Rule(r"talker\.code_predictor\.model\.codec_embedding\.(\d+)\.weight",
         "code_predictor/codec_embedding/{1}"),
    Rule(r"talker\.code_predictor\.lm_head\.(\d+)\.weight", "code_predictor/lm_head/{1}", "linear"),
    Rule(r"talker\.code_predictor\.small_to_mtp_projection\.weight", "code_predictor/mtp_proj/w",
         "linear"),
    Rule(r"talker\.code_predictor\.small_to_mtp_projection\.bias", "code_predictor/mtp_proj/b"),
    *layers.layer_rules(_CP + "model.", "code_predictor/"),
]


def expected_shapes(cfg: TalkerConfig) -> dict:
    """The predictor's tensors. Its config's own num_code_groups sizes the tables (the official
    class default is 32 where the json has none); frames use the first talker-G - 1 of them."""
    cp, D = cfg.code_predictor, cfg.hidden_size
    out = layers.layer_shapes(_CP + "model.", cp)
    for i in range(cp.num_code_groups - 1):
        out[f"{_CP}model.codec_embedding.{i}.weight"] = (cp.vocab_size, D)
        out[f"{_CP}lm_head.{i}.weight"] = (cp.vocab_size, cp.hidden_size)
    if cfg.has_mtp_projection:
        out[f"{_CP}small_to_mtp_projection.weight"] = (cp.hidden_size, D)
        out[f"{_CP}small_to_mtp_projection.bias"] = (cp.hidden_size,)
    return out


def stack_tables(params):
    """Official per-group lists -> stacked arrays (done once at load time)."""
    cp = dict(params["code_predictor"])
    for k in ("codec_embedding", "lm_head"):
        if isinstance(cp[k], (list, tuple)):
            cp[k] = jnp.stack(cp[k])
    return {**params, "code_predictor": cp}


def project(p, x_BxTxD):
    if "mtp_proj" not in p:
        return x_BxTxD
    return x_BxTxD @ p["mtp_proj"]["w"] + p["mtp_proj"]["b"]


def embed_codes(p, codes_BxG):
    """sum over g of codec_embedding[g](code g+1) for codes (B, 15) -> (B, D_talker)."""
    G = codes_BxG.shape[1]
    return p["codec_embedding"][jnp.arange(G)[None, :], codes_BxG].sum(axis=1)


def head_at(heads, j, h_BxD):
    """Logits (B, V) float32 of head j (which may be traced) of the stacked heads (G, D, V): a
    `cpu_kernels.PackedStack` or `PackedInt8DotStack` (`checkpoint.pack_for_inference` with the
    CPU kernels) is read in place; XLA would copy the picked head out of the stack every step."""
    if isinstance(heads, (cpu_kernels.PackedStack, cpu_kernels.PackedInt8DotStack)):
        return cpu_kernels.linear_at(h_BxD, heads, j).astype(jnp.float32)
    return head_logits(jax.lax.dynamic_index_in_dim(heads, j, keepdims=False), h_BxD)


def predict(p, cfg: TalkerConfig, past_hidden_BxD, code0_emb_BxD,
            sample: Callable[["jnp.ndarray", "jnp.ndarray"], "jnp.ndarray"], options: Options):
    """Codes 1..15 of one frame, autoregressively, with a fresh 16-slot KV cache.

    `sample(j, logits_BxV) -> ids_B` picks code j+1 from lm_head[j]'s f32 logits (j may be traced).
    Step 0 is the 2-position prefill (talker hidden, code-0 embedding); steps 1..14 are one
    `lax.scan`, unrolled with `options.unroll_predictor`; with `options.predictor_kernels` (where
    they cover the call) a step's decoder stack is two Pallas kernels a layer, over the rows
    padded to `decode_kernels.ROWS` (the caches keep the batch's rows).
    Returns (codes (B, 15) int32, the logits of each step (B, 15, V) f32).
    """
    cp = cfg.code_predictor
    B = past_hidden_BxD.shape[0]
    G = cfg.num_code_groups - 1
    S = G + 1
    kernels = kernel_tiles(p, cp, B, past_hidden_BxD.dtype, options)
    slots = jnp.arange(S)
    caches = layers.init_cache(cp, B, S, past_hidden_BxD.dtype, options)
    x = project(p, jnp.stack([past_hidden_BxD, code0_emb_BxD], axis=1))
    pos = jnp.broadcast_to(jnp.arange(2), (B, 2))
    mask = jnp.broadcast_to(slots[None, :] <= jnp.arange(2)[:, None], (B, 2, S))
    h, caches = layers.transformer(p, x, pos, caches, 0, mask, cp, options)
    lg0 = head_at(p["lm_head"], 0, h[:, -1])
    code0 = sample(0, lg0).astype(jnp.int32)
    if kernels:
        R = decode_kernels.ROWS   # the kernels' rows: B real, the rest zero
        cos_S, sin_S = (a[0] for a in layers.transformer_rope(slots[None], cp, x.dtype))
        start = jnp.zeros((R,), jnp.int32)

    def step(carry, j):
        code, caches = carry
        x = project(p, jnp.take(p["codec_embedding"], j - 1, axis=0)[code][:, None])
        if kernels:
            cos, sin = (jax.lax.dynamic_slice_in_dim(a, j + 1, 1) for a in (cos_S, sin_S))
            h, caches = decode_kernels.decoder_stack(
                p["layers"], jnp.pad(x[:, 0], [(0, R - B), (0, 0)]), j + 1, caches, cos, sin,
                start, cp, B, kernels, interpret=options.predictor_kernels == "interpret")
            h = layers.rms_norm(p["norm"], h[:B], cp.rms_norm_eps)
        else:
            mask = jnp.broadcast_to(slots <= j + 1, (B, 1, S))
            h, caches = layers.transformer(p, x, jnp.full((B, 1), j + 1), caches, j + 1, mask, cp,
                                           options)
            h = h[:, -1]
        lg = head_at(p["lm_head"], j, h)
        code = sample(j, lg).astype(jnp.int32)
        return (code, caches), (code, lg)

    _, (codes, logits) = jax.lax.scan(step, (code0, caches), jnp.arange(1, G),
                                      unroll=G - 1 if options.unroll_predictor else 1)
    codes = jnp.concatenate([code0[:, None], codes.T], axis=1)
    logits = jnp.concatenate([lg0[:, None], jnp.moveaxis(logits, 0, 1)], axis=1)
    return codes, logits


def kernel_tiles(p, cp, rows: int, dtype, options: Options) -> dict | None:
    """The tiles of `decode_kernels` when `options.predictor_kernels` asks for them and they cover
    this call (else None: XLA's ops)."""
    return decode_kernels.plan(options.predictor_kernels, "predictor_kernels", p["layers"], cp, rows,
                               dtype, options.cache_layout, options.predictor_tiles)


def check_kernels(p, cp, dtype, options: Options) -> None:
    """At load: a ValueError naming why `options.predictor_kernels` can never run this model's
    code predictor (`decode_kernels.check`)."""
    decode_kernels.check(options.predictor_kernels, "predictor_kernels",
                         "this model's code predictor", p["layers"], cp, dtype,
                         options.cache_layout, options.predictor_tiles)
