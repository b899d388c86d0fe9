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

from . import layers
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


def logits(head_DxV, h_BxTxD):
    """Logits in float32 whatever the weights' dtype: sampling and argmax must see f32 values."""
    return jnp.einsum("...d,dv->...v", h_BxTxD, head_DxV, preferred_element_type=jnp.float32)
