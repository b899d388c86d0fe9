"""Generation as one compiled program: prefill, then a `lax.while_loop` over frames with the 15
code-predictor steps inside, preallocated KV caches and sampling on device.

    state, ctx = prefill(params, cfg, batch, settings, keys, frames=F, options=o)  # (B, L, Lt, F)
    state = decode(params, cfg, state, ctx, settings, F, o)   # the frame loop; resumable
    codes, lengths = state.codes, state.length

`decode` runs frames until every row has emitted EOS, the token budget is used, or `until` frames
exist; calling it again continues where it stopped, which is what chunked streaming needs: the same
compiled step serves offline generation (one call) and streaming (a Python loop over chunks).

Static (compile-time) values are only shapes: batch B, prompt bucket L, trailing-text bucket Lt and
frame bucket F, plus the configs, the `options.Options` (kernel and layout choices) and the
prefill's compute length (on finer steps than L). Everything that changes per request is traced:
the prompt ids,
the settings (temperature, top-k, top-p, penalty, greedy or not, per row), `max_new_tokens`, the PRNG
keys. Official semantics (shared NOTES.md section 7): the repetition penalty covers the code-0 tokens
generated so far; EOS is blocked for the first 2 tokens; ids vocab-1024..vocab-1 except EOS are
suppressed; the last token sampled is never fed back, so frames = tokens - 1.

Prompt prefixes: `prefix_kv` runs a prompt's request-independent leading positions alone
(`prompts.Prompt.prefix_len`, batch 1, positions 0..P-1) and returns their per-layer KV;
`prefill` and `insert` take such KV for their rows (`Prefix`), write it into each row's slots
[pad, pad + P) and compute only the positions after it. RoPE positions start at 0 at a row's
first real token, so the same KV serves any left padding or slot offset (`prefix_cache.py`
keeps them).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from . import code_predictor, layers, sampling, talker
from .buckets import fine, ladder, power_of_two as bucket
from .config import Qwen3TTSConfig
from .options import Options

MIN_NEW_TOKENS = 2  # hard-coded in the official generate
NONE = -1           # "no such part" in a prompt's id arrays (prompts.py)


class Settings(NamedTuple):
    """Per-row generation settings, all traced."""
    talker: sampling.SamplingParams
    predictor: sampling.SamplingParams
    repetition_penalty: jax.Array   # (B,) f32
    max_new_tokens: jax.Array       # (B,) int32; frames <= max_new_tokens - 1


class Context(NamedTuple):
    """Per-request constants the frame loop reads (not donated)."""
    trailing_BxLtxD: jax.Array
    trailing_len_B: jax.Array
    pad_embed_D: jax.Array
    first_slot_B: jax.Array         # cache slot of each row's first real prompt token
    real_len_B: jax.Array           # prompt length without padding
    first_frame_B: jax.Array        # value of `State.step` at the row's frame 0 (0 unless the
                                    # row joined a running batch: `insert`)


class State(NamedTuple):
    step: jax.Array                 # () frames the batch has run: the frame loop writes cache
                                    # slot L + step and codes[:, step]; row b is at its own frame
                                    # step - first_frame_B[b]
    token_B: jax.Array              # code 0 to feed at this step
    hidden_BxD: jax.Array           # talker final-norm hidden of the last position
    caches: list                    # talker KV caches, L + F positions per layer (layers.py)
    codes_BxFxG: jax.Array          # int32 output buffer
    done_B: jax.Array               # row has emitted EOS or used its budget
    length_B: jax.Array             # frames of each row
    seen_BxV: jax.Array             # code-0 tokens generated so far (repetition penalty)
    keys_B: jax.Array               # per-row PRNG keys
    logits_BxV: jax.Array           # raw f32 talker logits of the last step (for inspection)


def embed_prompts(p, cfg: Qwen3TTSConfig, text_BxL, codec_BxLxG, extra_BxD, extra_pos_B):
    """Sum of the text / codec / extra parts of every position (see prompts.py)."""
    tp = p["talker"]
    has_text = (text_BxL != NONE)[..., None]
    text = talker.embed_text(tp, jnp.maximum(text_BxL, 0), cfg.talker.hidden_act)
    x = jnp.where(has_text, text, 0)
    tables = [tp["codec_embedding"]] + list(p["code_predictor"]["codec_embedding"])  # 1 + 15
    codec = None
    for g, table in enumerate(tables[:codec_BxLxG.shape[-1]]):
        ids = codec_BxLxG[..., g]
        e = jnp.where((ids != NONE)[..., None], table[jnp.maximum(ids, 0)], 0)
        codec = e if codec is None else codec + e
    x = x + codec
    L = text_BxL.shape[1]
    at_extra = (jnp.arange(L)[None, :] == extra_pos_B[:, None])[..., None]
    return jnp.where(at_extra, x + extra_BxD[:, None].astype(x.dtype), x)


def _next_token(cfg: Qwen3TTSConfig, logits_BxV, seen_BxV, n_generated, settings, keys_B,
                options: Options):
    """The official talker processors (penalty, min new tokens, suppression), then sampling."""
    t = cfg.talker
    lg = sampling.process_talker_logits(
        logits_BxV, seen_BxV, settings.repetition_penalty, n_generated,
        sampling.talker_suppress_mask(t.vocab_size, t.codec_eos_token_id), t.codec_eos_token_id,
        MIN_NEW_TOKENS)
    return sampling.sample(keys_B, lg, settings.talker, options)


def _fold(keys_B, data):
    """Each row's key folded with `data`: a scalar, or one value per row (B,)."""
    data_B = jnp.broadcast_to(jnp.asarray(data, jnp.uint32), keys_B.shape[:1])
    return jax.vmap(jax.random.fold_in)(keys_B, data_B)


