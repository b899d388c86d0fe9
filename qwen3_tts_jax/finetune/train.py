"""The training computation of the official `finetuning/sft_12hz.py`, as pure functions, and the loop.

    step = make_train_step(cfg)                    # jitted; static: cfg, dtype, accumulation
    params, opt_state, metrics = step(params, opt_state, batch, rng)

`loss_fn` is the official per-batch loss with its evident bugs fixed (docs/finetuning.md):
  inputs   text_projection(text_embedding(text ids)) * text mask          (official: no projection)
           + codec_embedding(codec ids) * codec mask, the x-vector at position 6
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
then AdamW (lr 2e-5, betas (0.9, 0.999), eps 1e-8, weight decay 0.01 on every parameter). Only
the talker and code predictor train; the speaker encoder is frozen (the official detaches its
output) and is not part of the optimised params.

Precision: params (master weights) and optimizer state are float32; on GPU/TPU the forward and
backward run in bfloat16 (`compute_dtype`), with RMSNorm statistics, RoPE angles, softmax, logits
and cross-entropy in float32. On CPU everything is float32.
"""
from __future__ import annotations

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
from ..buckets import ladder
from ..sharding import data_sharding
from ..config import Qwen3TTSConfig, TransformerConfig
from .data import SPEAKER_SLOT

TRAINABLE = ("talker", "code_predictor")
SUB_TALKER_WEIGHT = 0.3


# ----------------------------------------------------------------------------- forward + loss

def _stack(p, x_BxTxD, pos_BxT, mask_BxTxT, cfg: TransformerConfig, remat: bool):
    """A full-sequence pass of a Qwen3 decoder stack (no KV cache), from layers.py's pieces.
    Returns the final-norm hidden states."""
    cos_sin = layers.transformer_rope(pos_BxT, cfg, x_BxTxD.dtype)
    H, K, Dh, eps = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.rms_norm_eps

    def layer(lp, x):
        B, T, _ = x.shape
        a = lp["attn"]
        h = layers.rms_norm(lp["input_norm"], x, eps)
        q = layers.rms_norm(a["q_norm"], (h @ a["q"]).reshape(B, T, H, Dh), eps)
        k = layers.rms_norm(a["k_norm"], (h @ a["k"]).reshape(B, T, K, Dh), eps)
        v = (h @ a["v"]).reshape(B, T, K, Dh)
        q, k = layers.apply_rope(q, *cos_sin), layers.apply_rope(k, *cos_sin)
        o = layers.dot_product_attention(q, k, v, mask_BxTxT)
        x = x + o.reshape(B, T, H * Dh) @ a["o"]
        return x + layers.mlp(lp["mlp"], layers.rms_norm(lp["post_norm"], x, eps), cfg.hidden_act)

    if remat:
        layer = jax.checkpoint(layer)
    for lp in p["layers"]:
        x_BxTxD = layer(lp, x_BxTxD)
    return layers.rms_norm(p["norm"], x_BxTxD, eps)


def _cross_entropy(logits_NxV, labels_N, valid_N):
    """Sum of token cross-entropies over the valid entries (f32) and their count."""
    lse = jax.nn.logsumexp(logits_NxV, axis=-1)
    picked = jnp.take_along_axis(logits_NxV, jnp.where(valid_N, labels_N, 0)[..., None],
                                 axis=-1)[..., 0]
    return jnp.sum(jnp.where(valid_N, lse - picked, 0.0)), jnp.sum(valid_N)


