"""Generation as one compiled program: prefill, then a `lax.while_loop` over frames with the 15
code-predictor steps inside, preallocated KV caches and sampling on device.

    state = prefill(params, cfg, batch, settings, keys, frames=F)   # jitted once per (B, L, Lt, F)
    state = decode(params, cfg, state, ctx, until=F)                # the frame loop; resumable
    codes, lengths = state.codes, state.length

`decode` runs frames until every row has emitted EOS, the token budget is used, or `until` frames
exist; calling it again continues where it stopped, which is what chunked streaming needs: the same
compiled step serves offline generation (one call) and streaming (a Python loop over chunks).

Static (compile-time) values are only shapes: batch B, prompt bucket L, trailing-text bucket Lt and
frame bucket F, plus the configs (and the prefill's compute length, on finer steps than L). Everything that changes per request is traced: the prompt ids,
the settings (temperature, top-k, top-p, penalty, greedy or not, per row), `max_new_tokens`, the PRNG
keys. Official semantics (shared NOTES.md section 7): the repetition penalty covers the code-0 tokens
generated so far; EOS is blocked for the first 2 tokens; ids vocab-1024..vocab-1 except EOS are
suppressed; the last token sampled is never fed back, so frames = tokens - 1.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from . import code_predictor, layers, sampling, talker, xla_options
from .buckets import fine, ladder, power_of_two as bucket
from .config import Qwen3TTSConfig
from .prompts import NONE

MIN_NEW_TOKENS = 2  # hard-coded in the official generate


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
    pad_count_B: jax.Array          # left padding of each row
    real_len_B: jax.Array           # prompt length without padding


class State(NamedTuple):
    step: jax.Array                 # () frames generated so far (same for all rows)
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


def _next_token(cfg: Qwen3TTSConfig, logits_BxV, seen_BxV, n_generated, settings, keys_B):
    """The official talker processors (penalty, min new tokens, suppression), then sampling."""
    t = cfg.talker
    lg = sampling.process_talker_logits(
        logits_BxV, seen_BxV, settings.repetition_penalty, n_generated,
        sampling.talker_suppress_mask(t.vocab_size, t.codec_eos_token_id), t.codec_eos_token_id,
        MIN_NEW_TOKENS)
    return sampling.sample(keys_B, lg, settings.talker)


def _fold(keys_B, data):
    return jax.vmap(lambda k: jax.random.fold_in(k, data))(keys_B)


def prefill_length(mask_BxL) -> int | None:
    """The `compute` argument of `prefill` for a left-padded batch: its longest row on the finer
    `buckets.fine` steps, or None (all L positions) where that is L or the mask cannot be read on
    this host. The prompt bucket L (`buckets.ladder`) sizes the KV cache and so every frame-loop
    program; the prefill runs only the positions some row uses (35 tokens in a bucket of 48: 40)."""
    if not getattr(mask_BxL, "is_fully_addressable", True):
        return None
    L = mask_BxL.shape[1]
    compute = min(L, fine(int(np.asarray(mask_BxL).sum(-1).max())))
    return None if compute == L else compute


def prefill_lengths(L: int) -> list[int | None]:
    """Every `prefill_length` of a batch whose prompt bucket is L = `buckets.ladder(n)` (two at most:
    the bucket of 48 holds prompts of 33-40 and 41-48 positions): what a warm-up compiles."""
    below, b = 0, ladder(1)
    while b < L:
        below, b = b, ladder(b + 1)
    return sorted({None if fine(n) >= L else fine(n) for n in range(below + 1, L + 1)},
                  key=lambda c: L if c is None else c)


@functools.partial(jax.jit, static_argnames=("cfg", "frames", "compute"))
def prefill(params, cfg: Qwen3TTSConfig, text_BxL, codec_BxLxG, mask_BxL, extra_BxD, extra_pos_B,
            trailing_BxLt, trailing_len_B, settings: Settings, keys_B, frames: int,
            compute: int | None = None):
    """Embed and run the prompt, sample the first code-0 token. Returns (State, Context).

    `compute` (static; None: L): run only the last `compute` of the L prompt positions, which must
    hold every row's real tokens (`prefill_length`); the cache keeps L prompt slots, the first
    L - compute of them unwritten and masked like any left padding, so the frame loop is the same
    program as after a full prefill, and so are its results."""
    tp = params["talker"]
    B, L = text_BxL.shape
    C = L if compute is None else compute
    dtype = tp["codec_embedding"].dtype
    x = embed_prompts(params, cfg, text_BxL, codec_BxLxG, extra_BxD, extra_pos_B).astype(dtype)
    act = cfg.talker.hidden_act
    trailing = talker.embed_text(tp, trailing_BxLt, act).astype(dtype)
    pad_embed = talker.embed_text(tp, jnp.asarray([cfg.tts_pad_token_id]), act)[0].astype(dtype)
    pad_count = L - mask_BxL.sum(-1).astype(jnp.int32)
    pos = jnp.maximum(jnp.cumsum(mask_BxL, axis=-1) - 1, 0)
    S = L + frames
    slots = jnp.arange(S)
    causal = slots[None, None, :] <= jnp.arange(L - C, L)[None, :, None]
    mask = causal & (slots[None, None, :] >= pad_count[:, None, None])
    caches = layers.init_cache(cfg.talker, B, S, dtype)
    h, logits, caches = talker.forward(tp, x[:, L - C:], pos[:, L - C:], caches, L - C, mask,
                                       cfg.talker)
    seen = jnp.zeros((B, cfg.talker.vocab_size), bool)
    token = _next_token(cfg, logits[:, -1], seen, 0, settings, _fold(keys_B, 0))
    state = State(step=jnp.zeros((), jnp.int32), token_B=token, hidden_BxD=h[:, -1], caches=caches,
                  codes_BxFxG=jnp.zeros((B, frames, cfg.talker.num_code_groups), jnp.int32),
                  done_B=settings.max_new_tokens <= 1, length_B=jnp.zeros((B,), jnp.int32),
                  seen_BxV=seen, keys_B=keys_B, logits_BxV=logits[:, -1])
    ctx = Context(trailing, trailing_len_B, pad_embed, pad_count, L - pad_count)
    return state, ctx


def frame_step(params, cfg: Qwen3TTSConfig, state: State, ctx: Context, settings: Settings) -> State:
    """One frame: codes 1..15 for the current code-0 token, then the talker step that samples the
    next code-0 token."""
    tp, cpp = params["talker"], params["code_predictor"]
    n = state.step
    B, F, G = state.codes_BxFxG.shape
    L = state.caches[0].length - F  # prompt bucket
    keys = _fold(state.keys_B, n + 1)
    code0_emb = talker.embed_codec(tp, state.token_B)

    def sample_cp(j, logits_BxV):
        return sampling.sample(_fold(keys, 1000 + j), logits_BxV, settings.predictor)

    rest, _ = code_predictor.predict(cpp, cfg.talker, state.hidden_BxD, code0_emb, sample_cp)
    frame = jnp.concatenate([state.token_B[:, None], rest], axis=1)
    codes = jax.lax.dynamic_update_slice_in_dim(state.codes_BxFxG, frame[:, None], n, axis=1)

    Lt = ctx.trailing_BxLtxD.shape[1]
    text = jnp.where((n < ctx.trailing_len_B)[:, None],
                     ctx.trailing_BxLtxD[:, jnp.minimum(n, Lt - 1)], ctx.pad_embed_D[None])
    x = (code0_emb + code_predictor.embed_codes(cpp, rest) + text)[:, None]
    S = L + F
    mask = ((jnp.arange(S)[None, :] >= ctx.pad_count_B[:, None])
            & (jnp.arange(S)[None, :] <= L + n))[:, None, :]
    pos = (ctx.real_len_B + n)[:, None]
    h, logits, caches = talker.forward(tp, x.astype(code0_emb.dtype), pos, state.caches, L + n,
                                       mask, cfg.talker)
    seen = sampling.mark_seen(state.seen_BxV, state.token_B)
    token = _next_token(cfg, logits[:, -1], seen, n + 1, settings, keys)

    # This frame is real for rows not yet done; a row ends when it samples EOS or its budget
    # (max_new_tokens - 1 frames) is used.
    live = ~state.done_B
    length = jnp.where(live, n + 1, state.length_B)
    done = state.done_B | (token == cfg.talker.codec_eos_token_id) | (
        n + 2 >= settings.max_new_tokens)
    return State(n + 1, token, h[:, -1], caches, codes, done, length, seen, state.keys_B,
                 logits[:, -1])


@xla_options.lazy_jit(xla_options.decode_options, static_argnames=("cfg",),
                      donate_argnames=("state",))
def decode(params, cfg: Qwen3TTSConfig, state: State, ctx: Context, settings: Settings, until):
    """Run frames while some row is live and fewer than `until` (<= F) frames exist."""
    F = state.codes_BxFxG.shape[1]
    until = jnp.minimum(until, F)

    def cond(s):
        return (s.step < until) & ~jnp.all(s.done_B)

    return jax.lax.while_loop(cond, lambda s: frame_step(params, cfg, s, ctx, settings), state)


@functools.partial(jax.jit, static_argnames=("frames",), donate_argnames=("state",))
def grow(state: State, frames: int) -> State:
    """Give the state room for `frames` frames: longer KV caches and output buffer (zeros)."""
    extra = frames - state.codes_BxFxG.shape[1]
    codes = jnp.pad(state.codes_BxFxG, [(0, 0), (0, extra), (0, 0)])
    return state._replace(caches=[c.grow(extra) for c in state.caches], codes_BxFxG=codes)


FIRST_FRAMES = 256  # frame capacity of the first segment (20 s of audio); doubled as needed


def generate(params, cfg: Qwen3TTSConfig, batch, settings: Settings, keys_B, max_frames: int):
    """Offline generation of a PromptBatch (arrays already bucketed). Returns the final State.

    The frame loop runs on device in segments whose KV-cache capacity doubles (256, 512, ...
    frames) only when some row is still speaking, so that attention never reads a cache much longer
    than the audio so far: one host check per segment, never per frame.
    """
    frames = min(bucket(max_frames, 16), FIRST_FRAMES)
    state, ctx = prefill(params, cfg, batch.text_BxL, batch.codec_BxLxG, batch.mask_BxL,
                         batch.extra_BxD, batch.extra_pos_B, batch.trailing_BxLt,
                         batch.trailing_len_B, settings, keys_B, frames=frames,
                         compute=prefill_length(batch.mask_BxL))
    while True:
        state = decode(params, cfg, state, ctx, settings, frames)
        if bool(jnp.all(state.done_B)) or int(state.step) >= max_frames:
            return state
        frames = min(2 * frames, bucket(max_frames, 16))
        state = grow(state, frames)


def synthesize(params, cfg: Qwen3TTSConfig, codec_params, codec_cfg, batch, settings: Settings,
               keys_B, frames: int):
    """The whole pipeline as one pure function, for JAX users to `jit`, `shard_map` or embed:
    prompt batch -> (codes (B, frames, 16) int32, lengths (B,), audio (B, frames * 1920) f32).

    Unlike `generate`, the frame capacity is fixed (`frames`, static) and there is no host check,
    so the function traces as a whole. The audio is the official chunked codec decode (300-frame
    chunks, 25 frames of left context). Frames at or after a row's length are zeroed, and so is
    its audio there: the codec decoder is causal, so each row's audio up to its length is exactly
    the decode of its own codes.

        synth = jax.jit(synthesize, static_argnames=("cfg", "codec_cfg", "frames"))
    """
    from .codec import decoder as codec_decoder

    state, ctx = prefill(params, cfg, batch.text_BxL, batch.codec_BxLxG, batch.mask_BxL,
                         batch.extra_BxD, batch.extra_pos_B, batch.trailing_BxLt,
                         batch.trailing_len_B, settings, keys_B, frames=frames)
    state = decode(params, cfg, state, ctx, settings, frames)
    valid_BxF = jnp.arange(frames)[None, :] < state.length_B[:, None]
    codes = jnp.where(valid_BxF[..., None], state.codes_BxFxG, 0)
    audio = codec_decoder.chunked_decode(codec_params, codec_cfg, codes)
    upsample = audio.shape[1] // frames
    audio = jnp.where(jnp.repeat(valid_BxF, upsample, axis=1), audio, 0.0)
    return codes, state.length_B, audio