def prefill_length(mask_BxL, prefix_len_B=None) -> int | None:
    """The `compute` argument of `prefill` for a left-padded batch: its longest row on the finer
    `buckets.fine` steps, or None (all L positions) where that is L or the mask cannot be read on
    this host. The prompt bucket L (`buckets.ladder`) sizes the KV cache and so every frame-loop
    program; the prefill runs only the positions some row uses (35 tokens in a bucket of 48: 40).
    `prefix_len_B`: positions of each row that come from a stored prefix (`Prefix.length_B`),
    which need no computing: the longest row's rest counts."""
    if not getattr(mask_BxL, "is_fully_addressable", True):
        return None
    L = mask_BxL.shape[1]
    n_B = np.asarray(mask_BxL).sum(-1)
    if prefix_len_B is not None:
        n_B = n_B - np.asarray(prefix_len_B)
    compute = min(L, fine(int(n_B.max())))
    return None if compute == L else compute


class Prefix(NamedTuple):
    """Stored KV of the leading positions of each row's prompt (`prefix_kv`), for `prefill` and
    `insert`: per layer a cache of the layout `Options.cache_layout` with room for P slots (the
    batch's rows, or the one row of `insert`), and how many of them each row uses (0: none; the
    row is computed whole)."""
    caches: list
    length_B: jax.Array             # int32 (B,)


@functools.partial(jax.jit, static_argnames=("cfg", "options"))
def prefix_kv(params, cfg: Qwen3TTSConfig, text_1xP, codec_1xPxG, extra_1xD, extra_pos_1,
              *, options: Options) -> list:
    """The per-layer KV of a prompt prefix run alone: one row, positions 0..P-1 from slot 0,
    causal. Positions past the prefix's real length may hold NONE ids (padding to a bucket):
    causality keeps them out of the real positions' KV, which `Prefix.length_B` selects."""
    tp = params["talker"]
    P = text_1xP.shape[1]
    dtype = tp["codec_embedding"].dtype
    x = embed_prompts(params, cfg, text_1xP, codec_1xPxG, extra_1xD, extra_pos_1).astype(dtype)
    pos = jnp.arange(P, dtype=jnp.int32)[None]
    mask = jnp.arange(P)[None, None, :] <= jnp.arange(P)[None, :, None]
    caches = layers.init_cache(cfg.talker, 1, P, dtype, options)
    _, _, caches = talker.forward(tp, x, pos, caches, 0, mask, cfg.talker, options)
    return caches


