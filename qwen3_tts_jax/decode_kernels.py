"""Pallas (Triton) kernels for one-position decoder steps on NVIDIA GPUs - the code predictor's
steps (`Options.predictor_kernels`) and the talker's frame steps (`Options.talker_kernels`): a
decoder layer in TWO kernels instead of XLA's ~13.

At batch 1 a frame is 98 decoder-layer steps, 70 of them in the 5-layer code predictor and 28 in
the talker, and the time goes to the number of kernels rather than to bytes
(benchmarks/RESULTS.md: ~1800 kernels a frame, a third of the bandwidth limit). An earlier
attempt, five kernels a layer (commit 6664a51), was 1.17x XLA's one-row program but slower than
its two-row one. Here a layer is:

  1. `attention_block`, one program per query head: input RMSNorm + the head's q, k and v
     products + q/k norms + RoPE + the KV-cache write + attention over each row's slots (online
     softmax, row by row, SLOTS cache slots a loop step) + the head's share of the o product,
     added into the residual with float32 atomic adds;
  2. `mlp_block`, one program per block of the intermediate width: post RMSNorm + its gate and up
     columns + SiLU(gate) * up + its share of the down product, added into the residual the same
     way.

With the tiles' o split P > 0 the attention block is two kernels instead (`qkv_heads`: one
program per head of q, k and v; `attend_o`: H x P programs, a head's attention and 1/P of its o
product's columns): three kernels a layer, the block's weights read by more of the GPU's
processors at once. Which pays is for a GPU to say (benchmarks/gpu_session.sh kernels).

Split-K by atomic adds is what removes the kernel boundaries (no program needs another's output
inside a block); its cost is that on a GPU the order of the float32 additions into the residual
varies from run to run (outputs equal up to float rounding, not bit-identical between runs; the
interpreter adds in program order). Program 0 of each kernel also adds the block's input (the
residual connection), so the accumulators start at zero.

Values: those of `layers.decoder_layer` (the same roundings to the activation dtype, the same
float32 statistics), except that a block's product and its residual are summed in float32 and
rounded once, the softmax is the online one, and additions come in another order.

Weights are arrays in the activation dtype or int8 (`quantize="int8"`, `quantize.Int8Weight`:
the int8 tiles converted to the activation dtype in the kernel, the column scales applied to the
float32 sums, as `quantize.matmul` does): half the bytes of bf16 for the same kernels.

Rows: every product tile has ROWS = 16 rows (Triton's smallest `dot`); the callers pad their
activations. The caches keep the batch's rows (the code predictor's and the talker's), read and
written through masked loads and stores. Row r attends to slots [start_r, write index]:
0 for the predictor, the end of the row's left padding for the talker (its positions, hence its
RoPE rows, are its own).

Scope (`why_not`): at most 16 rows, the positions-major cache, weights as above, SiLU, and widths
that split into power-of-two tiles of at least 16 (the released models' 1024/3072 and 2048/6144,
16 heads over 8 of 128). A call over 16 rows takes XLA's path; a model the kernels can never run
is refused at load (`check`), except with the mode "auto" (the kernels on an NVIDIA GPU where
they can run, XLA's ops everywhere else: the mode for a default). `interpret=True` runs the same
kernels through Pallas' interpreter on any backend (the tests, on the CPU).

Not here: the 5 layers (or all 15 predictor steps) in ONE kernel would need a barrier across the
whole grid between layers; Triton has none, and a spin on an atomic counter would deadlock the
interpreter, which runs the programs one after another, so such a kernel could not be checked on
a CPU.

The attention is one program per query head walking each row's slots SLOTS at a time (the rows
one after another: a batch of one reads and computes one row, not the 16 of the products' tiles):
at long contexts (the talker's, hundreds to thousands of slots) that is 16 programs reading the
whole cache. The tiles' slot parts Q > 1 (with an o split) put a kernel between `qkv_heads` and
`attend_o`: `attend_part`, H x Q programs, each head's online-softmax state over 1/Q of the
chunks (flash decoding), which `attend_o` combines - four kernels a layer, the cache read by
H x Q programs. Which context pays for it is for a GPU to say (gpu_session.sh kernels3).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from . import quantize
from .config import TransformerConfig

ROWS = 16             # rows of every product tile (the smallest Triton `dot`)
SLOTS = 32            # cache slots a step of the attention loop reads (a row's SLOTS x Dh/2)
_NEG = -0.7 * float(jnp.finfo(jnp.float32).max)   # a masked logit (as jax.nn's attention)
DEFAULT_TILES = (64, 32, 128, 4, 3, 0)
"""(k: reduction chunk, f: intermediate columns per MLP program, n: output columns per atomic
add, Triton warps, pipeline stages, o split): `Options.predictor_tiles` (`talker_tiles`) when empty. The
attention kernel's loop reads six (k, head_dim / 2) weight tiles a step: at the released widths
48 KiB of bf16, so three stages stay well inside an H100's 227 KiB of shared memory.
o split 0: the attention block is one kernel (one program per query head); P > 0: two kernels,
`qkv_heads` (one program per head of q, k and v: H + 2 KV programs) then `attend_o` (H x P
programs, each the attention of one head and 1/P of the o product's columns), which spreads the
block's weight reads over more of the GPU's processors for one kernel more. A seventh value, slot
parts Q (default 1; Q > 1 needs P > 0): each head's attention over Q shares of the cache in a
kernel of its own (`attend_part`, H x Q programs), combined by `attend_o`."""


def _triton():
    from jax.experimental.pallas import triton as plgpu
    return plgpu


def _block(n: int, most: int) -> int | None:
    """The largest power of two <= most dividing n, at least 16 (Triton's smallest dot side)."""
    b = 1 << max(most.bit_length() - 1, 0)
    while b >= 16:
        if n % b == 0:
            return b
        b //= 2
    return None


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def tiles(cfg: TransformerConfig, requested: tuple = ()) -> dict | None:
    """The tile sizes for this stack's widths (None where they do not split)."""
    k, f, n, warps, stages, split, *parts = requested or DEFAULT_TILES
    parts = parts[0] if parts else 1
    D, F = cfg.hidden_size, cfg.intermediate_size
    n = _block(D // split, n) if split and D % split == 0 else _block(D, n) if not split else None
    t = dict(k=_block(D, k), f=_block(F, f), n=n, warps=warps, stages=stages, split=split,
             parts=parts if split or parts == 1 else None)
    return None if None in t.values() else t


def why_not(layers_p, cfg: TransformerConfig, rows: int, dtype, cache_layout: str,
            requested_tiles: tuple = ()) -> str | None:
    """Why these kernels cannot run this decoder stack for `rows` rows (None: they can)."""
    from .layers import Attention, MLP
    Dh, H, K = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    if rows > ROWS:
        return f"{rows} rows (the kernels take at most {ROWS})"
    if cache_layout != "positions":
        return f"cache_layout {cache_layout!r} (the kernels read the positions-major cache)"
    if cfg.hidden_act not in ("silu", "swish"):
        return f"hidden_act {cfg.hidden_act!r} (the kernels apply SiLU)"
    if Dh % 2 or not _pow2(Dh // 2) or Dh // 2 < 16:
        return f"head_dim {Dh} (half of it must be a power of two >= 16)"
    if H % K:
        return f"{H} heads over {K} kv heads"
    if len(requested_tiles) > 6 and requested_tiles[6] > 1 and not requested_tiles[5]:
        return f"tiles {requested_tiles} (slot parts > 1 need an o split > 0)"
    if tiles(cfg, requested_tiles) is None:
        return (f"widths {cfg.hidden_size}/{cfg.intermediate_size} (no power-of-two tiles >= 16 "
                f"divide them)")
    for lp in layers_p:
        a, m = lp["attn"], lp["mlp"]
        if not (isinstance(a, Attention) and isinstance(m, MLP)):
            return "the layers are not in the inference layout"
        for w in (a.qkv, a.o, m.gate_up, m.down):
            if isinstance(w, quantize.Int8Weight) and w.values.dtype == jnp.int8:
                continue
            if not isinstance(w, jax.Array) or w.dtype != dtype:
                return (f"weights of type {type(w).__name__} (the kernels take {dtype} arrays or "
                        f"int8 weights, quantize.Int8Weight)")
    return None


def on_nvidia_gpu() -> bool:
    """Whether JAX's default backend is an NVIDIA GPU (CUDA), where the Triton kernels run."""
    if jax.default_backend() != "gpu":
        return False
    try:
        return "cuda" in str(jax.devices()[0].client.platform_version).lower()
    except Exception:  # noqa: BLE001 - a client that does not say: not taken for CUDA
        return False


def plan(mode: str, field: str, layers_p, cfg: TransformerConfig, rows: int, dtype,
         cache_layout: str, requested_tiles: tuple = ()) -> dict | None:
    """The tiles when `mode` (the value of `Options.<field>`) asks for the kernels and they cover
    this call; None: XLA's ops. "auto" asks for them only on an NVIDIA GPU."""
    if mode == "xla" or (mode == "auto" and not on_nvidia_gpu()):
        return None
    if mode == "pallas" and jax.default_backend() != "gpu":
        raise ValueError(f"Options.{field}='pallas' needs an NVIDIA GPU (Triton kernels); this "
                         f"backend is {jax.default_backend()!r}: use 'xla', or 'interpret' for "
                         f"Pallas' interpreter")
    if why_not(layers_p, cfg, rows, dtype, cache_layout, requested_tiles):
        return None
    return tiles(cfg, requested_tiles)


def describe(mode: str, layers_p, cfg: TransformerConfig, dtype, cache_layout: str,
             requested_tiles: tuple = ()) -> str:
    """What a decoder stack's one-position steps run under `mode` (a loaded model's part, so
    `check` passed): "xla", the kernels' mode and the batches they take, or "xla" and why."""
    if mode == "xla":
        return "xla"
    if mode == "auto" and not on_nvidia_gpu():
        return "xla (auto: not an NVIDIA GPU)"
    why = why_not(layers_p, cfg, 1, dtype, cache_layout, requested_tiles)
    if why:
        return f"xla ({why})"
    return f"{mode}: batches of up to {ROWS} rows (larger: xla)"


def check(mode: str, field: str, what: str, layers_p, cfg: TransformerConfig, dtype,
          cache_layout: str, requested_tiles: tuple = ()) -> None:
    """At load: a ValueError naming why `mode` (`Options.<field>`) can never run `what` (the
    backend, the weights' format, the cache layout, the widths); calls the kernels do not take
    only for their number of rows (over `ROWS`) run XLA's ops. "auto" is never refused: XLA's
    ops wherever the kernels cannot run."""
    if mode in ("xla", "auto"):
        return
    plan(mode, field, layers_p, cfg, 1, dtype, cache_layout, requested_tiles)   # the backend
    why = why_not(layers_p, cfg, 1, dtype, cache_layout, requested_tiles)
    if why:
        raise ValueError(f"Options.{field}={mode!r} cannot run {what}: {why}. Use {field}='xla'")


def _call(kernel, interpret: bool, t: dict, **kw):
    params = None if interpret else _triton().CompilerParams(num_warps=t["warps"],
                                                             num_stages=t["stages"])
    return pl.pallas_call(kernel, interpret=interpret, compiler_params=params, **kw)


def _dot(a, b):
    precise = {"allow_tf32": False} if a.dtype == jnp.float32 else {}
    return _triton().dot(a, b, **precise)


class _Weight:
    """A product's weight inside a kernel: its values (K, N), in the activation dtype or int8
    (`quantize.Int8Weight`, converted to the activation dtype tile by tile: exact), and for int8
    the float32 scale per column, applied to the float32 sums as `quantize.matmul` does."""

    def __init__(self, refs, quantized: bool):
        self.values = next(refs)
        self.scale = next(refs) if quantized else None

    def dot(self, x, rows, cols):
        return _dot(x, self.values[rows, cols].astype(x.dtype))

    def scaled(self, sums, cols):
        return sums if self.scale is None else sums * self.scale[cols][None, :]


def _weight_args(w) -> tuple[list, bool]:
    """(the arrays a kernel takes for weight w, whether it is int8)."""
    if isinstance(w, quantize.Int8Weight):
        return [w.values, w.scale.astype(jnp.float32)], True
    return [w], False


def _rms_inverse(x_ref, D: int, bk: int, eps: float, dt):
    """1 / RMS of each row of x (read in `bk` chunks, rounded to dt first), float32."""
    f32 = jnp.float32

    def sumsq(c, ss):
        xk = x_ref[:, pl.ds(c * bk, bk)].astype(dt).astype(f32)
        return ss + jnp.sum(xk * xk, axis=1)
    ss = jax.lax.fori_loop(0, D // bk, sumsq, jnp.zeros((x_ref.shape[0],), f32))
    return jax.lax.rsqrt(ss / D + eps)


def _normed_chunk(x_ref, w_ref, inv, c, bk: int, dt):
    """Columns [c bk, (c+1) bk) of RMSNorm(x) * w, rounded like `layers.rms_norm`."""
    xk = x_ref[:, pl.ds(c * bk, bk)].astype(dt).astype(jnp.float32)
    return w_ref[pl.ds(c * bk, bk)][None, :] * (xk * inv[:, None]).astype(dt)


def _normed_products(x_ref, nw_ref, w: _Weight, cols, eps: float, bk: int, dt):
    """(RMSNorm(x) * nw) @ w[:, col] for each column slice in `cols` (all of one width), with
    float32 sums over k in `bk` chunks, in dt like `layers.linear`'s result."""
    R, D = x_ref.shape
    inv = _rms_inverse(x_ref, D, bk, eps, dt)

    def product(c, sums):
        xn = _normed_chunk(x_ref, nw_ref, inv, c, bk, dt)
        return tuple(a + w.dot(xn, pl.ds(c * bk, bk), col) for a, col in zip(sums, cols))
    zero = jnp.zeros((R, cols[0].size), jnp.float32)
    sums = jax.lax.fori_loop(0, D // bk, product, (zero,) * len(cols))
    return tuple(w.scaled(a, col).astype(dt) for a, col in zip(sums, cols))


def _add_out(acc_ref, part_fn, x_ref, first, D: int, bn: int, rows: int, dt, interpret: bool,
             start=0):
    """acc[:, cols] += part_fn(cols) (+ x[:, cols] in program `first`) for the D columns from
    `start`, `bn` at a time, by atomic adds (on the GPU only the first `rows` rows: the others
    are padding)."""
    f32 = jnp.float32
    R = acc_ref.shape[0]
    mask = None if interpret else jnp.broadcast_to((jnp.arange(R) < rows)[:, None], (R, bn))

    def chunk(c, _):
        cols = pl.ds(start + c * bn, bn)
        val = part_fn(cols) + jnp.where(first, x_ref[:, cols].astype(dt).astype(f32), 0.0)
        _triton().atomic_add(acc_ref, (slice(None), cols), val, mask=mask)
        return 0
    jax.lax.fori_loop(0, D // bn, chunk, 0)


def _rope(cos_ref, sin_ref, half: int):
    """(cos lo, cos hi, sin lo, sin hi) of each row's position, each (1 or R, half)."""
    lo, hi = pl.ds(0, half), pl.ds(half, half)
    return tuple(r[:, part] for r in (cos_ref, sin_ref) for part in (lo, hi))


def _norm_rope(x_lo, x_hi, w_lo, w_hi, rope, eps: float, dt):
    """`layers.rms_norm` over a head (its two halves), then `layers.apply_rope`, in dt."""
    f32 = jnp.float32
    cos_lo, cos_hi, sin_lo, sin_hi = rope
    a, b = x_lo.astype(f32), x_hi.astype(f32)
    Dh = 2 * a.shape[1]
    r = jax.lax.rsqrt((jnp.sum(a * a, axis=1) + jnp.sum(b * b, axis=1)) / Dh + eps)[:, None]
    a = w_lo[None, :] * (a * r).astype(dt)
    b = w_hi[None, :] * (b * r).astype(dt)
    return a * cos_lo - b * sin_lo, b * cos_hi + a * sin_hi


def _put(ref, idx, head, part, val):
    """ref[:, idx, head, part] = val (R, half) for the cache's rows (a cache with fewer rows
    than R - the talker's batch - takes the first of them: a masked store)."""
    R, half = val.shape
    if ref.shape[0] == R:
        ref[:, idx, head, part] = val.astype(ref.dtype)
        return
    mask = (jnp.arange(R) < ref.shape[0])[:, None, None, None]
    plgpu = _triton()
    plgpu.store(ref.at[pl.ds(0, R), pl.ds(idx, 1), pl.ds(head, 1), part],
                val.astype(ref.dtype).reshape(R, 1, 1, half), mask=mask)


def _slots(ref, r: int, c, g, part):
    """Cache row r's slots [c SLOTS, (c+1) SLOTS) of kv head g, (SLOTS, half): a masked load
    (zeros past the cache's slots)."""
    S = ref.shape[1]
    half = part.size
    ok = (c * SLOTS + jnp.arange(SLOTS) < S)[:, None, None]
    blk = ref.at[pl.ds(r, 1), pl.ds(c * SLOTS, SLOTS), pl.ds(g, 1), part]
    return _triton().load(blk, mask=ok[None], other=0).reshape(SLOTS, half)


def _attend_chunks(q_lo, q_hi, k_ref, v_ref, g, start, upto, c_from, c_to):
    """One query head's attention (R rows) over kv head g's cache slots [start_r, upto) (start:
    (R,) int32) within chunks [c_from, c_to) of SLOTS slots: the online softmax's float32 state
    (the largest logit, the sum of exps, the sums of exps x v over each half of the head; a row
    with no slot there, or past the cache's rows: -big, 0, 0). Row by row (the cache's rows, at
    most R: a static loop), so that a batch of one reads and computes one row's slots, not 16."""
    f32 = jnp.float32
    R, half = q_lo.shape
    lo, hi = pl.ds(0, half), pl.ds(half, half)
    scale = 1.0 / math.sqrt(2 * half)
    rows = jnp.arange(R)
    m_R, den_R = jnp.full((R,), _NEG, f32), jnp.zeros((R,), f32)
    lo_R, hi_R = jnp.zeros((R, half), f32), jnp.zeros((R, half), f32)
    for r in range(min(k_ref.shape[0], R)):
        this = rows == r
        qa = jnp.sum(jnp.where(this[:, None], q_lo.astype(f32), 0.0), axis=0)
        qb = jnp.sum(jnp.where(this[:, None], q_hi.astype(f32), 0.0), axis=0)
        first = jnp.sum(jnp.where(this, start, 0))

        def chunk(c, carry, r=r, qa=qa, qb=qb, first=first):
            m, den, a_lo, a_hi = carry
            s = c * SLOTS + jnp.arange(SLOTS)
            ok = (s >= first) & (s < upto)
            logit = (jnp.sum(qa[None, :] * _slots(k_ref, r, c, g, lo).astype(f32), axis=1)
                     + jnp.sum(qb[None, :] * _slots(k_ref, r, c, g, hi).astype(f32), axis=1))
            logit = jnp.where(ok, logit * scale, _NEG)
            m_new = jnp.maximum(m, jnp.max(logit))
            corr = jnp.exp(m - m_new)
            p = jnp.where(ok, jnp.exp(logit - m_new), 0.0)
            return (m_new, den * corr + jnp.sum(p),
                    a_lo * corr + jnp.sum(p[:, None] * _slots(v_ref, r, c, g, lo).astype(f32),
                                          axis=0),
                    a_hi * corr + jnp.sum(p[:, None] * _slots(v_ref, r, c, g, hi).astype(f32),
                                          axis=0))

        m, den, a_lo, a_hi = jax.lax.fori_loop(
            jnp.maximum(c_from, first // SLOTS), c_to, chunk,
            (f32(_NEG), f32(0.0), jnp.zeros((half,), f32), jnp.zeros((half,), f32)))
        m_R, den_R = jnp.where(this, m, m_R), jnp.where(this, den, den_R)
        lo_R = jnp.where(this[:, None], a_lo[None, :], lo_R)
        hi_R = jnp.where(this[:, None], a_hi[None, :], hi_R)
    return m_R, den_R, lo_R, hi_R


def _chunk_range(start, upto):
    """The chunks [first, end) holding slots [min start, upto)."""
    return jnp.min(start) // SLOTS, (upto + SLOTS - 1) // SLOTS


def _attend(q_lo, q_hi, k_ref, v_ref, g, start, upto, last, dt):
    """One query head's attention (R rows) over kv head g's cache slots [start_r, upto), SLOTS
    at a time, then one more slot: `last` = its (k lo, k hi, v lo, v hi) from registers, or None.
    The online softmax in float32; the result in dt."""
    f32 = jnp.float32
    half = q_lo.shape[1]
    carry = _attend_chunks(q_lo, q_hi, k_ref, v_ref, g, start, upto, *_chunk_range(start, upto))
    if last is not None:
        m, den, a_lo, a_hi = carry
        kl, kh, vl, vh = (a.astype(f32) for a in last)
        logit = (jnp.sum(q_lo.astype(f32) * kl, axis=1)
                 + jnp.sum(q_hi.astype(f32) * kh, axis=1)) / math.sqrt(2 * half)
        m_new = jnp.maximum(m, logit)
        corr, p = jnp.exp(m - m_new), jnp.exp(logit - m_new)
        carry = (m_new, den * corr + p, a_lo * corr[:, None] + p[:, None] * vl,
                 a_hi * corr[:, None] + p[:, None] * vh)
    _, den, a_lo, a_hi = carry
    return _normalized(den, a_lo, a_hi, dt)


def _normalized(den, a_lo, a_hi, dt):
    """The attention from the softmax's sums (rows with none - past the cache's rows - zero)."""
    den = jnp.where(den > 0, den, 1.0)[:, None]
    return (a_lo / den).astype(dt), (a_hi / den).astype(dt)


def _attend_part_kernel(q_ref, k_ref, v_ref, idx_ref, start_ref, m_ref, den_ref, acc_ref, *,
                        H: int, K: int, parts: int):
    """Program (h, j): query head h's attention over the j-th of `parts` shares of the chunks of
    slots [min start, idx] (the caches hold slot idx already), unnormalized, into the scratch
    (flash decoding: a long cache read by H x parts programs instead of H)."""
    h, j = pl.program_id(0), pl.program_id(1)
    half = q_ref.shape[2] // 2
    lo, hi = pl.ds(0, half), pl.ds(half, half)
    start, upto = start_ref[...], idx_ref[()] + 1
    first, end = _chunk_range(start, upto)
    per = (end - first + parts - 1) // parts
    c_from = first + j * per
    m, den, a_lo, a_hi = _attend_chunks(q_ref[:, h, lo], q_ref[:, h, hi], k_ref, v_ref,
                                        h // (H // K), start, upto, c_from,
                                        jnp.minimum(c_from + per, end))
    m_ref[j, :, h] = m
    den_ref[j, :, h] = den
    acc_ref[j, :, h, lo] = a_lo
    acc_ref[j, :, h, hi] = a_hi


def _combined(m_ref, den_ref, acc_ref, h, dt):
    """Head h's attention from the parts' online-softmax states (`_attend_part_kernel`)."""
    parts = m_ref.shape[0]
    half = acc_ref.shape[3] // 2
    lo, hi = pl.ds(0, half), pl.ds(half, half)
    m = m_ref[0, :, h]
    for j in range(1, parts):
        m = jnp.maximum(m, m_ref[j, :, h])
    den, a_lo, a_hi = 0.0, 0.0, 0.0
    for j in range(parts):
        w = jnp.exp(m_ref[j, :, h] - m)
        den = den + den_ref[j, :, h] * w
        a_lo = a_lo + acc_ref[j, :, h, lo] * w[:, None]
        a_hi = a_hi + acc_ref[j, :, h, hi] * w[:, None]
    return _normalized(den, a_lo, a_hi, dt)


def _attention_kernel(*refs, H: int, K: int, eps: float, dt, rows: int, t: dict,
                      quantized: tuple, interpret: bool):
    it = iter(refs)
    x_ref, nw_ref = next(it), next(it)
    qkv = _Weight(it, quantized[0])
    qn_ref, kn_ref, cos_ref, sin_ref = next(it), next(it), next(it), next(it)
    o = _Weight(it, quantized[1])
    idx_ref, start_ref, _k_in, _v_in, _acc_in, k_ref, v_ref, acc_ref = it
    h = pl.program_id(0)
    g = h // (H // K)
    D = x_ref.shape[1]
    Dh = qn_ref.shape[0]
    half = Dh // 2
    lo, hi = pl.ds(0, half), pl.ds(half, half)
    idx = idx_ref[()]
    cols = tuple(pl.ds(c, half) for c in (h * Dh, h * Dh + half, (H + g) * Dh,
                                          (H + g) * Dh + half, (H + K + g) * Dh,
                                          (H + K + g) * Dh + half))
    q_lo, q_hi, k_lo, k_hi, v_lo, v_hi = _normed_products(x_ref, nw_ref, qkv, cols, eps, t["k"],
                                                          dt)

    rope = _rope(cos_ref, sin_ref, half)
    q_lo, q_hi = _norm_rope(q_lo, q_hi, qn_ref[lo], qn_ref[hi], rope, eps, dt)
    k_lo, k_hi = _norm_rope(k_lo, k_hi, kn_ref[lo], kn_ref[hi], rope, eps, dt)
    cdt = k_ref.dtype
    k_lo, k_hi, v_lo, v_hi = (a.astype(cdt) for a in (k_lo, k_hi, v_lo, v_hi))

    @pl.when(h % (H // K) == 0)   # one program per kv head writes its slot
    def _write():
        _put(k_ref, idx, g, lo, k_lo)
        _put(k_ref, idx, g, hi, k_hi)
        _put(v_ref, idx, g, lo, v_lo)
        _put(v_ref, idx, g, hi, v_hi)

    # slots [start, idx) from the cache, then this step's slot from registers
    out_lo, out_hi = _attend(q_lo, q_hi, k_ref, v_ref, g, start_ref[...], idx,
                             (k_lo, k_hi, v_lo, v_hi), dt)

    def part(cols):  # this head's rows of the o product
        return o.scaled(o.dot(out_lo, pl.ds(h * Dh, half), cols)
                        + o.dot(out_hi, pl.ds(h * Dh + half, half), cols), cols)
    _add_out(acc_ref, part, x_ref, h == 0, D, t["n"], rows, dt, interpret)


def _qkv_heads_kernel(*refs, H: int, K: int, eps: float, dt, t: dict, quantized: bool):
    """Program p: columns [p Dh, (p+1) Dh) of the q|k|v product, i.e. query head p (p < H), key
    head p - H or value head p - H - K; q and k normed and rotated; q to its buffer, k and v into
    the caches at slot idx."""
    it = iter(refs)
    x_ref, nw_ref = next(it), next(it)
    qkv = _Weight(it, quantized)
    qn_ref, kn_ref, cos_ref, sin_ref, idx_ref, _k_in, _v_in, q_ref, k_ref, v_ref = it
    p = pl.program_id(0)
    Dh = qn_ref.shape[0]
    half = Dh // 2
    lo, hi = pl.ds(0, half), pl.ds(half, half)
    idx = idx_ref[()]
    x_lo, x_hi = _normed_products(x_ref, nw_ref, qkv, (pl.ds(p * Dh, half),
                                                       pl.ds(p * Dh + half, half)), eps, t["k"], dt)
    is_q = p < H
    w_lo = jnp.where(is_q, qn_ref[lo], kn_ref[lo])
    w_hi = jnp.where(is_q, qn_ref[hi], kn_ref[hi])
    r_lo, r_hi = _norm_rope(x_lo, x_hi, w_lo, w_hi, _rope(cos_ref, sin_ref, half), eps, dt)

    @pl.when(is_q)
    def _q():
        q_ref[:, p, lo] = r_lo
        q_ref[:, p, hi] = r_hi

    @pl.when((p >= H) & (p < H + K))
    def _k():
        _put(k_ref, idx, p - H, lo, r_lo)
        _put(k_ref, idx, p - H, hi, r_hi)

    @pl.when(p >= H + K)
    def _v():
        _put(v_ref, idx, p - H - K, lo, x_lo)
        _put(v_ref, idx, p - H - K, hi, x_hi)


def _attend_o_kernel(*refs, H: int, K: int, dt, rows: int, t: dict, quantized: bool,
                     interpret: bool):
    """Program (h, c): query head h's attention over slots [start_r, idx] (the caches hold slot
    idx already), or with slot parts its parts' states combined, times its rows of the o product
    for column block c, added into the residual."""
    it = iter(refs)
    x_ref, a_ref, b_ref, c_ref = next(it), next(it), next(it), next(it)
    o = _Weight(it, quantized)
    idx_ref, start_ref, _acc_in, acc_ref = it
    h, c = pl.program_id(0), pl.program_id(1)
    R, D = x_ref.shape
    Dh = o.values.shape[0] // H
    half = Dh // 2
    width = D // t["split"]
    if t["parts"] > 1:   # (max logit, sum of exps, sums x v) of each part
        out_lo, out_hi = _combined(a_ref, b_ref, c_ref, h, dt)
    else:                # q, the k cache, the v cache
        out_lo, out_hi = _attend(a_ref[:, h, pl.ds(0, half)], a_ref[:, h, pl.ds(half, half)],
                                 b_ref, c_ref, h // (H // K), start_ref[...], idx_ref[()] + 1,
                                 None, dt)

    def part(cols):
        return o.scaled(o.dot(out_lo, pl.ds(h * Dh, half), cols)
                        + o.dot(out_hi, pl.ds(h * Dh + half, half), cols), cols)
    _add_out(acc_ref, part, x_ref, h == 0, width, t["n"], rows, dt, interpret, start=c * width)


def _mlp_kernel(*refs, eps: float, dt, rows: int, t: dict, quantized: tuple, interpret: bool):
    it = iter(refs)
    x_ref, nw_ref = next(it), next(it)
    gate_up = _Weight(it, quantized[0])
    down = _Weight(it, quantized[1])
    _acc_in, acc_ref = it
    j = pl.program_id(0)
    D = x_ref.shape[1]
    F = gate_up.values.shape[1] // 2
    bf = t["f"]
    gate, up = _normed_products(x_ref, nw_ref, gate_up, (pl.ds(j * bf, bf), pl.ds(F + j * bf, bf)),
                                eps, t["k"], dt)
    g = gate.astype(jnp.float32)
    act = (g / (1.0 + jnp.exp(-g))).astype(dt) * up

    def part(cols):
        return down.scaled(down.dot(act, pl.ds(j * bf, bf), cols), cols)
    _add_out(acc_ref, part, x_ref, j == 0, D, t["n"], rows, dt, interpret)


def attention_block(x_RxD, lp, cos, sin, k_cache, v_cache, write_index, start_R,
                    cfg: TransformerConfig, dt, rows: int, t: dict, interpret: bool):
    """x + attention(RMSNorm(x)) for one position per row (float32, (R, D)), and the caches with
    this position's k and v at `write_index`; row r attends to slots [start_r, write_index].
    x: (R, D), in the activation dtype `dt` or float32 (rounded to dt first); cos, sin: (1 or R,
    Dh), each row's RoPE (`layers.rope_cos_sin`); caches: (C <= R, S, K, Dh)."""
    a = lp["attn"]
    R, D = x_RxD.shape
    H, K = cfg.num_attention_heads, cfg.num_key_value_heads
    qkv, qkv_q = _weight_args(a.qkv)
    o, o_q = _weight_args(a.o)
    if t["split"]:
        return _attention_split(x_RxD, lp, cos, sin, k_cache, v_cache, write_index, start_R,
                                cfg, dt, rows, t, interpret)
    args = [x_RxD, lp["input_norm"].astype(dt), *qkv, a.q_norm.astype(dt), a.k_norm.astype(dt),
            cos.astype(dt), sin.astype(dt), *o, jnp.asarray(write_index, jnp.int32), start_R,
            k_cache, v_cache, jnp.zeros((R, D), jnp.float32)]
    n = len(args)
    kernel = functools.partial(_attention_kernel, H=H, K=K, eps=cfg.rms_norm_eps, dt=dt,
                               rows=rows, t=t, quantized=(qkv_q, o_q), interpret=interpret)
    out_shape = (jax.ShapeDtypeStruct(k_cache.shape, k_cache.dtype),
                 jax.ShapeDtypeStruct(v_cache.shape, v_cache.dtype),
                 jax.ShapeDtypeStruct((R, D), jnp.float32))
    k, v, acc = _call(kernel, interpret, t, grid=(H,), out_shape=out_shape,
                      input_output_aliases={n - 3: 0, n - 2: 1, n - 1: 2})(*args)
    return acc, k, v


def _attention_split(x_RxD, lp, cos, sin, k_cache, v_cache, write_index, start_R,
                     cfg: TransformerConfig, dt, rows: int, t: dict, interpret: bool):
    """`attention_block` as two kernels (o split P = t["split"] > 0): `_qkv_heads_kernel` over
    the H + 2 KV heads, then `_attend_o_kernel` over H x P; with slot parts Q = t["parts"] > 1
    three: `_attend_part_kernel` over H x Q between them."""
    a = lp["attn"]
    R, D = x_RxD.shape
    H, K, Dh = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    idx = jnp.asarray(write_index, jnp.int32)
    qkv, qkv_q = _weight_args(a.qkv)
    args = [x_RxD, lp["input_norm"].astype(dt), *qkv, a.q_norm.astype(dt), a.k_norm.astype(dt),
            cos.astype(dt), sin.astype(dt), idx, k_cache, v_cache]
    n = len(args)
    q, k, v = _call(
        functools.partial(_qkv_heads_kernel, H=H, K=K, eps=cfg.rms_norm_eps, dt=dt, t=t,
                          quantized=qkv_q), interpret, t, grid=(H + 2 * K,),
        out_shape=(jax.ShapeDtypeStruct((R, H, Dh), dt),
                   jax.ShapeDtypeStruct(k_cache.shape, k_cache.dtype),
                   jax.ShapeDtypeStruct(v_cache.shape, v_cache.dtype)),
        input_output_aliases={n - 2: 1, n - 1: 2})(*args)
    o, o_q = _weight_args(a.o)
    attn = (q, k, v)
    if t["parts"] > 1:
        Q, f32 = t["parts"], jnp.float32
        attn = _call(functools.partial(_attend_part_kernel, H=H, K=K, parts=Q), interpret, t,
                     grid=(H, Q), out_shape=(jax.ShapeDtypeStruct((Q, R, H), f32),
                                             jax.ShapeDtypeStruct((Q, R, H), f32),
                                             jax.ShapeDtypeStruct((Q, R, H, Dh), f32)))(
            q, k, v, idx, start_R)
    args = [x_RxD, *attn, *o, idx, start_R, jnp.zeros((R, D), jnp.float32)]
    acc = _call(functools.partial(_attend_o_kernel, H=H, K=K, dt=dt, rows=rows, t=t,
                                  quantized=o_q, interpret=interpret), interpret, t,
                grid=(H, t["split"]), out_shape=jax.ShapeDtypeStruct((R, D), jnp.float32),
                input_output_aliases={len(args) - 1: 0})(*args)
    return acc, k, v


def mlp_block(x_RxD, lp, cfg: TransformerConfig, dt, rows: int, t: dict, interpret: bool):
    """x + MLP(RMSNorm(x)) (float32, (R, D)); x float32 (rounded to the activation dtype `dt`
    first)."""
    m = lp["mlp"]
    R, D = x_RxD.shape
    gate_up, gu_q = _weight_args(m.gate_up)
    down, down_q = _weight_args(m.down)
    F = m.down.shape[0]
    args = [x_RxD, lp["post_norm"].astype(dt), *gate_up, *down, jnp.zeros((R, D), jnp.float32)]
    kernel = functools.partial(_mlp_kernel, eps=cfg.rms_norm_eps, dt=dt, rows=rows, t=t,
                               quantized=(gu_q, down_q), interpret=interpret)
    return _call(kernel, interpret, t, grid=(F // t["f"],),
                 out_shape=jax.ShapeDtypeStruct((R, D), jnp.float32),
                 input_output_aliases={len(args) - 1: 0})(*args)


def decoder_stack(layers_p, x_RxD, write_index, caches, cos, sin, start_R,
                  cfg: TransformerConfig, rows: int, t: dict, interpret: bool = False):
    """`layers.decoder_layer` over the stack for one position per row at `write_index`, row r
    attending to slots [start_r, write_index] (the code predictor's steps: start 0; the talker's:
    after its left padding), two or three kernels a layer. x: (R = 16, D) with `rows` real rows
    (the first); cos, sin: (1 or R, Dh), the rows' RoPE; start_R: (R,) int32; caches:
    `layers.KVCache` with R rows or the first C >= rows of them. Returns (hidden (R, D) in the
    activation dtype, before the final norm; the new caches)."""
    dt = x_RxD.dtype
    new = []
    x = x_RxD
    for lp, cache in zip(layers_p, caches):
        x, k, v = attention_block(x, lp, cos, sin, cache.k, cache.v, write_index, start_R, cfg,
                                  dt, rows, t, interpret)
        new.append(type(cache)(k, v))
        x = mlp_block(x, lp, cfg, dt, rows, t, interpret)
    return x.astype(dt), new
