"""The talker (official `Qwen3TTSTalkerForConditionalGeneration`): a 28-layer Qwen3 trunk over summed
text + codec embeddings, with a codec head that emits codebook 0 of each 12.5 Hz frame.

params["talker"] = {
  "codec_embedding": (3072, D),          codec vocab: 2048 codes + 1024 control ids
  "text_embedding":  (V_text, D_text),
  "text_projection": {"fc1": (D_text, D_text), "fc1_b", "fc2": (D_text, D), "fc2_b"},
  "layers": [...], "norm": (D,),          see layers.py
  "codec_head": (D, 3072),
}
"""
from __future__ import annotations

import jax.numpy as jnp

from . import decode_kernels, layers
from .activations import ACTIVATIONS
from .config import TalkerConfig
from .options import Options
from .weights import Rule

RULES = [
    Rule(r"talker\.model\.codec_embedding\.weight", "talker/codec_embedding"),
    Rule(r"talker\.model\.text_embedding\.weight", "talker/text_embedding"),
    Rule(r"talker\.text_projection\.linear_(fc\d)\.weight", "talker/text_projection/{1}", "linear"),
    Rule(r"talker\.text_projection\.linear_(fc\d)\.bias", "talker/text_projection/{1}_b"),
    Rule(r"talker\.codec_head\.weight", "talker/codec_head", "linear"),
    *layers.layer_rules("talker.model.", "talker/"),
]


def expected_shapes(cfg: TalkerConfig) -> dict:
    D, Dt = cfg.hidden_size, cfg.text_hidden_size
    return {
        "talker.model.codec_embedding.weight": (cfg.vocab_size, D),
        "talker.model.text_embedding.weight": (cfg.text_vocab_size, Dt),
        "talker.text_projection.linear_fc1.weight": (Dt, Dt),
        "talker.text_projection.linear_fc1.bias": (Dt,),
        "talker.text_projection.linear_fc2.weight": (D, Dt),
        "talker.text_projection.linear_fc2.bias": (D,),
        "talker.codec_head.weight": (cfg.vocab_size, D),
        **layers.layer_shapes("talker.model.", cfg),
    }


def embed_text(p, ids_BxT, act: str = "silu"):
    """text_projection(text_embedding(ids)): an MLP (the talker's `hidden_act`, SiLU as released)
    from the text width to the talker width."""
    tp = p["text_projection"]
    x = p["text_embedding"][ids_BxT]
    x = ACTIVATIONS[act](x @ tp["fc1"] + tp["fc1_b"])
    return x @ tp["fc2"] + tp["fc2_b"]


def embed_codec(p, ids):
    return p["codec_embedding"][ids]


def forward(p, x_BxTxD, pos_BxT, caches, write_index, mask_BxTxS, cfg: TalkerConfig,
            options: Options):
    """Trunk + codec head. Returns (final-norm hidden (B,T,D), logits (B,T,3072) f32, caches)."""
    h, caches = layers.transformer(p, x_BxTxD, pos_BxT, caches, write_index, mask_BxTxS, cfg,
                                   options)
    return h, logits(p["codec_head"], h), caches


def step(p, x_BxD, pos_B, caches, write_index, first_slot_B, cfg: TalkerConfig,
         options: Options):
    """`forward` for one position per row (the frame loop's step), written at cache slot
    `write_index`, row b attending to slots [first_slot_b, write_index] (its left padding
    masked). With `options.talker_kernels` where they cover the batch (up to
    `decode_kernels.ROWS` rows), the decoder stack is two or three Pallas kernels a layer over
    the rows padded to that many (the caches keep the batch's rows). Returns (hidden (B, D),
    logits (B, 3072) f32, caches)."""
    B = x_BxD.shape[0]
    tiles = kernel_tiles(p, cfg, B, x_BxD.dtype, options)
    if tiles is None:
        slots = jnp.arange(caches[0].length)
        mask_Bx1xS = ((slots[None] >= first_slot_B[:, None]) & (slots[None] <= write_index))[:, None]
        h, lg, caches = forward(p, x_BxD[:, None], pos_B[:, None], caches, write_index, mask_Bx1xS,
                                cfg, options)
        return h[:, 0], lg[:, 0], caches
    R = decode_kernels.ROWS
    pad = lambda a: jnp.pad(a, [(0, R - B)] + [(0, 0)] * (a.ndim - 1))
    cos, sin = (pad(a[:, 0]) for a in layers.transformer_rope(pos_B[:, None], cfg, x_BxD.dtype))
    # padding rows attend to their own slot only
    start_R = jnp.concatenate([first_slot_B.astype(jnp.int32),
                               jnp.full((R - B,), write_index, jnp.int32)])
    h, caches = decode_kernels.decoder_stack(p["layers"], pad(x_BxD), write_index, caches, cos, sin,
                                             start_R, cfg, B, tiles,
                                             interpret=options.talker_kernels == "interpret")
    h = layers.rms_norm(p["norm"], h[:B], cfg.rms_norm_eps)
    return h, logits(p["codec_head"], h), caches


def kernel_tiles(p, cfg: TalkerConfig, rows: int, dtype, options: Options) -> dict | None:
    """The tiles of `decode_kernels` when `options.talker_kernels` asks for them and they cover
    this call (else None: XLA's ops)."""
    return decode_kernels.plan(options.talker_kernels, "talker_kernels", p["layers"], cfg, rows,
                               dtype, options.cache_layout, options.talker_tiles)


def check_kernels(p, cfg: TalkerConfig, dtype, options: Options) -> None:
    """At load: a ValueError naming why `options.talker_kernels` can never run this model's
    talker (`decode_kernels.check`)."""
    decode_kernels.check(options.talker_kernels, "talker_kernels", "this model's talker",
                         p["layers"], cfg, dtype, options.cache_layout, options.talker_tiles)


def logits(head_DxV, h_BxTxD):
    """Logits in float32 whatever the weights' dtype: sampling and argmax must see f32 values."""
    return jnp.einsum("...d,dv->...v", h_BxTxD, head_DxV, preferred_element_type=jnp.float32)