def prefill_lengths(L: int) -> list[int | None]:
    """Every `prefill_length` of a batch whose prompt bucket is L = `buckets.ladder(n)` (two at most:
    the bucket of 48 holds prompts of 33-40 and 41-48 positions): what a warm-up compiles."""
    below, b = 0, ladder(1)
    while b < L:
        below, b = b, ladder(b + 1)
    return sorted({None if fine(n) >= L else fine(n) for n in range(below + 1, L + 1)},
                  key=lambda c: L if c is None else c)


@functools.partial(jax.jit, static_argnames=("cfg", "frames", "compute", "options"))
def prefill(params, cfg: Qwen3TTSConfig, batch, settings: Settings, keys_B,
            frames: int, compute: int | None = None, prefix: Prefix | None = None, *,
            options: Options):
    """Embed and run the prompt batch, sample the first code-0 token. Returns (State, Context).

    `compute` (static; None: L): run only the last `compute` of the L prompt positions, which must
    hold every row's real tokens (`prefill_length`); the cache keeps L prompt slots, the first
    L - compute of them unwritten and masked like any left padding, so the frame loop is the same
    program as after a full prefill, and so are its results.

    `prefix`: stored KV of each row's first `length_B[b]` real positions (`prefix_kv`), written
    into the row's slots [pad, pad + length); then `compute` need only hold every row's real
    positions after its prefix (`prefill_length(mask, prefix.length_B)`)."""
    tp = params["talker"]
    mask_BxL = batch.mask_BxL
    B, L = batch.text_BxL.shape
    C = L if compute is None else compute
    dtype = tp["codec_embedding"].dtype
    x = embed_prompts(params, cfg, batch.text_BxL, batch.codec_BxLxG, batch.extra_BxD,
                      batch.extra_pos_B).astype(dtype)
    act = cfg.talker.hidden_act
    trailing = talker.embed_text(tp, batch.trailing_BxLt, act).astype(dtype)
    pad_embed = talker.embed_text(tp, jnp.asarray([cfg.tts_pad_token_id]), act)[0].astype(dtype)
    pad_count = L - mask_BxL.sum(-1).astype(jnp.int32)
    pos = jnp.maximum(jnp.cumsum(mask_BxL, axis=-1) - 1, 0)
    S = L + frames
    slots = jnp.arange(S)
    causal = slots[None, None, :] <= jnp.arange(L - C, L)[None, :, None]
    mask = causal & (slots[None, None, :] >= pad_count[:, None, None])
    caches = layers.init_cache(cfg.talker, B, S, dtype, options)
    if prefix is not None:
        caches = [c.put_prefix(p, pad_count, prefix.length_B)
                  for c, p in zip(caches, prefix.caches)]
    h, logits, caches = talker.forward(tp, x[:, L - C:], pos[:, L - C:], caches, L - C, mask,
                                       cfg.talker, options)
    seen = jnp.zeros((B, cfg.talker.vocab_size), bool)
    token = _next_token(cfg, logits[:, -1], seen, 0, settings, _fold(keys_B, 0), options)
    state = State(step=jnp.zeros((), jnp.int32), token_B=token, hidden_BxD=h[:, -1], caches=caches,
                  codes_BxFxG=jnp.zeros((B, frames, cfg.talker.num_code_groups), jnp.int32),
                  done_B=settings.max_new_tokens <= 1, length_B=jnp.zeros((B,), jnp.int32),
                  seen_BxV=seen, keys_B=keys_B, logits_BxV=logits[:, -1])
    ctx = Context(trailing, batch.trailing_len_B, pad_embed, pad_count, L - pad_count,
                  jnp.zeros((B,), jnp.int32))
    return state, ctx


