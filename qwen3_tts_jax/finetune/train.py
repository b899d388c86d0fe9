"""The training computation of the official `finetuning/sft_12hz.py`, as pure functions, and the loop.

    step = make_train_step(cfg)                    # jitted; static: cfg, dtype, accumulation
    params, opt_state, metrics = step(params, opt_state, batch, rng)

`loss_fn` is the official per-batch loss with its evident bugs fixed (docs/finetuning.md):
  inputs   text_projection(text_embedding(text ids)) * text mask          (official: no projection)
           + codec_embedding(codec ids) * codec mask, the speaker input at position 6: the line's
           own x-vector (full fine-tuning, as the official), or under LoRA the trained row of the
           line's speaker (`speaker_rows`, the row inference reads from codec_embedding)
           + sum over g = 1..15 of code_predictor.codec_embedding[g-1](code g) on frame positions
  talker   28-layer trunk, causal + padding mask; cross-entropy of codec_head(h[p]) against
           codec_0_labels[p + 1]                        (official: p + 2, a double shift)
  predictor for every frame at position p: inputs [h[p - 1], code 0 embedding, codes 1..14
           embeddings] -> 5-layer stack -> lm_head[j](out[j + 1]) against code j + 1
                                                        (official: h[p], and code j + 2)
  loss     talker CE (mean over labelled positions) + 0.3 x predictor CE (mean over frames x 15)
This is what generation does (generate.py: the hidden state that predicted code 0 of a frame
conditions the predictor of that frame), so training and inference agree.

The optimizer is the official one: gradients averaged over `accum_steps` micro-batches (each
micro-batch loss / accum_steps, like accelerate; an epoch's last, partial group is applied at the
epoch end with the same scaling), clipped to global norm 1.0 (torch's `clip_grad_norm_` formula),
then AdamW (lr 2e-5, betas (0.9, 0.999), eps 1e-8, weight decay 0.01 on every parameter but the
LoRA speaker rows). Only the talker and code predictor train; the speaker encoder is frozen (the
official detaches its output) and is not part of the optimised params. Under LoRA the optimised
params are the adapters and the new speakers' rows (`lora_params`).

Precision: params (master weights) and optimizer state are float32; on GPU/TPU the forward and
backward run in bfloat16 (`compute_dtype`), with RMSNorm statistics, RoPE angles, softmax, logits
and cross-entropy in float32. On CPU everything is float32.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .. import code_predictor as cp_mod
from .. import layers, talker
from ..activations import ACTIVATIONS
from ..buckets import ladder
from ..sharding import data_sharding
from ..config import Qwen3TTSConfig, TransformerConfig
from .data import SPEAKER_SLOT

TRAINABLE = ("talker", "code_predictor")
SUB_TALKER_WEIGHT = 0.3


# ----------------------------------------------------------------------------- forward + loss

def _stack(p, x_BxTxD, pos_BxT, mask_BxTxT, cfg: TransformerConfig, remat: bool,
           lora_p=None, lora_scale: float = 1.0):
    """A full-sequence pass of a Qwen3 decoder stack (no KV cache), from layers.py's pieces.
    `lora_p` ({"layers": [{target: {"a", "b"}}]}, lora.py): each adapted product x @ W becomes
    x @ W + scale * (x @ A) @ B (W itself never changes: its gradient is not formed).
    Returns the final-norm hidden states."""
    cos_sin = layers.transformer_rope(pos_BxT, cfg, x_BxTxD.dtype)
    H, K, Dh, eps = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.rms_norm_eps

    def layer(lp, ad, x):
        B, T, _ = x.shape
        a, m = lp["attn"], lp["mlp"]

        def mm(h, w, t):
            y = h @ w
            if t in ad:
                y = y + ((h @ ad[t]["a"]) @ ad[t]["b"]) * jnp.asarray(lora_scale, y.dtype)
            return y

        h = layers.rms_norm(lp["input_norm"], x, eps)
        q = layers.rms_norm(a["q_norm"], mm(h, a["q"], "q").reshape(B, T, H, Dh), eps)
        k = layers.rms_norm(a["k_norm"], mm(h, a["k"], "k").reshape(B, T, K, Dh), eps)
        v = mm(h, a["v"], "v").reshape(B, T, K, Dh)
        q, k = layers.apply_rope(q, *cos_sin), layers.apply_rope(k, *cos_sin)
        o = layers.dot_product_attention(q, k, v, mask_BxTxT)
        x = x + mm(o.reshape(B, T, H * Dh), a["o"], "o")
        h = layers.rms_norm(lp["post_norm"], x, eps)
        if not ad:
            return x + layers.mlp(m, h, cfg.hidden_act)
        act = ACTIVATIONS[cfg.hidden_act]
        return x + mm(act(mm(h, m["gate"], "gate")) * mm(h, m["up"], "up"), m["down"], "down")

    if remat:
        layer = jax.checkpoint(layer)
    ads = lora_p["layers"] if lora_p is not None else [{}] * len(p["layers"])
    for lp, ad in zip(p["layers"], ads):
        x_BxTxD = layer(lp, ad, x_BxTxD)
    return layers.rms_norm(p["norm"], x_BxTxD, eps)


def _cross_entropy(logits_NxV, labels_N, valid_N):
    """Sum of token cross-entropies over the valid entries (f32) and their count."""
    lse = jax.nn.logsumexp(logits_NxV, axis=-1)
    picked = jnp.take_along_axis(logits_NxV, jnp.where(valid_N, labels_N, 0)[..., None],
                                 axis=-1)[..., 0]
    return jnp.sum(jnp.where(valid_N, lse - picked, 0.0)), jnp.sum(valid_N)


def input_embeddings(tp, cp, batch, dtype, act: str = "silu", speaker_rows=None):
    """The talker's input (B, T, D): text + codec streams, the speaker input at the speaker slot,
    and the embeddings of codebooks 1..15 on the frame positions (official sft_12hz.py, projection
    fixed). The speaker input is batch["x_vectors"] (each line's own reference x-vector, the
    official full SFT), or with `speaker_rows` (S, D) the row of each line's speaker,
    speaker_rows[batch["speaker_index"]]: the row that inference puts there for that speaker."""
    ids = batch["input_ids"]
    text = talker.embed_text(tp, ids[..., 0], act) * batch["text_embedding_mask"][..., None].astype(dtype)
    codec = tp["codec_embedding"][ids[..., 1]] * batch["codec_embedding_mask"][..., None].astype(dtype)
    spk = batch["x_vectors"] if speaker_rows is None else speaker_rows[batch["speaker_index"]]
    codec = codec.at[:, SPEAKER_SLOT].set(spk.astype(dtype))
    x = text + codec
    on_frames = batch["codec_mask"][..., None].astype(dtype)
    return x + _embed_groups(cp, batch["codec_ids"][..., 1:]).sum(axis=-2) * on_frames


def _embed_groups(cp, codes_BxTxG):
    """codec_embedding[g](code of group g + 1) for g < G, in one gather: (B, T, G, D)."""
    G = codes_BxTxG.shape[-1]
    return cp["codec_embedding"][jnp.arange(G), codes_BxTxG]


def loss_fn(params, batch, cfg: Qwen3TTSConfig, compute_dtype=jnp.float32, remat: bool = False,
            lora_p=None, lora_scale: float = 1.0):
    """(loss, metrics) of one batch (see the module docstring). params: {"talker",
    "code_predictor"} (float32 master weights, or the frozen base in the compute dtype under
    LoRA; cast to compute_dtype here). `lora_p`: adapters {"talker", "code_predictor"} (lora.py)
    added to the products they target, with `lora_scale` = alpha / rank, and optionally
    "speaker_rows" (S, D): then each line's speaker input is its speaker's row
    (`input_embeddings`)."""
    p = jax.tree.map(lambda a: a.astype(compute_dtype), params)
    tp, cp = p["talker"], p["code_predictor"]
    lp = jax.tree.map(lambda a: a.astype(compute_dtype), lora_p) if lora_p is not None else None
    lt, lc = (lp["talker"], lp["code_predictor"]) if lp is not None else (None, None)
    tc = cfg.talker
    rows = lp.get("speaker_rows") if lp is not None else None
    x = input_embeddings(tp, cp, batch, compute_dtype, tc.hidden_act, rows)
    B, T, _ = x.shape
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    causal = jnp.arange(T)[None, :] <= jnp.arange(T)[:, None]
    mask = causal[None] & (batch["attention_mask"] > 0)[:, None, :]
    h = _stack(tp, x, pos, mask, tc, remat, lt, lora_scale)                            # (B, T, D)

    # Talker: the hidden state at p predicts code 0 (or EOS) at p + 1.
    logits = talker.logits(tp["codec_head"], h[:, :-1])                 # (B, T-1, V) f32
    labels = batch["codec_0_labels"][:, 1:]
    t_sum, t_count = _cross_entropy(logits, labels, labels >= 0)
    talker_loss = t_sum / jnp.maximum(t_count, 1)

    # Code predictor on every frame: frame f of row b sits at s_b + f; its condition is h[s_b+f-1].
    valid = batch["frame_valid"]                                         # (B, F)
    F = valid.shape[1]
    at = jnp.clip(batch["frame_start"][:, None] + jnp.arange(F)[None, :], 1, T - 1)
    hid = jnp.take_along_axis(h, (at - 1)[..., None], axis=1)            # (B, F, D)
    fcodes = jnp.take_along_axis(batch["codec_ids"], at[..., None], axis=1)   # (B, F, 16)
    G = fcodes.shape[-1] - 1
    seq = jnp.concatenate([hid[:, :, None], tp["codec_embedding"][fcodes[..., :1]],
                           _embed_groups(cp, fcodes[..., 1:G])], axis=2)   # (B, F, 16, D)
    xs = cp_mod.project(cp, seq.reshape(B * F, G + 1, -1))
    S = G + 1
    cmask = jnp.broadcast_to(jnp.arange(S)[None, :] <= jnp.arange(S)[:, None], (B * F, S, S))
    hc = _stack(cp, xs, jnp.broadcast_to(jnp.arange(S), (B * F, S)), cmask, tc.code_predictor,
                remat, lc, lora_scale)
    sub_logits = jnp.einsum("ngd,gdv->ngv", hc[:, 1:], cp["lm_head"][:G],
                            preferred_element_type=jnp.float32)          # (N, 15, 2048)
    sub_valid = jnp.broadcast_to(valid.reshape(B * F, 1), (B * F, G))
    s_sum, s_count = _cross_entropy(sub_logits, fcodes[..., 1:].reshape(B * F, G), sub_valid)
    sub_loss = s_sum / jnp.maximum(s_count, 1)

    loss = talker_loss + SUB_TALKER_WEIGHT * sub_loss
    return loss, {"loss": loss, "talker_loss": talker_loss, "sub_talker_loss": sub_loss,
                  "frames": jnp.sum(valid), "talker_count": t_count, "sub_talker_count": s_count}


# ----------------------------------------------------------------------------- optimizer + step

def _global_norm(tree):
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def clip_by_global_norm_torch(max_norm: float) -> optax.GradientTransformation:
    """torch.nn.utils.clip_grad_norm_: g * min(1, max_norm / (||g|| + 1e-6)). (optax's version
    has no 1e-6; the difference is ~1e-6 relative, kept out for exact parity.)"""
    def init(params):
        del params
        return optax.EmptyState()

    def update(updates, state, params=None):
        del params
        scale = jnp.minimum(1.0, max_norm / (_global_norm(updates) + 1e-6))
        return jax.tree.map(lambda g: g * scale, updates), state

    return optax.GradientTransformation(init, update)


def decay_mask(params):
    """Which params get weight decay: all but the LoRA speaker rows (decay would pull a speaker's
    row towards zero, away from any voice; the x-vectors they start from are not small weights)."""
    return {k: jax.tree.map(lambda _: k != "speaker_rows", v) for k, v in params.items()}


def make_optimizer(lr: float = 2e-5, weight_decay: float = 0.01,
                   max_grad_norm: float = 1.0) -> optax.GradientTransformation:
    """The official optimizer: torch AdamW (betas 0.9/0.999, eps 1e-8, decoupled decay on all
    params but LoRA speaker rows, `decay_mask`) after clipping to `max_grad_norm` (the global norm
    over every optimised param, speaker rows included)."""
    return optax.chain(clip_by_global_norm_torch(max_grad_norm),
                       optax.adamw(lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=weight_decay,
                                   mask=decay_mask))


class AccumState(NamedTuple):
    """Optimizer state with gradient accumulation: the inner optax state, the running sum of
    micro-batch gradients / accum_steps, and how many micro-batches it holds."""
    inner: optax.OptState
    grads: dict
    micro: jax.Array


def init_opt_state(optimizer, params) -> AccumState:
    return AccumState(optimizer.init(params), jax.tree.map(jnp.zeros_like, params),
                      jnp.zeros((), jnp.int32))


def train_step(params, opt_state: AccumState, batch, rng, frozen=None, *, cfg: Qwen3TTSConfig,
               optimizer: optax.GradientTransformation, accum_steps: int = 4,
               compute_dtype=jnp.float32, remat: bool = False, lora_scale: float = 1.0):
    """One micro-batch: gradients of `loss_fn`, accumulated; every `accum_steps`-th call (or when
    batch["flush"] is true: the epoch's last batch) clips, applies AdamW and clears the sum.
    With `frozen` (LoRA): `params` are the adapters (lora.py), with the speaker rows when they
    train (`lora_params`), and `frozen` the base weights, which are inputs only (no gradient, no
    optimizer state).

    Pure: (params, opt_state, batch, rng[, frozen]) -> (params, opt_state, metrics). `rng` is
    accepted for the standard signature; the official computation has no randomness (no dropout)."""
    del rng
    flush = batch["flush"]
    batch = {k: v for k, v in batch.items() if k != "flush"}
    if frozen is None:
        objective = lambda p: loss_fn(p, batch, cfg, compute_dtype, remat)  # noqa: E731
    else:
        objective = lambda ad: loss_fn(frozen, batch, cfg, compute_dtype, remat,  # noqa: E731
                                       ad, lora_scale)
    (_, metrics), grads = jax.value_and_grad(objective, has_aux=True)(params)
    acc = jax.tree.map(lambda a, g: a + g.astype(a.dtype) / accum_steps, opt_state.grads, grads)
    micro = opt_state.micro + 1
    apply = (micro >= accum_steps) | flush

    def do_apply(_):
        updates, inner = optimizer.update(acc, opt_state.inner, params)
        return (optax.apply_updates(params, updates),
                AccumState(inner, jax.tree.map(jnp.zeros_like, acc), jnp.zeros((), jnp.int32)))

    def keep(_):
        return params, AccumState(opt_state.inner, acc, micro)

    new_params, new_state = jax.lax.cond(apply, do_apply, keep, None)
    metrics = dict(metrics, grad_norm=_global_norm(acc), applied=apply)
    return new_params, new_state, metrics


def make_train_step(cfg: Qwen3TTSConfig, lr: float = 2e-5, weight_decay: float = 0.01,
                    max_grad_norm: float = 1.0, accum_steps: int = 4, compute_dtype=None,
                    remat: bool | None = None, lora_scale: float | None = None):
    """`train_step` with `make_optimizer(lr, weight_decay, max_grad_norm)`, jitted with its static
    settings bound and params / opt_state donated; one jitted function per distinct setting (so a
    resumed run in the same process reuses the compiled programs). compute_dtype defaults to
    bfloat16 on accelerators and float32 on CPU; remat (recompute each layer in the backward pass:
    less memory) defaults to on for accelerators. `lora_scale` (alpha / rank) for LoRA steps,
    which take the frozen base as a fifth argument."""
    on_cpu = jax.default_backend() == "cpu"
    compute_dtype = resolve_dtype(compute_dtype)
    remat = (not on_cpu) if remat is None else bool(remat)
    return _jitted_step(cfg, float(lr), float(weight_decay), float(max_grad_norm),
                        int(accum_steps), compute_dtype, remat,
                        None if lora_scale is None else float(lora_scale))


def resolve_dtype(compute_dtype=None):
    on_cpu = jax.default_backend() == "cpu"
    return jnp.dtype(compute_dtype or (jnp.float32 if on_cpu else jnp.bfloat16))


@functools.lru_cache(maxsize=8)
def _jitted_step(cfg, lr, weight_decay, max_grad_norm, accum_steps, compute_dtype, remat,
                 lora_scale=None):
    fn = functools.partial(train_step, cfg=cfg,
                           optimizer=make_optimizer(lr, weight_decay, max_grad_norm),
                           accum_steps=accum_steps, compute_dtype=compute_dtype, remat=remat,
                           lora_scale=1.0 if lora_scale is None else lora_scale)
    return jax.jit(fn, donate_argnums=(0, 1))


@functools.lru_cache(maxsize=8)
def _jitted_eval(cfg, compute_dtype, lora_scale=None):
    """(params, batch, frozen) -> the loss terms' sums and counts of one batch (no gradient)."""
    def fn(params, batch, frozen=None):
        if frozen is None:
            _, m = loss_fn(params, batch, cfg, compute_dtype)
        else:
            _, m = loss_fn(frozen, batch, cfg, compute_dtype, False, params, lora_scale)
        return {"talker_sum": m["talker_loss"] * m["talker_count"],
                "talker_count": m["talker_count"],
                "sub_talker_sum": m["sub_talker_loss"] * m["sub_talker_count"],
                "sub_talker_count": m["sub_talker_count"]}
    return jax.jit(fn)


def trainable(params) -> dict:
    """The optimised subset of a loaded params tree (talker + code predictor), float32."""
    return {k: jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params[k]) for k in TRAINABLE}