def input_embeddings(tp, cp, batch, dtype, act: str = "silu"):
    """The talker's input (B, T, D): text + codec streams, x-vector at the speaker slot, and the
    embeddings of codebooks 1..15 on the frame positions (official sft_12hz.py, projection fixed)."""
    ids = batch["input_ids"]
    text = talker.embed_text(tp, ids[..., 0], act) * batch["text_embedding_mask"][..., None].astype(dtype)
    codec = tp["codec_embedding"][ids[..., 1]] * batch["codec_embedding_mask"][..., None].astype(dtype)
    codec = codec.at[:, SPEAKER_SLOT].set(batch["x_vectors"].astype(dtype))
    x = text + codec
    on_frames = batch["codec_mask"][..., None].astype(dtype)
    return x + _embed_groups(cp, batch["codec_ids"][..., 1:]).sum(axis=-2) * on_frames


def _embed_groups(cp, codes_BxTxG):
    """codec_embedding[g](code of group g + 1) for g < G, in one gather: (B, T, G, D)."""
    G = codes_BxTxG.shape[-1]
    return cp["codec_embedding"][jnp.arange(G), codes_BxTxG]


def loss_fn(params, batch, cfg: Qwen3TTSConfig, compute_dtype=jnp.float32, remat: bool = False):
    """(loss, metrics) of one batch (see the module docstring). params: {"talker",
    "code_predictor"} (float32 master weights; cast to compute_dtype here)."""
    p = jax.tree.map(lambda a: a.astype(compute_dtype), params)
    tp, cp = p["talker"], p["code_predictor"]
    tc = cfg.talker
    x = input_embeddings(tp, cp, batch, compute_dtype, tc.hidden_act)
    B, T, _ = x.shape
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    causal = jnp.arange(T)[None, :] <= jnp.arange(T)[:, None]
    mask = causal[None] & (batch["attention_mask"] > 0)[:, None, :]
    h = _stack(tp, x, pos, mask, tc, remat)                              # (B, T, D)

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
                remat)
    sub_logits = jnp.einsum("ngd,gdv->ngv", hc[:, 1:], cp["lm_head"][:G],
                            preferred_element_type=jnp.float32)          # (N, 15, 2048)
    sub_valid = jnp.broadcast_to(valid.reshape(B * F, 1), (B * F, G))
    s_sum, s_count = _cross_entropy(sub_logits, fcodes[..., 1:].reshape(B * F, G), sub_valid)
    sub_loss = s_sum / jnp.maximum(s_count, 1)

    loss = talker_loss + SUB_TALKER_WEIGHT * sub_loss
    return loss, {"loss": loss, "talker_loss": talker_loss, "sub_talker_loss": sub_loss,
                  "frames": jnp.sum(valid)}


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


def make_optimizer(lr: float = 2e-5, weight_decay: float = 0.01,
                   max_grad_norm: float = 1.0) -> optax.GradientTransformation:
    """The official optimizer: torch AdamW (betas 0.9/0.999, eps 1e-8, decoupled decay on all
    params) after clipping to `max_grad_norm`."""
    return optax.chain(clip_by_global_norm_torch(max_grad_norm),
                       optax.adamw(lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=weight_decay))


class AccumState(NamedTuple):
    """Optimizer state with gradient accumulation: the inner optax state, the running sum of
    micro-batch gradients / accum_steps, and how many micro-batches it holds."""
    inner: optax.OptState
    grads: dict
    micro: jax.Array


def init_opt_state(optimizer, params) -> AccumState:
    return AccumState(optimizer.init(params), jax.tree.map(jnp.zeros_like, params),
                      jnp.zeros((), jnp.int32))