def frame_step(params, cfg: Qwen3TTSConfig, state: State, ctx: Context, settings: Settings,
               options: Options) -> State:
    """One frame: codes 1..15 for the current code-0 token, then the talker step that samples the
    next code-0 token. The batch writes one cache slot (L + step); each row reads its own frame
    number (positions, trailing text, PRNG folding, minimum length, budget), so rows that joined
    later (`insert`) run in the same step."""
    tp, cpp = params["talker"], params["code_predictor"]
    n = state.step
    n_B = n - ctx.first_frame_B                      # each row's own frame
    B, F, G = state.codes_BxFxG.shape
    L = state.caches[0].length - F  # prompt bucket
    keys = _fold(state.keys_B, n_B + 1)
    code0_emb = talker.embed_codec(tp, state.token_B)

    def sample_cp(j, logits_BxV):
        return sampling.sample(_fold(keys, 1000 + j), logits_BxV, settings.predictor, options)

    rest, _ = code_predictor.predict(cpp, cfg.talker, state.hidden_BxD, code0_emb, sample_cp,
                                     options)
    frame = jnp.concatenate([state.token_B[:, None], rest], axis=1)
    codes = jax.lax.dynamic_update_slice_in_dim(state.codes_BxFxG, frame[:, None], n, axis=1)

    Lt = ctx.trailing_BxLtxD.shape[1]
    at = jnp.clip(n_B, 0, Lt - 1)
    trailing = jnp.take_along_axis(ctx.trailing_BxLtxD, at[:, None, None], axis=1)[:, 0]
    text = jnp.where((n_B < ctx.trailing_len_B)[:, None], trailing, ctx.pad_embed_D[None])
    x = code0_emb + code_predictor.embed_codes(cpp, rest) + text
    h, logits, caches = talker.step(tp, x.astype(code0_emb.dtype), ctx.real_len_B + n_B,
                                    state.caches, L + n, ctx.first_slot_B, cfg.talker, options)
    seen = sampling.mark_seen(state.seen_BxV, state.token_B)
    token = _next_token(cfg, logits, seen, n_B + 1, settings, keys, options)

    # This frame is real for rows not yet done; a row ends when it samples EOS or its budget
    # (max_new_tokens - 1 frames) is used. An ended row keeps its last token, so that
    # `budget_reached` can tell the two ends apart.
    live = ~state.done_B
    length = jnp.where(live, n_B + 1, state.length_B)
    token = jnp.where(live, token, state.token_B)
    done = state.done_B | (token == cfg.talker.codec_eos_token_id) | (
        n_B + 2 >= settings.max_new_tokens)
    return State(n + 1, token, h, caches, codes, done, length, seen, state.keys_B, logits)


def budget_reached(state: State, cfg: Qwen3TTSConfig) -> np.ndarray:
    """(B,) bool on the host: the rows that ended at their budget (`max_new_tokens`) without
    sampling EOS: their audio is cut where the budget ran out (a "length" finish, where EOS is
    "stop"). The model does this now and then on any input (a runaway: it never reaches EOS).
    Host arrays, not a device op: nothing to compile (a server's warm-up need not cover it)."""
    return np.asarray(state.done_B) & (np.asarray(state.token_B) != cfg.talker.codec_eos_token_id)


def _decode(params, cfg: Qwen3TTSConfig, state: State, ctx: Context, settings: Settings, until,
            options: Options, axis: str | None = None):
    F = state.codes_BxFxG.shape[1]
    until = jnp.minimum(until, F)

    def cond(s):
        live = ~jnp.all(s.done_B)
        if axis is not None:          # a device whose rows all ended runs on while another's live
            live = jax.lax.psum(live.astype(jnp.int32), axis) > 0
        return (s.step < until) & live

    return jax.lax.while_loop(cond, lambda s: frame_step(params, cfg, s, ctx, settings, options),
                              state)


def _decode_rows(params, cfg: Qwen3TTSConfig, state: State, ctx: Context, settings: Settings,
                 until, options: Options, mesh):
    """`_decode` with the batch's rows split over `mesh`'s "data" axis by `jax.shard_map`: each
    device runs the frame loop on its own rows (the weights replicated), so a Pallas kernel (a
    custom call, which XLA's partitioner cannot split) sees the device's rows, and the one
    collective a frame is the loop's "some row live" sum. Every leaf of the state, context and
    settings is per row except the frame count and the pad embedding."""
    rows = lambda tree: jax.tree_util.tree_map(lambda _: P("data"), tree)
    state_specs = rows(state)._replace(step=P())
    run = jax.shard_map(lambda p, s, c, st, u: _decode(p, cfg, s, c, st, u, options, "data"),
                        mesh=mesh, in_specs=(P(), state_specs, rows(ctx)._replace(pad_embed_D=P()),
                                             rows(settings), P()),
                        out_specs=state_specs, check_vma=False)   # pallas_call's outputs
                                                                  # carry no varying axes
    return run(params, state, ctx, settings, until)