def lora_params(adapters, speaker_rows=None) -> dict:
    """The optimised params of a LoRA run: the adapters (lora.init_adapters) and, unless frozen,
    "speaker_rows" (S, D) float32, row k = the k-th new speaker's row (initialised to its mean
    x-vector, data.speaker_xvectors); the batch's "speaker_index" picks each line's row."""
    if speaker_rows is None:
        return dict(adapters)
    return dict(adapters, speaker_rows=np.asarray(speaker_rows, np.float32))


# ----------------------------------------------------------------------------- resume state

def save_state(folder: str, params, opt_state, info: dict) -> None:
    """Params + optimizer state + `info` (position in the data, settings) for resuming, in ONE
    file (state.npz, the info as a JSON string inside) written to a temp file and renamed: a kill
    at any moment leaves either the previous state or the new one, never a mix. state.json is a
    readable copy of the info, not read back."""
    os.makedirs(folder, exist_ok=True)
    leaves = [np.asarray(x) for x in jax.tree.leaves((params, opt_state))]
    tmp = os.path.join(folder, "state.npz.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, *leaves, info=np.array(json.dumps(info)))
    os.replace(tmp, os.path.join(folder, "state.npz"))
    tmp = os.path.join(folder, "state.json.tmp")
    with open(tmp, "w") as f:
        json.dump(info, f, indent=1)
    os.replace(tmp, os.path.join(folder, "state.json"))


def load_state(folder: str, params_like, opt_state_like):
    """(params, opt_state, info) saved by `save_state`, or None when there is none."""
    if not os.path.exists(os.path.join(folder, "state.npz")):
        return None
    leaves_like, treedef = jax.tree.flatten((params_like, opt_state_like))
    with np.load(os.path.join(folder, "state.npz")) as z:
        info = json.loads(str(z["info"]))
        leaves = [z[f"arr_{i}"] for i in range(len(z.files) - 1)]
    if len(leaves) != len(leaves_like) or any(
            a.shape != b.shape for a, b in zip(leaves, leaves_like)):
        raise ValueError(f"the resume state in {folder} does not match this model; delete the "
                         "folder to start over")
    params, opt_state = jax.tree.unflatten(treedef, [jnp.asarray(a) for a in leaves])
    return params, opt_state, info


# ----------------------------------------------------------------------------- the loop

def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffled example order of an epoch (a pure function of seed and epoch, so a resumed
    run sees the same batches)."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def balanced_order(speakers: list[str], seed: int, epoch: int) -> np.ndarray:
    """An epoch of len(speakers) examples in which every speaker has an equal share (the first
    n % S speakers in order of appearance one more): a speaker's share walks through its
    examples in a fresh shuffled order each pass (repeating them when it has fewer lines than its
    share, leaving some for a later epoch when it has more), then the epoch is shuffled. A pure
    function of (speakers, seed, epoch); one speaker: `epoch_order`."""
    names = list(dict.fromkeys(speakers))
    n, S = len(speakers), len(names)
    if S == 1:
        return epoch_order(n, seed, epoch)
    rng = np.random.default_rng([seed, epoch, S])
    of = np.asarray([names.index(s) for s in speakers])
    picks = []
    for k in range(S):
        group = np.flatnonzero(of == k)
        share = n // S + (k < n % S)
        passes = -(-share // len(group))
        picks.append(np.concatenate([rng.permutation(group) for _ in range(passes)])[:share])
    return rng.permutation(np.concatenate(picks))


def _split(examples, fraction: float, seed: int):
    """(train, held out): round(fraction x n) examples (at least 1) chosen by `seed`."""
    n = len(examples)
    k = max(1, int(round(fraction * n)))
    if not 0 < fraction < 1 or k >= n:
        raise ValueError(f"--eval-fraction {fraction} must leave examples on both sides "
                         f"({n} example(s))")
    held = set(np.random.default_rng([seed, 0xE7A1]).permutation(n)[:k].tolist())
    return ([e for i, e in enumerate(examples) if i not in held],
            [e for i, e in enumerate(examples) if i in held])


@dataclasses.dataclass
class _Data:
    """What a run trains and evaluates on, loaded and checked before anything trains."""
    folder: str                 # the initial checkpoint's folder
    cfg: Qwen3TTSConfig
    ids: dict                   # speaker name -> its codec id (`export.check_init`)
    default: str | None         # the speaker of lines without one (--speaker-name, lower case)
    examples: list              # training lines (`data.Example`)
    eval_examples: list         # held-out lines (--eval-jsonl or --eval-fraction), or []
    xvecs: dict                 # reference audio -> its x-vector
    spk_x: dict                 # speaker -> the float32 mean of its distinct references' x-vectors


def _load_data(init_model: str, train_jsonl: str, speaker_name: str | None,
               replace_speaker: bool, speaker_encoder: str | None, eval_jsonl: str | None,
               eval_fraction: float | None, seed: int) -> tuple[_Data, dict]:
    """The run's lines, speakers and x-vectors (every input problem raised here, before training)
    and the initial checkpoint's float32 params with a speaker encoder."""
    from .. import checkpoint
    from .. import speaker_encoder as spk_mod
    from ..config import load_config
    from ..text import TextTokenizer
    from . import data, export

    tok = TextTokenizer.from_dir(checkpoint.resolve(init_model))
    examples = data.load_examples(train_jsonl, tok)
    if speaker_name is None:
        unnamed = [e.line for e in examples if e.speaker is None]
        if unnamed:
            raise data.DataError(f"{train_jsonl}: line(s) {unnamed[:10]} have no \"speaker\" "
                                 "and no --speaker-name was given")
    folder, cfg, ids, enc_folder = export.check_init(
        init_model, [e.speaker or speaker_name for e in examples], replace_speaker,
        speaker_encoder)
    default = speaker_name.lower() if speaker_name else None
    eval_examples = []
    if eval_jsonl:
        eval_examples = data.load_examples(eval_jsonl, tok)
    elif eval_fraction:
        examples, eval_examples = _split(examples, eval_fraction, seed)
    full = checkpoint.load_params(folder, cfg, jnp.float32)
    if "speaker_encoder" not in full:
        full["speaker_encoder"] = spk_mod.load_params(enc_folder,
                                                      load_config(enc_folder).speaker_encoder)
    base = os.path.dirname(os.path.abspath(train_jsonl))
    enc_cfg = cfg.speaker_encoder or load_config(enc_folder).speaker_encoder
    xvecs, problems = data.reference_xvectors([e.ref_audio for e in examples + eval_examples],
                                              full["speaker_encoder"], enc_cfg, base)
    if problems:
        raise data.DataError(f"{train_jsonl}: unusable reference audio:\n  "
                             + "\n  ".join(problems))
    spk_x = data.speaker_xvectors(examples, xvecs, default)
    return _Data(folder, cfg, ids, default, examples, eval_examples, xvecs, spk_x), full


def _resume(resume_dir: str, settings: dict, params, opt_state, repl, log):
    """(params, opt_state, info): the state saved in `resume_dir` by a run with the same
    `settings` (another run's is refused, naming the settings that differ), or the given ones
    and a fresh start (epoch 0, batch 0)."""
    if os.path.exists(os.path.join(resume_dir, "state.npz")):   # settings first, then arrays
        with np.load(os.path.join(resume_dir, "state.npz")) as z:
            saved = json.loads(str(z["info"]))["settings"]
        changed = {k: (saved.get(k), v) for k, v in settings.items() if saved.get(k) != v}
        changed.update({k: (v, None) for k, v in saved.items() if k not in settings})
        if changed:
            raise ValueError(f"{resume_dir} belongs to a run with other settings {changed}; use "
                             "another --output or delete it to start over")
    loaded = load_state(resume_dir, params, opt_state)
    if loaded is None:
        return params, opt_state, dict(epoch=0, next_batch=0, opt_steps=0)
    params, opt_state, info = loaded
    log(f"resuming from {resume_dir}: epoch {info['epoch']}, batch {info['next_batch']}")
    return jax.device_put(params, repl), jax.device_put(opt_state, repl), info


def finetune(init_model: str, train_jsonl: str, output: str, speaker_name: str | None,
             batch_size: int = 2, lr: float = 2e-5, epochs: int = 3, accum_steps: int = 4,
             weight_decay: float = 0.01, max_grad_norm: float = 1.0, seed: int = 0,
             save_every: int = 50, compute_dtype=None, remat: bool | None = None,
             progress: bool = True, log=print, max_steps: int | None = None,
             fixed_shapes: bool = False, speaker_balance: bool = True,
             replace_speaker: bool = False, speaker_encoder: str | None = None,
             lora_rank: int | None = None, lora_alpha: float | None = None,
             lora_targets=None, eval_jsonl: str | None = None, eval_fraction: float | None = None,
             best: bool = False, freeze_speaker_rows: bool = False) -> dict:
    """Fine-tune a Base checkpoint (or a CustomVoice one, with `speaker_encoder`) on one or more
    speakers; writes OUTPUT/checkpoint-epoch-N after each epoch (a CustomVoice checkpoint in the
    official layout, or with `lora_rank` an adapter folder, lora.py) and OUTPUT/resume/ (params
    + optimizer state) every `save_every` optimizer steps and at each epoch end. Rerunning the
    same command after a kill resumes from OUTPUT/resume. Every input problem is reported before
    training starts. `max_steps` stops after that many micro-batches (for tests and benchmarks).

    Speakers: a line's "speaker" key, else `speaker_name`; each speaker's x-vector is the float32
    mean over its distinct references (`data.speaker_xvectors`); with `speaker_balance` every
    speaker has an equal share of each epoch (`balanced_order`).
    LoRA (`lora_rank` >= 1): adapters of `lora_targets` (default all of lora.TARGETS) with scale
    `lora_alpha` / rank (alpha default: the rank) and the new speakers' rows are the only trained
    tensors; the base stays frozen in the compute dtype. The speaker rule under LoRA: every
    training and eval line feeds ITS SPEAKER'S ROW at the speaker slot (not its own reference's
    x-vector): the row that inference puts there for that speaker. The rows start at the
    speakers' mean x-vectors, train with the adapters (AdamW without weight decay) and are saved
    in the adapter; with `freeze_speaker_rows` they stay the mean x-vectors and each line feeds
    its own reference's x-vector, as in full fine-tuning.
    Evaluation: `eval_jsonl` or a held-out `eval_fraction` of the training lines gives the
    held-out loss (the same talker + 0.3 x sub-talker terms) after each epoch; with `best`,
    OUTPUT/checkpoint-best is the checkpoint with the lowest one. OUTPUT/metrics.jsonl gets a line
    per optimizer step and per evaluation.
    Shapes: each batch is padded to the shape buckets of its own longest example (`data.pad_to`;
    a few compiled programs, at most 1.5x padding), or with `fixed_shapes` to the dataset's
    longest (one program; more padding when lengths vary).
    Returns {"epochs", "steps" (this run), "losses" (per micro-batch), "checkpoints" (written by
    this run), "frames_per_second" (steps that did not compile), "params" (trained, float32:
    under LoRA the adapters and "speaker_rows", `lora_params`), "eval_losses" ({epoch: loss}),
    "speakers" ({name: codec id})}."""
    from tqdm import tqdm

    from .. import lora
    from . import data, export

    if best and not (eval_jsonl or eval_fraction):
        raise ValueError("--best needs --eval-jsonl or --eval-fraction")
    if lora_rank is not None and int(lora_rank) < 1:
        raise lora.AdapterError(f"--lora rank must be >= 1, got {lora_rank}")
    if freeze_speaker_rows and lora_rank is None:
        raise ValueError("--freeze-speaker-rows applies to --lora runs only (full fine-tuning "
                         "always feeds each line's own x-vector)")
    targets = lora.parse_targets(lora_targets or tuple(lora.TARGETS))
    d, full = _load_data(init_model, train_jsonl, speaker_name, replace_speaker, speaker_encoder,
                         eval_jsonl, eval_fraction, seed)
    folder, cfg, ids, default = d.folder, d.cfg, d.ids, d.default
    examples, eval_examples, xvecs, spk_x = d.examples, d.eval_examples, d.xvecs, d.spk_x
    rows = {name: (ids[name], spk_x[name]) for name in spk_x}
    names_of = [e.speaker or default for e in examples]
    use_lora = lora_rank is not None
    train_rows = use_lora and not freeze_speaker_rows
    row_of = {name: k for k, name in enumerate(spk_x)} if train_rows else None
    if train_rows:
        strays = sorted({e.speaker or default for e in eval_examples} - set(spk_x))
        if strays:
            raise data.DataError(f"eval speaker(s) {strays} have no training lines: under --lora "
                                 "an eval line is scored with its speaker's trained row")

    devices = len(jax.local_devices())
    rows_per_batch = -(-batch_size // devices) * devices
    batch_sh, repl = data_sharding()
    dtype = resolve_dtype(compute_dtype)
    alpha = float(lora_alpha if lora_alpha is not None else lora_rank or 1)
    frozen, lora_scale = None, None
    if use_lora:
        base_sha = lora.base_hash(folder)
        frozen = jax.device_put(jax.tree.map(lambda a: jnp.asarray(a, dtype), trainable(full)), repl)
        params = jax.device_put(lora_params(
            lora.init_adapters(full, int(lora_rank), targets, seed),
            np.stack(list(spk_x.values())) if train_rows else None), repl)
        lora_scale = lora.scale_of(lora_rank, alpha)
    else:
        params = jax.device_put(trainable(full), repl)
    del full
    optimizer = make_optimizer(lr, weight_decay, max_grad_norm)
    opt_state = jax.device_put(init_opt_state(optimizer, params), repl)
    step = make_train_step(cfg, lr, weight_decay, max_grad_norm, accum_steps, compute_dtype, remat,
                           lora_scale)
    step_args = (frozen,) if use_lora else ()

    os.makedirs(output, exist_ok=True)
    resume_dir = os.path.join(output, "resume")
    log_file = os.path.join(output, "metrics.jsonl")
    settings = dict(train_jsonl=os.path.abspath(train_jsonl), examples=len(examples),
                    batch_size=batch_size, accum_steps=accum_steps, seed=seed, lr=lr,
                    speaker=default, init_model=os.path.abspath(folder))
    # keys only when used: a resume state of a run made before they existed still matches
    extra = dict(speakers=sorted(rows) if len(rows) > 1 else None,
                 speaker_balance=speaker_balance if len(rows) > 1 else None,
                 lora=[int(lora_rank), alpha, list(targets)] if use_lora else None,
                 freeze_speaker_rows=True if use_lora and freeze_speaker_rows else None,
                 eval=[os.path.abspath(eval_jsonl) if eval_jsonl else None, eval_fraction,
                       bool(best)] if eval_examples else None)
    settings.update({k: v for k, v in extra.items() if v is not None})
    params, opt_state, info = _resume(resume_dir, settings, params, opt_state, repl, log)
    epoch, next_batch, opt_steps = info["epoch"], info["next_batch"], info["opt_steps"]
    log_bytes = info.get("log_bytes", 0)
    best_loss, best_epoch = info.get("best_loss"), info.get("best_epoch")
    # the metrics log holds exactly the lines of the steps the saved state has seen
    with open(log_file, "a+b") as f:
        f.truncate(log_bytes)

    def write_log(record: dict) -> None:
        nonlocal log_bytes
        with open(log_file, "ab") as f:
            f.write((json.dumps(record) + "\n").encode())
            log_bytes = f.tell()

    def state_info():
        return dict(settings=settings, epoch=epoch, next_batch=next_batch, opt_steps=opt_steps,
                    log_bytes=log_bytes, best_loss=best_loss, best_epoch=best_epoch)

    def order_of(ep):
        if speaker_balance and len(rows) > 1:
            return balanced_order(names_of, seed, ep)
        return epoch_order(len(examples), seed, ep)

    def export_epoch(path):
        if use_lora:
            host = jax.device_get(params)
            saved = rows if not train_rows else {
                n: (ids[n], host["speaker_rows"][k]) for n, k in row_of.items()}
            return lora.save_adapter(path, host, rank=int(lora_rank), alpha=alpha,
                                     targets=targets, base_sha256=base_sha, speakers=saved)
        return export.export_checkpoint(folder, path, params, cfg, rows)

    n_batches = -(-len(examples) // batch_size)
    fixed = {}
    if fixed_shapes:
        everything = examples + eval_examples
        fixed = dict(length=ladder(max(len(e.text_ids) + len(e.codes) for e in everything) + 8),
                     frames=ladder(max(len(e.codes) for e in everything)))

    def evaluate():
        ev = _jitted_eval(cfg, dtype, lora_scale)
        tot = {"talker_sum": 0.0, "talker_count": 0, "sub_talker_sum": 0.0, "sub_talker_count": 0}
        for i in range(0, len(eval_examples), batch_size):
            host = data.pad_to(data.collate(eval_examples[i:i + batch_size], cfg, xvecs, row_of, default),
                               rows=rows_per_batch, **fixed)
            m = ev(params, jax.device_put(host, batch_sh), *step_args)
            for k in tot:
                tot[k] += float(m[k])
        t = tot["talker_sum"] / max(tot["talker_count"], 1)
        sub = tot["sub_talker_sum"] / max(tot["sub_talker_count"], 1)
        return {"eval_loss": t + SUB_TALKER_WEIGHT * sub, "eval_talker_loss": t,
                "eval_sub_talker_loss": sub}

    losses, ckpts, steps_done, eval_losses = [], [], 0, {}
    # Throughput: codec frames / seconds of the steps that did not compile (a step with a new
    # shape compiles); checkpoint writing is not counted.
    frames_done, train_s, shapes_seen = 0, 0.0, set()
    group = []            # the micro-batches of the optimizer step in progress (for the log)
    while epoch < epochs:
        order = order_of(epoch)
        bar = tqdm(total=n_batches, initial=next_batch, disable=not progress,
                   desc=f"epoch {epoch}", unit="batch")
        while next_batch < n_batches:
            idx = order[next_batch * batch_size:(next_batch + 1) * batch_size]
            host = data.pad_to(data.collate([examples[i] for i in idx], cfg, xvecs, row_of, default),
                               rows=rows_per_batch, **fixed)
            t_step = time.perf_counter()
            batch = jax.device_put(host, batch_sh)
            batch["flush"] = jax.device_put(np.bool_(next_batch == n_batches - 1), repl)
            params, opt_state, m = step(params, opt_state, batch, jax.random.key(0), *step_args)
            loss = float(m["loss"])                      # waits for the step
            dt = time.perf_counter() - t_step
            shape = (host["input_ids"].shape, host["frame_valid"].shape)
            if shape in shapes_seen:
                frames_done += data.batch_frames(host)
                train_s += dt
            shapes_seen.add(shape)
            group.append((loss, float(m["talker_loss"]), float(m["sub_talker_loss"]),
                          data.batch_frames(host), int(host["attention_mask"].sum()), dt))
            losses.append(loss)
            next_batch += 1
            steps_done += 1
            if bool(m["applied"]):
                opt_steps += 1
                g = np.asarray(group, np.float64)
                secs = g[:, 5].sum()
                write_log({"event": "step", "step": opt_steps, "epoch": epoch,
                           "loss": g[:, 0].mean(), "talker_loss": g[:, 1].mean(),
                           "sub_talker_loss": g[:, 2].mean(), "grad_norm": float(m["grad_norm"]),
                           "lr": lr, "frames_per_s": g[:, 3].sum() / secs,
                           "tokens_per_s": g[:, 4].sum() / secs})
                group = []
                if save_every and opt_steps % save_every == 0:
                    save_state(resume_dir, params, opt_state, state_info())
            rate = f", {frames_done / train_s:.1f} frames/s" if train_s > 0 else ""
            bar.set_postfix_str(f"loss {loss:.4f}{rate}")
            bar.update(1)
            if max_steps is not None and steps_done >= max_steps:
                break
        bar.close()
        if next_batch < n_batches:       # stopped by max_steps
            save_state(resume_dir, params, opt_state, state_info())
            break
        path = export_epoch(os.path.join(output, f"checkpoint-epoch-{epoch}"))
        ckpts.append(path)
        log(f"epoch {epoch}: wrote {path}")
        if eval_examples:
            ev = evaluate()
            eval_losses[epoch] = ev["eval_loss"]
            write_log({"event": "eval", "epoch": epoch, "step": opt_steps, **ev})
            log(f"epoch {epoch}: eval loss {ev['eval_loss']:.4f}")
            if best and (best_loss is None or ev["eval_loss"] < best_loss):
                best_loss, best_epoch = ev["eval_loss"], epoch
                _copy_best(path, os.path.join(output, "checkpoint-best"),
                           {"epoch": epoch, "eval_loss": best_loss, "source": path})
                log(f"epoch {epoch}: best so far -> {os.path.join(output, 'checkpoint-best')}")
        epoch, next_batch = epoch + 1, 0
        save_state(resume_dir, params, opt_state, state_info())
    return {"epochs": epoch, "steps": steps_done, "losses": losses, "checkpoints": ckpts,
            "frames_per_second": frames_done / train_s if train_s > 0 else None,
            "params": params, "eval_losses": eval_losses, "speakers": ids,
            "best_epoch": best_epoch}


def _copy_best(src: str, dst: str, info: dict) -> None:
    """dst = a copy of the checkpoint folder src plus best.json; replaced atomically."""
    import shutil

    tmp = dst.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    with open(os.path.join(tmp, "best.json"), "w") as f:
        json.dump(info, f, indent=1)
    if os.path.exists(dst):
        shutil.rmtree(dst)
    os.replace(tmp, dst)