def train_step(params, opt_state: AccumState, batch, rng, *, cfg: Qwen3TTSConfig,
               optimizer: optax.GradientTransformation, accum_steps: int = 4,
               compute_dtype=jnp.float32, remat: bool = False):
    """One micro-batch: gradients of `loss_fn`, accumulated; every `accum_steps`-th call (or when
    batch["flush"] is true: the epoch's last batch) clips, applies AdamW and clears the sum.

    Pure: (params, opt_state, batch, rng) -> (params, opt_state, metrics). `rng` is accepted for
    the standard signature; the official computation has no randomness (no dropout)."""
    del rng
    flush = batch["flush"]
    batch = {k: v for k, v in batch.items() if k != "flush"}
    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, batch, cfg, compute_dtype, remat)
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
                    remat: bool | None = None):
    """`train_step` with `make_optimizer(lr, weight_decay, max_grad_norm)`, jitted with its static
    settings bound and params / opt_state donated; one jitted function per distinct setting (so a
    resumed run in the same process reuses the compiled programs). compute_dtype defaults to
    bfloat16 on accelerators and float32 on CPU; remat (recompute each layer in the backward pass:
    less memory) defaults to on for accelerators."""
    on_cpu = jax.default_backend() == "cpu"
    compute_dtype = jnp.dtype(compute_dtype or (jnp.float32 if on_cpu else jnp.bfloat16))
    remat = (not on_cpu) if remat is None else bool(remat)
    return _jitted_step(cfg, float(lr), float(weight_decay), float(max_grad_norm),
                        int(accum_steps), compute_dtype, remat)


@functools.lru_cache(maxsize=8)
def _jitted_step(cfg, lr, weight_decay, max_grad_norm, accum_steps, compute_dtype, remat):
    fn = functools.partial(train_step, cfg=cfg,
                           optimizer=make_optimizer(lr, weight_decay, max_grad_norm),
                           accum_steps=accum_steps, compute_dtype=compute_dtype, remat=remat)
    return jax.jit(fn, donate_argnums=(0, 1))


def trainable(params) -> dict:
    """The optimised subset of a loaded params tree (talker + code predictor), float32."""
    return {k: jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params[k]) for k in TRAINABLE}


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