_DECODE_JITS: dict = {}   # (options.decode_compiler_options, mesh) -> the jitted frame loop


def _decode_jit(compiler_options: tuple | None, mesh=None):
    key = (compiler_options, mesh)
    if key not in _DECODE_JITS:
        fn = _decode if mesh is None else functools.partial(_decode_rows, mesh=mesh)
        _DECODE_JITS[key] = jax.jit(
            fn, static_argnames=("cfg", "options"), donate_argnames=("state",),
            compiler_options=dict(compiler_options) if compiler_options else None)
    return _DECODE_JITS[key]


def decode(params, cfg: Qwen3TTSConfig, state: State, ctx: Context, settings: Settings, until,
           options: Options, mesh=None):
    """Run frames while some row is live and fewer than `until` (<= F) frames exist. Jitted
    (`options` static, `state` donated) with `options.decode_compiler_options`; inside another
    jit (e.g. `synthesize` under the caller's jit) only the outer program has compile options.
    `mesh` (a `jax.sharding.Mesh` with a "data" axis, the weights replicated): the rows split
    over it, each device's frame loop on its own rows (`_decode_rows`)."""
    traced = any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves(state))
    f = _decode_jit(None if traced else options.decode_compiler_options, mesh)
    return f(params, cfg, state, ctx, settings, until, options=options)


def program_counts() -> dict:
    """Compiled programs of `prefill`, `decode` (over all compiler options) and `insert`: what a
    test reads to check that a call compiled nothing new, or that options give new programs."""
    return {"prefill": prefill._cache_size(), "insert": insert._cache_size(),
            "decode": sum(f._cache_size() for f in _DECODE_JITS.values())}


@functools.partial(jax.jit, static_argnames=("frames",))
def _grown(state: State, frames: int) -> State:
    extra = frames - state.codes_BxFxG.shape[1]
    codes = jnp.pad(state.codes_BxFxG, [(0, 0), (0, extra), (0, 0)])
    return state._replace(caches=[c.grow(extra) for c in state.caches], codes_BxFxG=codes)


def grow(state: State, frames: int) -> State:
    """Give the state room for `frames` frames: longer KV caches and output buffer (zeros).
    Consumes `state` like a donation: the old caches and codes are freed at once (donating them
    to the jit would only warn, since larger outputs cannot reuse them)."""
    new = _grown(state, frames)
    for old, x in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(new)):
        if isinstance(old, jax.Array) and not isinstance(old, jax.core.Tracer) \
                and old.shape != x.shape:
            old.delete()
    return new


def _put_row(a, row, value):
    return a.at[row].set(value.astype(a.dtype))


@functools.partial(jax.jit, static_argnames=("cfg", "compute", "options"),
                   donate_argnames=("state",))
