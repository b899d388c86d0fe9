"""Token selection for the talker (code 0) and the code predictor (codes 1..15), in pure JAX.

Everything here is a small, pure, jittable function. All sampling settings are *traced* values
(per-row ``(B,)`` arrays held by :class:`SamplingParams`, or ``(B,)`` arrays for the repetition
penalty), so changing them between calls never recompiles a jitted generation loop.

The math reproduces the HuggingFace ``generate`` logits-processor chain used by the official
Qwen3-TTS code (transformers ``generation/utils.py::_get_logits_processor`` and
``generation/logits_process.py``), in this order::

    talker:     RepetitionPenalty -> MinNewTokens(EOS) -> SuppressTokens      (always, greedy too)
                -> [sampling rows only] Temperature -> TopK -> TopP -> softmax + multinomial
                -> [greedy rows] argmax of the (penalized / masked) logits
    predictor:  [sampling rows only] Temperature -> TopK -> TopP; greedy rows take argmax

HF semantics reproduced here (filter value is always ``-inf``, ``min_tokens_to_keep == 1``):

* Repetition penalty: each previously generated id (counted once) gets ``x * p`` if ``x < 0``
  else ``x / p``. ``p == 1`` is an exact no-op (HF then skips the processor).
* Temperature: ``x / t``; only applied to sampling rows (HF adds warpers only when
  ``do_sample``). ``t == 1`` is an exact no-op (HF skips it). ``t`` is validated by the API layer.
* Top-k: ``top_k <= 0`` means off (HF skips ``top_k == 0``; negative values are rejected by HF).
  Otherwise ``k = min(max(top_k, 1), V)`` and every logit strictly below the k-th largest value is
  removed; *all tokens tied with the k-th value are kept* (so more than k can survive), like HF.
* Top-p: ``top_p >= 1`` means off (HF skips it at exactly 1.0 and rejects > 1). Otherwise, over the
  top-k-filtered logits sorted ascending, tokens whose cumulative softmax probability is
  ``<= 1 - top_p`` are removed, the single most probable token always kept. Ties: HF uses an
  *unstable* ``torch.sort`` there, so which members of a tie group straddling the cut survive is
  unspecified in HF (and differs between torch CPU/GPU). We use the *stable* ascending order
  (ties ordered by vocabulary id, i.e. exactly HF with ``torch.sort(..., stable=True)``): at a
  split tie group the lower ids are removed first. The multiset of surviving values always
  equals HF's.
  Float detail: HF compares float32 cumulative probabilities (torch CPU accumulates them in
  float64) with ``float32(1 - top_p)`` computed in float64; we compute both in float32, so a
  decision can only differ when a cumulative probability lies within ~1e-7 of ``1 - top_p``.
* Greedy (``do_sample=False``): argmax of the processed (penalized / masked) logits, first index
  on ties (``torch.argmax`` and ``jnp.argmax`` agree). No temperature / top-k / top-p.

Logits are processed in float32 (HF's ``generate`` upcasts the logits to float32 first);
divisions are true IEEE divisions, so with float32 inputs the processed logits are bit-identical to
HF's (XLA would otherwise turn ``x / t`` into ``x * (1 / t)``, see :func:`_div_rows`).

Cost per :func:`warp` call on the CPU, with the official settings (top-k 50): a ``lax.top_k`` of the
``(B, V)`` logits (``TOP_K_CANDIDATES`` = 64 candidates), a sort of those candidates, one softmax
+ cumsum over them, and a few element-wise ops; with top-k off (or above 64) one stable ascending
sort of the whole ``(B, V)`` logits instead (a ``lax.cond`` picks at run time; on other backends
always the sort, see ``Options.runtime_dispatch``). No scatter: the
top-p cut is mapped back to vocabulary order by a lexicographic ``(value, id)`` comparison
against the last removed element of the sorted order. When no row samples, nothing is warped.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .options import Options

__all__ = [
    "SamplingParams",
    "apply_repetition_penalty",
    "mask_ids",
    "talker_suppress_mask",
    "min_new_tokens_mask",
    "process_talker_logits",
    "mark_seen",
    "warp",
    "sample",
]

_Scalars = Union[bool, int, float, Sequence, np.ndarray, jax.Array]


@dataclasses.dataclass(frozen=True, eq=False)
class SamplingParams:
    """Per-row sampling settings, all traced ``(B,)`` arrays (a pytree: pass it through ``jit``).

    Attributes:
      do_sample:   bool    ``(B,)``; False -> greedy argmax (temperature / top-k / top-p ignored).
      temperature: float32 ``(B,)``; > 0 for sampling rows (validated by the API layer).
      top_k:       int32   ``(B,)``; <= 0 -> off; values > V act as V.
      top_p:       float32 ``(B,)``; >= 1 -> off.

    Build it with :meth:`create` so dtypes and shapes are always the same (a changed dtype or
    weak type would retrace the jitted caller).
    """

    do_sample: jax.Array
    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    # Static (part of the pytree's structure, so a jitted caller compiles one program per kind):
    # which work `sample` needs for these settings. "full": any settings (the default, and what
    # params built inside traced code get); "top_k": every sampling row has top_p >= 1 and
    # top_k <= TOP_K_CANDIDATES (the official defaults); "greedy": no row samples. See `kind_of`.
    kind: str = "full"

    @classmethod
    def create(cls, batch_size: int, *, do_sample: _Scalars = True, temperature: _Scalars = 0.9,
               top_k: _Scalars = 50, top_p: _Scalars = 1.0,
               kind: str | None = None, options: Options | None = None) -> "SamplingParams":
        """From Python scalars (broadcast to all rows) or length-``batch_size`` sequences/arrays.

        Host-side (NumPy) constructor; inside traced code build ``SamplingParams(...)`` directly.

        Defaults are the official Qwen3-TTS ones (do_sample, temperature 0.9, top_k 50, top_p 1.0).
        ``kind``: None picks `kind_of` the settings under ``options`` (None: ``Options()``,
        which does not specialize); a wider kind than the settings need (see
        `KINDS`) may be asked for, to reuse a program already compiled; a narrower one is an error.
        """

        def col(value, dtype):
            arr = np.asarray(value, dtype=dtype)  # host-side: no per-shape eager XLA compiles
            if arr.ndim == 0:
                arr = np.full((batch_size,), arr, dtype=dtype)
            if arr.shape != (batch_size,):
                raise ValueError(f"expected a scalar or shape ({batch_size},), got {arr.shape}")
            return jnp.asarray(arr)

        cols = dict(do_sample=col(do_sample, np.bool_), temperature=col(temperature, np.float32),
                    top_k=col(top_k, np.int32), top_p=col(top_p, np.float32))
        host = {k: np.asarray(v) for k, v in cols.items()}
        if kind is None:
            kind = kind_of(**host, options=options)
        elif kind not in KINDS or KINDS.index(kind) < KINDS.index(exact_kind(**host)):
            raise ValueError(f"sampler kind {kind!r} cannot serve these settings (they need "
                             f"{exact_kind(**host)!r} or a wider one of {KINDS})")
        return cls(**cols, kind=kind)

    @property
    def batch_size(self) -> int:
        return self.do_sample.shape[0]


jax.tree_util.register_dataclass(
    SamplingParams, data_fields=["do_sample", "temperature", "top_k", "top_p"],
    meta_fields=["kind"])

# The sampler kinds, narrowest first: each serves every setting the ones before it serve.
KINDS = ("greedy", "top_k", "full")


def kind_of(do_sample, temperature, top_k, top_p, options: Options | None = None) -> str:
    """The sampler kind `SamplingParams.create` gives host-side settings arrays: `exact_kind`
    with `options.specialize_sampler`, else "full"."""
    if (options or Options()).specialize_sampler:
        return exact_kind(do_sample, temperature, top_k, top_p)
    return "full"


def exact_kind(do_sample, temperature, top_k, top_p) -> str:
    """The narrowest kind (`KINDS`) that serves these settings (see `SamplingParams.kind`)."""
    sample = np.asarray(do_sample, bool)
    if not sample.any():
        return "greedy"
    if (np.asarray(top_p)[sample] >= 1).all() and (np.asarray(top_k)[sample]
                                                   <= TOP_K_CANDIDATES).all():
        return "top_k"
    return "full"


# ----------------------------------------------------------------------------------------------
# Logits processors (applied for greedy and sampling rows alike)
# ----------------------------------------------------------------------------------------------

def _div_rows(x_BxV: jax.Array, d_B: jax.Array) -> jax.Array:
    """``x / d[:, None]`` with IEEE division, bit-identical to torch's ``scores / float``.

    XLA's algebraic simplifier rewrites ``A / broadcast(d)`` into ``A * broadcast(1 / d)``, which
    is off by 1 ulp for about a third of the values; the barrier hides the broadcast from it.
    """
    d_BxV = lax.optimization_barrier(jnp.broadcast_to(d_B[:, None], x_BxV.shape))
    return x_BxV / d_BxV


def apply_repetition_penalty(logits_BxV: jax.Array, seen_BxV: jax.Array,
                             penalty_B: jax.Array) -> jax.Array:
    """HF ``RepetitionPenaltyLogitsProcessor``: for ids with ``seen_BxV`` True,
    ``x * p`` if ``x < 0`` else ``x / p`` (each id once, however often it occurred).

    ``penalty_B`` may be a scalar or per-row ``(B,)``; 1.0 is an exact no-op.
    """
    p_B = jnp.broadcast_to(jnp.asarray(penalty_B, logits_BxV.dtype).reshape(-1),
                           logits_BxV.shape[:1])
    penalized_BxV = jnp.where(logits_BxV < 0, logits_BxV * p_B[:, None],
                              _div_rows(logits_BxV, p_B))
    return jnp.where(seen_BxV, penalized_BxV, logits_BxV)


def mask_ids(logits_BxV: jax.Array, mask: jax.Array) -> jax.Array:
    """Set ``-inf`` where ``mask`` (bool, ``(V,)`` shared or ``(B, V)`` per row) is True.

    Used for HF ``SuppressTokensLogitsProcessor`` and ``MinNewTokensLengthLogitsProcessor``.
    """
    return jnp.where(mask, jnp.asarray(-jnp.inf, logits_BxV.dtype), logits_BxV)


def talker_suppress_mask(vocab_size: int, eos_id: int, num_suppressed: int = 1024) -> np.ndarray:
    """Bool ``(V,)`` mask of the talker's suppressed ids: the last ``num_suppressed`` ids of the
    vocabulary (``vocab-1024 .. vocab-1``, the special codec ids) except ``eos_id``.

    A NumPy constant (built once on the host; it folds into the compiled program).
    """
    ids_V = np.arange(vocab_size)
    return (ids_V >= vocab_size - num_suppressed) & (ids_V != eos_id)


def min_new_tokens_mask(num_generated_B: jax.Array, vocab_size: int, eos_id,
                        min_new_tokens=2) -> jax.Array:
    """Bool ``(B, V)`` mask for HF ``MinNewTokensLengthLogitsProcessor``: ``eos_id`` is masked in
    rows that have generated fewer than ``min_new_tokens`` tokens so far (the official talker
    uses ``min_new_tokens=2``). ``num_generated_B`` counts tokens generated *before* the current
    step (0 when sampling from the prefill logits); scalars broadcast.
    """
    n_Bx1 = jnp.asarray(num_generated_B, jnp.int32).reshape(-1, 1)
    is_eos_1xV = (jnp.arange(vocab_size, dtype=jnp.int32) == eos_id)[None, :]
    return is_eos_1xV & (n_Bx1 < min_new_tokens)


def process_talker_logits(logits_BxV: jax.Array, seen_BxV: jax.Array, penalty_B: jax.Array,
                          num_generated_B: jax.Array, suppress_mask_V, eos_id,
                          min_new_tokens=2) -> jax.Array:
    """The talker's always-on processors in HF order: repetition penalty -> min-new-tokens (EOS)
    -> suppression, on float32 logits (HF's ``generate`` upcasts the last-position logits to
    float32 before processing). Feed the result to :func:`sample` (warps only sampling rows)."""
    x_BxV = apply_repetition_penalty(logits_BxV.astype(jnp.float32), seen_BxV, penalty_B)
    x_BxV = mask_ids(x_BxV, min_new_tokens_mask(num_generated_B, x_BxV.shape[-1], eos_id,
                                                min_new_tokens))
    return mask_ids(x_BxV, suppress_mask_V)


def mark_seen(seen_BxV: jax.Array, ids_B: jax.Array) -> jax.Array:
    """Add the just-generated ``ids_B`` to the repetition-penalty history ``seen_BxV``."""
    ids_Bx1 = jnp.asarray(ids_B, jnp.int32).reshape(-1, 1)
    return seen_BxV | (jnp.arange(seen_BxV.shape[-1], dtype=jnp.int32)[None, :] == ids_Bx1)


# ----------------------------------------------------------------------------------------------
# Warpers (sampling rows only) and the sampler
# ----------------------------------------------------------------------------------------------

# The fast path's candidate count: rows with 1 <= top_k <= TOP_K_CANDIDATES (the official default
# is 50) are warped from the TOP_K_CANDIDATES largest logits (`lax.top_k`, a partial selection)
# instead of a sort of the whole vocabulary. Static: it is a shape.
TOP_K_CANDIDATES = 64

# The fast path and the all-greedy skip are picked at run time by `lax.cond` where
# `Options.runtime_dispatch` is on (the CPU); elsewhere the sampler is one full-sort program.


def _warp_prologue(logits_BxV, params):
    logits_BxV = logits_BxV.astype(jnp.float32)  # like HF generate; no-op for float32 input
    sample_B = params.do_sample.astype(bool)
    # Temperature (greedy rows: 1.0, so a 0 / invalid temperature there is harmless).
    t_B = jnp.where(sample_B, params.temperature.astype(jnp.float32), jnp.float32(1.0))
    top_k_B = params.top_k.astype(jnp.int32)
    use_k_B = sample_B & (top_k_B > 0)
    use_p_B = sample_B & (params.top_p.astype(jnp.float32) < 1)
    return _div_rows(logits_BxV, t_B), use_k_B, use_p_B


def _top_p_keep(x_BxV, xs_BxN, ids_sorted_BxN, params, use_p_B):
    """Top-p in the sorted (ascending, ties by id) domain of N candidates whose filtered members
    are already -inf; maps the cut back to vocabulary order. Returns bool (B, V)."""
    N = xs_BxN.shape[1]
    top_p_B = params.top_p.astype(jnp.float32)
    cum_BxN = jnp.cumsum(jax.nn.softmax(xs_BxN, axis=-1), axis=-1)
    remove_BxN = cum_BxN <= (1 - top_p_B)[:, None]
    remove_BxN = remove_BxN & (jnp.arange(N) < N - 1)[None, :]  # min_tokens_to_keep = 1
    # Cumsum of probabilities is non-decreasing, so the removed set is a prefix of length m of
    # the sorted order; a token survives iff (x, id) > (x, id) of sorted element m-1.
    m_B = jnp.sum(remove_BxN, axis=-1, dtype=jnp.int32)
    last_Bx1 = jnp.maximum(m_B - 1, 0)[:, None]
    xc_Bx1 = jnp.take_along_axis(xs_BxN, last_Bx1, axis=1)
    idc_Bx1 = jnp.take_along_axis(ids_sorted_BxN, last_Bx1, axis=1)
    ids_BxV = lax.broadcasted_iota(jnp.int32, x_BxV.shape, 1)
    after_cut_BxV = (x_BxV > xc_Bx1) | ((x_BxV == xc_Bx1) & (ids_BxV > idc_Bx1))
    return after_cut_BxV | (m_B == 0)[:, None] | ~use_p_B[:, None]


def warp_by_sort(logits_BxV: jax.Array, params: SamplingParams) -> jax.Array:
    """`warp` for any settings: one stable ascending sort of the whole vocabulary (HF's top-p
    order with stable ties), ids as payload."""
    x_BxV, use_k_B, use_p_B = _warp_prologue(logits_BxV, params)
    B, V = x_BxV.shape
    ids_BxV = lax.broadcasted_iota(jnp.int32, (B, V), 1)
    xs_BxV, ids_sorted_BxV = lax.sort((x_BxV, ids_BxV), dimension=1, is_stable=True, num_keys=1)
    # Top-k: keep x >= k-th largest value (ties with it kept). Off -> k = V (keeps everything).
    k_B = jnp.where(use_k_B, jnp.clip(params.top_k.astype(jnp.int32), 1, V), V)
    kth_Bx1 = jnp.take_along_axis(xs_BxV, (V - k_B)[:, None], axis=1)
    keep_k_BxV = (x_BxV >= kth_Bx1) | ~use_k_B[:, None]
    xs_f_BxV = jnp.where((xs_BxV >= kth_Bx1) | ~use_k_B[:, None], xs_BxV, -jnp.inf)
    keep_p_BxV = _top_p_keep(x_BxV, xs_f_BxV, ids_sorted_BxV, params, use_p_B)
    return jnp.where(keep_k_BxV & keep_p_BxV, x_BxV, -jnp.inf)


def _warp_top_k(x_BxV, vals_BxN, idx_BxN, use_k_B, use_p_B, params):
    """The fast path, valid when every row either does not sample or has 1 <= top_k <= n and at
    most n logits tied at or above its k-th largest: then every survivor of top-k is among the n
    largest, and top-p only needs those n, sorted."""
    n = vals_BxN.shape[1]  # vals_BxN, idx_BxN: lax.top_k(x_BxV, n), descending
    k_B = jnp.where(use_k_B, jnp.clip(params.top_k.astype(jnp.int32), 1, n), n)
    kth_Bx1 = jnp.take_along_axis(vals_BxN, (k_B - 1)[:, None], axis=1)
    keep_k_BxV = (x_BxV >= kth_Bx1) | ~use_k_B[:, None]
    # The n candidates in HF's order (ascending value, ties by ascending id); filtered -> -inf.
    xs_BxN, ids_BxN = lax.sort((vals_BxN, idx_BxN), dimension=1, is_stable=True, num_keys=2)
    xs_f_BxN = jnp.where((xs_BxN >= kth_Bx1) | ~use_k_B[:, None], xs_BxN, -jnp.inf)
    keep_p_BxV = _top_p_keep(x_BxV, xs_f_BxN, ids_BxN, params, use_p_B)
    return jnp.where(keep_k_BxV & keep_p_BxV, x_BxV, -jnp.inf)


def warp(logits_BxV: jax.Array, params: SamplingParams,
         options: Options | None = None) -> jax.Array:
    """HF Temperature -> TopK -> TopP on sampling rows (filtered ids become ``-inf``); float32.

    Rows with ``do_sample=False`` are returned unchanged (HF applies no warper when greedy).
    See the module docstring for the exact tie semantics.

    With `options.runtime_dispatch` (None: ``Options()``, on), when every sampling row has
    ``1 <= top_k <= TOP_K_CANDIDATES`` (the official settings), the work is a `lax.top_k` of the
    vocabulary and a sort of those candidates; otherwise (top-k off or larger, or more ties at the
    k-th value than candidates) one stable sort of the whole
    vocabulary (`warp_by_sort`). A `lax.cond` picks at run time, so the settings stay traced.
    The two give the same kept set; at a top-p cut the float32 cumulative sums may differ in the
    last bit (summed over n candidates instead of V with zeros), which the HF comparison
    tolerates anyway (see the module docstring).
    """
    options = options or Options()
    x_BxV, use_k_B, use_p_B = _warp_prologue(logits_BxV, params)
    if params.kind == "top_k":
        return _warp_top_k_only(x_BxV, use_k_B, params, options)
    if TOP_K_CANDIDATES >= x_BxV.shape[1] or not options.runtime_dispatch:
        return warp_by_sort(logits_BxV, params)
    vals_BxN, idx_BxN = lax.top_k(x_BxV, TOP_K_CANDIDATES)
    return lax.cond(jnp.all(_top_k_path_rows(x_BxV, vals_BxN, params)),
                    lambda: _warp_top_k(x_BxV, vals_BxN, idx_BxN, use_k_B, use_p_B, params),
                    lambda: warp_by_sort(logits_BxV, params))


def kth_largest(x_BxV: jax.Array, k_B: jax.Array, options: Options | None = None) -> jax.Array:
    """Each row's k-th largest value (duplicates counted: the value HF's top-k keeps down to),
    ``1 <= k <= min(TOP_K_CANDIDATES, V)``, shape (B, 1), by `options.kth_by`."""
    options = options or Options()
    B, V = x_BxV.shape
    if options.kth_by == "pairwise" and B * V * V <= options.pairwise_max:
        at_least_BxV = jnp.sum(x_BxV[:, None, :] >= x_BxV[:, :, None], axis=-1, dtype=jnp.int32)
        return jnp.max(jnp.where(at_least_BxV >= k_B[:, None], x_BxV, -jnp.inf), axis=-1,
                       keepdims=True)
    vals_BxN = lax.top_k(x_BxV, min(TOP_K_CANDIDATES, x_BxV.shape[1]))[0]
    return jnp.take_along_axis(vals_BxN, (k_B - 1)[:, None], axis=1)


def _warp_top_k_only(x_BxV, use_k_B, params, options: Options):
    """`warp` for settings of kind "top_k" (no row uses top-p, every top_k <= TOP_K_CANDIDATES):
    keep x >= the k-th largest value (ties with it kept, like HF), which the candidates hold
    exactly whatever the ties; no sort of the vocabulary, no top-p, no conditional."""
    n = min(TOP_K_CANDIDATES, x_BxV.shape[1])
    k_B = jnp.clip(params.top_k.astype(jnp.int32), 1, n)
    kth_Bx1 = kth_largest(x_BxV, k_B, options)
    keep_BxV = (x_BxV >= kth_Bx1) | ~use_k_B[:, None]
    return jnp.where(keep_BxV, x_BxV, -jnp.inf)


def _top_k_path_rows(x_BxV, vals_BxN, params):
    n = vals_BxN.shape[1]
    sample_B = params.do_sample.astype(bool)
    top_k_B = params.top_k.astype(jnp.int32)
    # Ties at the k-th value can keep more than k; the fast path holds them if they fit in n.
    kth_Bx1 = jnp.take_along_axis(vals_BxN, (jnp.clip(top_k_B, 1, n) - 1)[:, None], axis=1)
    fits_B = jnp.sum(x_BxV >= kth_Bx1, axis=1) <= n
    return ~sample_B | ((top_k_B >= 1) & (top_k_B <= n) & fits_B)


def top_k_path_rows(logits_BxV: jax.Array, params: SamplingParams) -> jax.Array:
    """Bool ``(B,)``: rows that `warp` can serve from the top-k candidates (greedy rows, or
    ``1 <= top_k <= TOP_K_CANDIDATES`` with the ties at the k-th value fitting). `warp` takes
    that path when every row can."""
    x_BxV = _warp_prologue(logits_BxV, params)[0]
    n = min(TOP_K_CANDIDATES, x_BxV.shape[1])
    return _top_k_path_rows(x_BxV, lax.top_k(x_BxV, n)[0], params)


def _is_batched_key(key: jax.Array) -> bool:
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        return key.ndim == 1
    return key.ndim == 2  # raw uint32 keys: (2,) single, (B, 2) batched


def sample(key: jax.Array, logits_BxV: jax.Array, params: SamplingParams,
           options: Options | None = None) -> jax.Array:
    """Pick one id per row -> int32 ``(B,)``.

    Greedy rows: argmax of ``logits_BxV`` (already penalized / masked, NOT warped). Sampling rows:
    a categorical draw from ``softmax(warp(logits_BxV))``; ``-inf`` ids are never drawn.

    ``key``: one PRNG key for the whole batch, or a batch of ``B`` keys (one per row; then a row's
    draw does not depend on the rest of the batch). ``options`` (static; None: ``Options()``):
    `Options.runtime_dispatch`, `Options.kth_by`.
    """
    options = options or Options()
    logits_BxV = logits_BxV.astype(jnp.float32)
    greedy_B = jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    if params.kind == "greedy":  # known when the params were made: no warp, no draw
        return greedy_B

    def draw():
        warped_BxV = warp(logits_BxV, params, options)
        if _is_batched_key(key):
            drawn_B = jax.vmap(lambda k, x: jax.random.categorical(k, x))(key, warped_BxV)
        else:
            drawn_B = jax.random.categorical(key, warped_BxV, axis=-1)
        return jnp.where(params.do_sample, drawn_B.astype(jnp.int32), greedy_B)

    # All rows greedy (a run-time fact: the settings are traced): no warping and no random draw
    # (on the CPU the draw's random bits cost ~130 us a step at V = 2048).
    if options.runtime_dispatch and params.kind == "full":
        return lax.cond(jnp.any(params.do_sample), draw, lambda: greedy_B)
    return draw()