def finetune(init_model: str, train_jsonl: str, output: str, speaker_name: str,
             batch_size: int = 2, lr: float = 2e-5, epochs: int = 3, accum_steps: int = 4,
             weight_decay: float = 0.01, max_grad_norm: float = 1.0, seed: int = 0,
             save_every: int = 50, compute_dtype=None, remat: bool | None = None,
             progress: bool = True, log=print, max_steps: int | None = None,
             fixed_shapes: bool = False) -> dict:
    """Fine-tune a Base checkpoint on one speaker; writes OUTPUT/checkpoint-epoch-N (a CustomVoice
    checkpoint, official layout) after each epoch and OUTPUT/resume/ (params + optimizer state)
    every `save_every` optimizer steps and at each epoch end. Rerunning the same command after a
    kill resumes from OUTPUT/resume. Every input problem is reported before training starts.
    `max_steps` stops after that many micro-batches (for tests and benchmarks).
    Shapes: each batch is padded to the shape buckets of its own longest example (`data.pad_to`;
    a few compiled programs, at most 1.5x padding), or with `fixed_shapes` to the dataset's
    longest (one program; more padding when lengths vary).
    Returns {"epochs", "steps" (this run), "losses" (per micro-batch), "checkpoints" (written by
    this run), "frames_per_second" (steps that did not compile), "params" (trained, float32)}."""
    from tqdm import tqdm

    from .. import checkpoint
    from ..text import TextTokenizer
    from . import data, export

    folder, cfg, speaker = export.check_base(init_model, speaker_name)
    tok = TextTokenizer.from_dir(folder)
    examples = data.load_examples(train_jsonl, tok)
    full = checkpoint.load_params(folder, cfg, jnp.float32)
    base = os.path.dirname(os.path.abspath(train_jsonl))
    xvecs, problems = data.reference_xvectors([e.ref_audio for e in examples],
                                              full["speaker_encoder"], cfg.speaker_encoder, base)
    if problems:
        raise data.DataError(f"{train_jsonl}: unusable reference audio:\n  "
                             + "\n  ".join(problems))
    # The speaker's x-vector in the exported checkpoint: the first example's reference (the
    # official keeps that of the first row of the first shuffled batch; the same when every line
    # has the same ref_audio, as the official README recommends).
    speaker_xvec = xvecs[examples[0].ref_audio]

    devices = len(jax.local_devices())
    rows = -(-batch_size // devices) * devices
    batch_sh, repl = data_sharding()
    params = jax.device_put(trainable(full), repl)
    del full
    optimizer = make_optimizer(lr, weight_decay, max_grad_norm)
    opt_state = jax.device_put(init_opt_state(optimizer, params), repl)
    step = make_train_step(cfg, lr, weight_decay, max_grad_norm, accum_steps, compute_dtype, remat)

    resume_dir = os.path.join(output, "resume")
    settings = dict(train_jsonl=os.path.abspath(train_jsonl), examples=len(examples),
                    batch_size=batch_size, accum_steps=accum_steps, seed=seed, lr=lr,
                    speaker=speaker, init_model=os.path.abspath(folder))
    epoch, next_batch, opt_steps = 0, 0, 0
    loaded = load_state(resume_dir, params, opt_state)
    if loaded is not None:
        params, opt_state, info = loaded
        changed = {k: (info["settings"].get(k), v) for k, v in settings.items()
                   if info["settings"].get(k) != v}
        if changed:
            raise ValueError(f"{resume_dir} belongs to a run with other settings {changed}; use "
                             "another --output or delete it to start over")
        params, opt_state = jax.device_put(params, repl), jax.device_put(opt_state, repl)
        epoch, next_batch, opt_steps = info["epoch"], info["next_batch"], info["opt_steps"]
        log(f"resuming from {resume_dir}: epoch {epoch}, batch {next_batch}")

    def state_info():
        return dict(settings=settings, epoch=epoch, next_batch=next_batch, opt_steps=opt_steps)

    n_batches = -(-len(examples) // batch_size)
    fixed = {}
    if fixed_shapes:
        fixed = dict(length=ladder(max(len(e.text_ids) + len(e.codes) for e in examples) + 8),
                     frames=ladder(max(len(e.codes) for e in examples)))
    losses, ckpts, steps_done = [], [], 0
    # Throughput: codec frames / seconds of the steps that did not compile (a step with a new
    # shape compiles); checkpoint writing is not counted.
    frames_done, train_s, shapes_seen = 0, 0.0, set()
    while epoch < epochs:
        order = epoch_order(len(examples), seed, epoch)
        bar = tqdm(total=n_batches, initial=next_batch, disable=not progress,
                   desc=f"epoch {epoch}", unit="batch")
        while next_batch < n_batches:
            idx = order[next_batch * batch_size:(next_batch + 1) * batch_size]
            host = data.pad_to(data.collate([examples[i] for i in idx], cfg, xvecs), rows=rows,
                               **fixed)
            t_step = time.perf_counter()
            batch = jax.device_put(host, batch_sh)
            batch["flush"] = jax.device_put(np.bool_(next_batch == n_batches - 1), repl)
            params, opt_state, m = step(params, opt_state, batch, jax.random.key(0))
            loss = float(m["loss"])                      # waits for the step
            shape = (host["input_ids"].shape, host["frame_valid"].shape)
            if shape in shapes_seen:
                frames_done += data.batch_frames(host)
                train_s += time.perf_counter() - t_step
            shapes_seen.add(shape)
            losses.append(loss)
            next_batch += 1
            steps_done += 1
            if bool(m["applied"]):
                opt_steps += 1
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
        path = export.export_checkpoint(folder, os.path.join(output, f"checkpoint-epoch-{epoch}"),
                                        params, cfg, speaker, speaker_xvec)
        ckpts.append(path)
        log(f"epoch {epoch}: wrote {path}")
        epoch, next_batch = epoch + 1, 0
        save_state(resume_dir, params, opt_state, state_info())
    return {"epochs": epoch, "steps": steps_done, "losses": losses, "checkpoints": ckpts,
            "frames_per_second": frames_done / train_s if train_s > 0 else None,
            "params": params}