def insert(params, cfg: Qwen3TTSConfig, state: State, ctx: Context, settings: Settings, row,
           prompt, key, compute: int | None = None, prefix: Prefix | None = None, *,
           options: Options):
    """Start a new request in row `row` of a running batch (continuous batching: a server refills
    the row of a finished request). Returns (state, ctx).

    The prompt (a one-row PromptBatch, padded to the batch's prompt bucket L and trailing-text
    bucket Lt) runs
    into that row's cache slots [step, step + L), so its last position sits just before the
    batch's next frame slot L + step; the row's earlier slots (its previous request's) are masked
    off by `first_slot_B`, and its frame 0 is the batch's current step (`first_frame_B`). Its
    first code-0 token is sampled like `prefill`'s, with `settings`' row (the settings of the
    whole batch, this row's already set) and `key`, so the row generates what it would alone
    (the codes from `codes_BxFxG[row, step]` on). Needs step + L <= L + F: room for the prompt;
    the caller also leaves room (`grow`, `shift`) for the frames it asks for. `prefix` (one
    row): the stored KV of the prompt's first positions, as in `prefill`."""
    tp = params["talker"]
    B, F, G = state.codes_BxFxG.shape
    S = state.caches[0].length
    L = S - F
    text_1xL, mask_1xL, trailing_1xLt = prompt.text_BxL, prompt.mask_BxL, prompt.trailing_BxLt
    if text_1xL.shape != (1, L) or trailing_1xLt.shape[1] != ctx.trailing_BxLtxD.shape[1]:
        raise ValueError(f"insert takes one row of the batch's buckets (prompt {L}, trailing "
                         f"{ctx.trailing_BxLtxD.shape[1]}), not {text_1xL.shape} / "
                         f"{trailing_1xLt.shape}")
    C = L if compute is None else compute
    dtype = tp["codec_embedding"].dtype
    n0 = state.step
    x = embed_prompts(params, cfg, text_1xL, prompt.codec_BxLxG, prompt.extra_BxD,
                      prompt.extra_pos_B).astype(dtype)
    pad = L - mask_1xL.sum(-1).astype(jnp.int32)
    pos = jnp.maximum(jnp.cumsum(mask_1xL, axis=-1) - 1, 0)
    first = n0 + L - C                                    # slot of the first computed position
    slots = jnp.arange(S)
    mask = ((slots[None, None, :] <= (first + jnp.arange(C))[None, :, None])
            & (slots[None, None, :] >= (n0 + pad)[:, None, None]))
    one = lambda a: jax.lax.dynamic_slice_in_dim(a, row, 1, axis=0)
    caches = [jax.tree.map(one, c) for c in state.caches]
    if prefix is not None:
        caches = [c.put_prefix(p, n0 + pad, prefix.length_B)
                  for c, p in zip(caches, prefix.caches)]
    h, logits, caches = talker.forward(tp, x[:, L - C:], pos[:, L - C:], caches, first, mask,
                                       cfg.talker, options)
    caches = [jax.tree.map(lambda a, r: jax.lax.dynamic_update_slice_in_dim(a, r, row, axis=0),
                           c, rc) for c, rc in zip(state.caches, caches)]
    mine = jax.tree.map(one, settings)
    seen = jnp.zeros((1, cfg.talker.vocab_size), bool)
    token = _next_token(cfg, logits[:, -1], seen, 0, mine, _fold(key[None], 0), options)
    state = State(
        step=n0, token_B=_put_row(state.token_B, row, token[0]),
        hidden_BxD=_put_row(state.hidden_BxD, row, h[0, -1]), caches=caches,
        codes_BxFxG=state.codes_BxFxG,
        done_B=_put_row(state.done_B, row, mine.max_new_tokens[0] <= 1),
        length_B=_put_row(state.length_B, row, jnp.int32(0)),
        seen_BxV=_put_row(state.seen_BxV, row, seen[0]),
        keys_B=_put_row(state.keys_B, row, key),
        logits_BxV=_put_row(state.logits_BxV, row, logits[0, -1]))
    trailing = talker.embed_text(tp, trailing_1xLt, cfg.talker.hidden_act)
    ctx = ctx._replace(
        trailing_BxLtxD=_put_row(ctx.trailing_BxLtxD, row, trailing[0]),
        trailing_len_B=_put_row(ctx.trailing_len_B, row, prompt.trailing_len_B[0]),
        first_slot_B=_put_row(ctx.first_slot_B, row, n0 + pad[0]),
        real_len_B=_put_row(ctx.real_len_B, row, L - pad[0]),
        first_frame_B=_put_row(ctx.first_frame_B, row, n0))
    return state, ctx


def regroup(state: State, ctx: Context, rows: list[int], live: int) -> tuple[State, Context]:
    """The batch's rows regrouped: new row i is row `rows[i]`, and the rows from `live` on are
    done (inert padding, like a batch's padding rows, until `insert` starts a request in one).
    A running batch widens (`rows` = all its rows, then padding) for more requests to join, and
    narrows (its open rows, then padding) when fewer remain. Each kept row goes on as before
    (rows do not interact; a program of another batch size may round differently)."""
    B = state.done_B.shape[0]
    if not 0 < live <= len(rows) or any(not 0 <= r < B for r in rows):
        raise ValueError(f"regroup takes rows in [0, {B}) and 0 < live <= {len(rows)}, got "
                         f"{rows}, live {live}")
    idx = jnp.asarray(rows, jnp.int32)
    take = lambda a: jnp.take(a, idx, axis=0)
    new = jax.tree.map(take, state._replace(step=None))
    new = new._replace(step=state.step, done_B=new.done_B.at[live:].set(True))
    small = jax.tree.map(take, ctx._replace(pad_embed_D=None))
    return new, small._replace(pad_embed_D=ctx.pad_embed_D)


@jax.jit
def shift(state: State, ctx: Context, m):
    """Forget the batch's first m frames (traced m): cache slots and the codes buffer move m to
    the left and the frame counters with them, which frees m frames of room at the end for rows
    that keep going. Every row that is still needed must start at or after frame m (its
    `first_frame_B`); the frames before are dropped (read them first). The results of the frames
    that follow are those without the shift: every row's slots keep their order and mask."""
    codes = jnp.roll(state.codes_BxFxG, -m, axis=1)
    state = state._replace(step=state.step - m, caches=[c.drop(m) for c in state.caches],
                           codes_BxFxG=codes)
    ctx = ctx._replace(first_slot_B=ctx.first_slot_B - m, first_frame_B=ctx.first_frame_B - m)
    return state, ctx


def capacity(max_frames: int, options: Options) -> int:
    """The frame capacity of the first KV-cache segment for up to `max_frames` frames: their
    bucket, at most `options.first_frames`; `grow` doubles it as needed."""
    return min(bucket(max_frames, 16), options.first_frames)


def programs(executables=None):
    """(prefill, decode) as called by `generate` and `stream`: the jitted functions, or with
    `executables` (a `compilation_cache.Executables`) the same through its serialized programs."""
    if executables is None:
        return prefill, decode
    return (executables.wrap(prefill, "prefill", ("cfg", "frames", "compute", "options")),
            lambda params, cfg, state, ctx, settings, until, options: executables.wrap(
                _decode_jit(options.decode_compiler_options), "decode", ("cfg", "options"))(
                params, cfg, state, ctx, settings, until, options=options))


def generate(params, cfg: Qwen3TTSConfig, batch, settings: Settings, keys_B,
             max_frames: int, options: Options, executables=None, mesh=None):
    """Offline generation of a PromptBatch (arrays already bucketed). Returns the final State.

    The frame loop runs on device in segments whose KV-cache capacity doubles (256, 512, ...
    frames) only when some row is still speaking, so that attention never reads a cache much longer
    than the audio so far: one host check per segment, never per frame. `executables`: see
    `programs`; `mesh`: see `decode` (with `executables` None).
    """
    run_prefill, run_decode = programs(executables)
    if mesh is not None:
        run_decode = functools.partial(decode, mesh=mesh)
    frames = capacity(max_frames, options)
    state, ctx = run_prefill(params, cfg, batch, settings, keys_B, frames=frames,
                             compute=prefill_length(batch.mask_BxL), options=options)
    while True:
        state = run_decode(params, cfg, state, ctx, settings, frames, options)
        if bool(np.all(np.asarray(state.done_B))) or int(state.step) >= max_frames:
            return state
        frames = min(2 * frames, bucket(max_frames, 16))
        state = grow(state, frames)


def stream(params, cfg: Qwen3TTSConfig, batch, settings: Settings, keys_B, max_frames: int,
           chunk_frames: int, first_chunk_frames: int, options: Options, executables=None):
    """The streaming twin of `generate`: yields each chunk's new frames, a list of (n, G) int32
    arrays (one per row, maybe empty), first after `first_chunk_frames` frames, then every
    `chunk_frames`, until every row has ended or `max_frames` exist. The frame loop is the same
    compiled `decode` with a growing `until` and the state kept on device, so the codes are
    exactly `generate`'s for the same keys. Closing the generator stops the generation.
    `executables`: see `programs`. `Chunks` runs the same in steps."""
    chunks = Chunks(params, cfg, batch, settings, keys_B, max_frames, chunk_frames,
                    first_chunk_frames, options, executables)
    while chunks.dispatch():
        new = chunks.collect()
        if new is not None:
            yield new


class Chunks:
    """`stream` in two steps per chunk, so that a caller can put work between a chunk's dispatch
    and its wait (the codec of the chunk before: `runner.stream`):

        chunks = Chunks(...)                  # the prefill, dispatched
        while chunks.dispatch():              # the next chunk's frame loop, queued on the device
            new = chunks.collect()            # wait for it: each row's new frames, or None
    """

    def __init__(self, params, cfg: Qwen3TTSConfig, batch, settings: Settings, keys_B,
                 max_frames: int, chunk_frames: int, first_chunk_frames: int, options: Options,
                 executables=None):
        self._args = params, cfg, settings, options
        self._run_decode = programs(executables)[1]
        run_prefill = programs(executables)[0]
        self.frames = capacity(max_frames, options)
        self.state, self.ctx = run_prefill(params, cfg, batch, settings, keys_B,
                                           frames=self.frames,
                                           compute=prefill_length(batch.mask_BxL),
                                           options=options)
        self.max_frames, self.chunk_frames = max_frames, chunk_frames
        self.limit = bucket(max_frames, 16)
        self.emitted = np.zeros(self.state.length_B.shape[0], int)
        self.target = first_chunk_frames
        self.finished = False

    def dispatch(self) -> bool:
        """Queue the next chunk's frames; False (nothing queued) once the stream has ended."""
        if self.finished:
            return False
        params, cfg, settings, options = self._args
        while self.target > self.frames and self.frames < self.limit:
            self.frames = min(2 * self.frames, self.limit)
            self.state = grow(self.state, self.frames)
        self.state = self._run_decode(params, cfg, self.state, self.ctx, settings,
                                      min(self.target, self.frames), options)
        return True

    def collect(self) -> list | None:
        """Wait for the dispatched chunk: each row's new frames ((n, G) int32), or None when no
        row has any."""
        lengths, done = np.asarray(self.state.length_B), np.asarray(self.state.done_B)
        new = None
        if (lengths > self.emitted).any():
            codes = np.asarray(self.state.codes_BxFxG)
            new = [codes[b, self.emitted[b]:lengths[b]] for b in range(len(lengths))]
            self.emitted = np.maximum(self.emitted, lengths)
        self.finished = bool(done.all()) or self.emitted.min() >= self.max_frames
        self.target = int(self.emitted.max()) + self.chunk_frames
        return new


def synthesize(params, cfg: Qwen3TTSConfig, codec_params, codec_cfg, batch,
               settings: Settings, keys_B, frames: int, options: Options | None = None):
    """The whole pipeline as one pure function, for JAX users to `jit`, `shard_map` or embed:
    prompt batch -> (codes (B, frames, 16) int32, lengths (B,), audio (B, frames * 1920) f32).

    Unlike `generate`, the frame capacity is fixed (`frames`, static) and there is no host check,
    so the function traces as a whole. The audio is the official chunked codec decode (300-frame
    chunks, 25 frames of left context). Frames at or after a row's length are zeroed, and so is
    its audio there: the codec decoder is causal, so each row's audio up to its length is exactly
    the decode of its own codes.

        synth = jax.jit(synthesize, static_argnames=("cfg", "codec_cfg", "frames", "options"))

    `options` (static): None is `Options.for_backend()`, decided when the function is traced.
    """
    from .codec import decoder as codec_decoder

    options = options or Options.for_backend()

    state, ctx = prefill(params, cfg, batch, settings, keys_B, frames=frames, options=options)
    state = decode(params, cfg, state, ctx, settings, frames, options)
    valid_BxF = jnp.arange(frames)[None, :] < state.length_B[:, None]
    codes = jnp.where(valid_BxF[..., None], state.codes_BxFxG, 0)
    audio = codec_decoder.chunked_decode(codec_params, codec_cfg, codes)
    upsample = audio.shape[1] // frames
    audio = jnp.where(jnp.repeat(valid_BxF, upsample, axis=1), audio, 0.0)
    return codes, state.length_B, audio
