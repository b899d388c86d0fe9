"""Pallas (Triton) kernels for a decode step at small batch on NVIDIA GPUs: a decoder layer in
five kernels instead of XLA's ~13.

At batch 1 on an H100 a frame is 103 decoder-layer steps (28 talker + 15 x 5 code predictor), and
the time goes to the number of kernels, not to bytes (benchmarks/RESULTS.md: 21-27 % of the
bandwidth limit, ~60 us a layer step for 12 us of weight reads). Here one layer step, for T = 1
and up to 16 rows, is
  1. input norm + q|k|v product                                   (`norm_matmul`)
  2. q/k norms + RoPE + KV-cache write + attention over the
     written slots                                               (`attend`)
  3. o product + residual                                         (`norm_matmul`)
  4. post norm + gate|up product + SiLU(gate) * up                (`norm_matmul`)
  5. down product + residual                                      (`norm_matmul`)
The rows are padded to 16 (Triton's smallest product tile) for the whole stack; padding rows stay
zero. The values are those of `layers.decoder_layer` (the same casts in the same order), up to
the order of float additions.

OFF by default: `QWEN3_TTS_JAX_GPU_KERNELS=1` turns it on for the GPU backend (read when a program
is traced), `=interpret` runs the same kernels through Pallas' interpreter on any backend (the
tests, on the CPU). `benchmarks/bench_scale.py --variants default,pallas` measures it against
XLA's ops; it becomes the default only where that measurement says so. Anything the kernels do not
cover (T > 1, more than 16 rows, the heads-major cache, widths that are not multiples of the
tiles, a head_dim that is not a power of two) takes XLA's path.
"""
from __future__ import annotations

import functools
import math
import os

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

ROWS = 16  # rows of every product tile (the smallest Triton `dot`)


def tiles() -> dict:
    """Tile sizes, at trace time: output columns per product program (n), reduction chunk (k),
    cache slots per attention chunk (s), Triton warps and pipeline stages. Chosen for memory-level
    parallelism at one row (many narrow programs, deep pipelines: a 1024-wide product is 64
    programs); QWEN3_TTS_JAX_GPU_TILES="n,k,s,warps,stages" overrides them for measurement."""
    n, k, s, warps, stages = 16, 256, 64, 4, 3
    v = os.environ.get("QWEN3_TTS_JAX_GPU_TILES")
    if v:
        n, k, s, warps, stages = (int(t) for t in v.split(","))
    return dict(n=n, k=k, s=s, warps=warps, stages=stages)


def mode() -> str | None:
    """None (off), "gpu" or "interpret", from QWEN3_TTS_JAX_GPU_KERNELS at trace time."""
    v = os.environ.get("QWEN3_TTS_JAX_GPU_KERNELS", "").strip().lower()
    if v in ("", "0", "off", "false"):
        return None
    if v == "interpret":
        return "interpret"
    if v in ("1", "on", "true", "pallas"):
        return "gpu" if jax.default_backend() == "gpu" else None
    raise ValueError(f"QWEN3_TTS_JAX_GPU_KERNELS={v!r}: use 1 (GPU), interpret or 0")


def _triton():
    from jax.experimental.pallas import triton as plgpu
    return plgpu


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _block(n: int, most: int) -> int | None:
    """The largest power of two <= most dividing n, at least 16 (Triton's smallest dot side)."""
    b = most
    while b >= 16:
        if n % b == 0:
            return b
        b //= 2
    return None


def _call(kernel, interpret: bool, **kw):
    t = tiles()
    params = None if interpret else _triton().CompilerParams(num_warps=t["warps"],
                                                             num_stages=t["stages"])
    return pl.pallas_call(kernel, interpret=interpret, compiler_params=params, **kw)


# --- products ----------------------------------------------------------------------------------

def _matmul_kernel(*refs, n_k: int, bk: int, eps: float, norm: bool, epilogue: str):
    it = iter(refs)
    x_ref = next(it)
    nw_ref = next(it) if norm else None
    w_ref = next(it)
    w2_ref = next(it) if epilogue == "swiglu" else None
    r_ref = next(it) if epilogue == "residual" else None
    o_ref = next(it)
    f32, dt = jnp.float32, x_ref.dtype
    precise = dict(allow_tf32=False) if dt == jnp.float32 else {}
    dot = _triton().dot

    inv = None
    if norm:  # RMSNorm statistics over the whole row, in float32
        def sumsq(c, ss):
            xk = x_ref[:, pl.ds(c * bk, bk)].astype(f32)
            return ss + jnp.sum(xk * xk, axis=1)
        ss = jax.lax.fori_loop(0, n_k, sumsq, jnp.zeros((x_ref.shape[0],), f32))
        inv = jax.lax.rsqrt(ss / (n_k * bk) + eps)

    def body(c, accs):
        xk = x_ref[:, pl.ds(c * bk, bk)]
        if norm:
            xk = nw_ref[pl.ds(c * bk, bk)][None, :] * (xk.astype(f32) * inv[:, None]).astype(dt)
        out = [accs[0] + dot(xk, w_ref[pl.ds(c * bk, bk), :], **precise)]
        if w2_ref is not None:
            out.append(accs[1] + dot(xk, w2_ref[pl.ds(c * bk, bk), :], **precise))
        return tuple(out)

    zeros = jnp.zeros(o_ref.shape, f32)
    accs = jax.lax.fori_loop(0, n_k, body, (zeros,) * (2 if w2_ref is not None else 1))
    y = accs[0].astype(dt)
    if epilogue == "residual":
        y = r_ref[...] + y
    elif epilogue == "swiglu":
        g = y.astype(f32)
        y = (g / (1.0 + jnp.exp(-g))).astype(dt) * accs[1].astype(dt)
    o_ref[...] = y


def norm_matmul(x_RxK, w_KxN, norm_w_K=None, eps: float = 1e-6, residual_RxN=None,
                swiglu: bool = False, interpret: bool = False):
    """[RMSNorm(x) * norm_w] @ w, then + residual, or SiLU(first half) * second half (w = gate|up,
    out N/2 wide). Rows R = 16; x, w, residual in one dtype; products accumulate in float32."""
    R, K = x_RxK.shape
    N = w_KxN.shape[1] // (2 if swiglu else 1)
    bk, bn = _block(K, tiles()["k"]), _block(N, tiles()["n"])
    epilogue = "swiglu" if swiglu else ("residual" if residual_RxN is not None else "none")
    args, specs = [x_RxK], [pl.BlockSpec((R, K), lambda n: (0, 0))]
    if norm_w_K is not None:
        args.append(norm_w_K.astype(x_RxK.dtype))
        specs.append(pl.BlockSpec((K,), lambda n: (0,)))
    args.append(w_KxN)
    specs.append(pl.BlockSpec((K, bn), lambda n: (0, n)))
    if swiglu:
        args.append(w_KxN)
        specs.append(pl.BlockSpec((K, bn), lambda n: (0, n + N // bn)))
    if residual_RxN is not None:
        args.append(residual_RxN)
        specs.append(pl.BlockSpec((R, bn), lambda n: (0, n)))
    kernel = functools.partial(_matmul_kernel, n_k=K // bk, bk=bk, eps=eps,
                               norm=norm_w_K is not None, epilogue=epilogue)
    return _call(kernel, interpret, grid=(N // bn,), in_specs=specs,
                 out_specs=pl.BlockSpec((R, bn), lambda n: (0, n)),
                 out_shape=jax.ShapeDtypeStruct((R, N), x_RxK.dtype))(*args)


# --- attention ---------------------------------------------------------------------------------

def _attend_kernel(qkv_ref, qn_ref, kn_ref, cos_ref, sin_ref, mask_ref, idx_ref, _k_in, _v_in,
                   o_ref, k_ref, v_ref, *, B: int, H: int, KV: int, S: int, eps: float, bs: int):
    f32, dt = jnp.float32, qkv_ref.dtype
    b, kh = pl.program_id(0), pl.program_id(1)
    G, Dh = H // KV, qkv_ref.shape[-1]
    half = Dh // 2
    lo, hi = pl.ds(0, half), pl.ds(half, half)
    plgpu = _triton()

    @pl.when(b >= B)
    def _padding_rows():
        for g in range(G):
            o_ref[b, kh * G + g, :] = jnp.zeros((Dh,), dt)

    @pl.when(b < B)
    def _row():
        idx = idx_ref[()]
        cos_lo, cos_hi = cos_ref[b, lo], cos_ref[b, hi]
        sin_lo, sin_hi = sin_ref[b, lo], sin_ref[b, hi]

        def norm_rope(head, w_ref):  # rms_norm over Dh, then rotate-half RoPE, in the dtype
            x_lo, x_hi = qkv_ref[b, head, lo].astype(f32), qkv_ref[b, head, hi].astype(f32)
            inv = jax.lax.rsqrt((jnp.sum(x_lo * x_lo) + jnp.sum(x_hi * x_hi)) / Dh + eps)
            x_lo = w_ref[lo] * (x_lo * inv).astype(dt)
            x_hi = w_ref[hi] * (x_hi * inv).astype(dt)
            return x_lo * cos_lo + (-x_hi) * sin_lo, x_hi * cos_hi + x_lo * sin_hi

        k_lo, k_hi = norm_rope(H + kh, kn_ref)
        v_lo, v_hi = qkv_ref[b, H + KV + kh, lo], qkv_ref[b, H + KV + kh, hi]
        k_ref[b, idx, kh, lo] = k_lo.astype(k_ref.dtype)
        k_ref[b, idx, kh, hi] = k_hi.astype(k_ref.dtype)
        v_ref[b, idx, kh, lo] = v_lo.astype(v_ref.dtype)
        v_ref[b, idx, kh, hi] = v_hi.astype(v_ref.dtype)

        scale = 1.0 / math.sqrt(Dh)
        qs = [tuple(t.astype(f32) for t in norm_rope(kh * G + g, qn_ref)) for g in range(G)]
        neg = -0.7 * float(jnp.finfo(f32).max)

        def chunk(c, carry):  # the written slots before this step's, `bs` at a time
            s = c * bs + jnp.arange(bs)
            inside = s < S
            keep = plgpu.load(mask_ref.at[b, pl.ds(c * bs, bs)], mask=inside, other=0)
            valid = inside & (s < idx) & (keep != 0)
            ld = lambda ref, part: plgpu.load(ref.at[b, pl.ds(c * bs, bs), kh, part],
                                              mask=valid[:, None], other=0).astype(f32)
            kc_lo, kc_hi, vc_lo, vc_hi = ld(k_ref, lo), ld(k_ref, hi), ld(v_ref, lo), ld(v_ref, hi)
            out = []
            for (q_lo, q_hi), (m, l, a_lo, a_hi) in zip(qs, carry):
                logit = (jnp.sum(kc_lo * q_lo[None, :], axis=1)
                         + jnp.sum(kc_hi * q_hi[None, :], axis=1)) * scale
                logit = jnp.where(valid, logit, neg)
                m_new = jnp.maximum(m, jnp.max(logit))
                corr = jnp.exp(m - m_new)
                p = jnp.where(valid, jnp.exp(logit - m_new), 0.0)
                out.append((m_new, l * corr + jnp.sum(p),
                            a_lo * corr + jnp.sum(p[:, None] * vc_lo, axis=0),
                            a_hi * corr + jnp.sum(p[:, None] * vc_hi, axis=0)))
            return tuple(out)

        zero = jnp.zeros((half,), f32)
        init = tuple((jnp.float32(neg), jnp.float32(0.0), zero, zero) for _ in range(G))
        carry = jax.lax.fori_loop(0, (idx + bs - 1) // bs, chunk, init)

        # this step's own slot, from registers (its row of the cache was just written)
        keep_new = mask_ref[b, idx] != 0
        kn_lo, kn_hi = k_lo.astype(k_ref.dtype).astype(f32), k_hi.astype(k_ref.dtype).astype(f32)
        vn_lo, vn_hi = v_lo.astype(v_ref.dtype).astype(f32), v_hi.astype(v_ref.dtype).astype(f32)
        for g, ((q_lo, q_hi), (m, l, a_lo, a_hi)) in enumerate(zip(qs, carry)):
            logit = (jnp.sum(kn_lo * q_lo) + jnp.sum(kn_hi * q_hi)) * scale
            logit = jnp.where(keep_new, logit, neg)
            m_new = jnp.maximum(m, logit)
            corr = jnp.exp(m - m_new)
            p = jnp.where(keep_new, jnp.exp(logit - m_new), 0.0)
            l = l * corr + p
            o_ref[b, kh * G + g, lo] = ((a_lo * corr + p * vn_lo) / l).astype(dt)
            o_ref[b, kh * G + g, hi] = ((a_hi * corr + p * vn_hi) / l).astype(dt)


def attend(qkv_RxNxD, q_norm, k_norm, cos_BxD, sin_BxD, k_cache, v_cache, mask_BxS, write_index,
           heads: int, kv_heads: int, eps: float, interpret: bool = False):
    """One decode step's attention for rows [0, B) of `qkv` (R x (H + 2 KV) x Dh, the raw q|k|v
    product): q/k RMSNorm + RoPE, this step's k and v written at `write_index` of the
    positions-major caches (B, S, KV, Dh; updated in place), attention over the written slots the
    mask keeps. Returns (out R x H x Dh, rows >= B zero; k_cache; v_cache)."""
    R, _, Dh = qkv_RxNxD.shape
    B, S = mask_BxS.shape
    dt = qkv_RxNxD.dtype
    kernel = functools.partial(_attend_kernel, B=B, H=heads, KV=kv_heads, S=S, eps=eps,
                               bs=tiles()["s"])
    idx = jnp.asarray(write_index, jnp.int32)
    out_shape = (jax.ShapeDtypeStruct((R, heads, Dh), dt),
                 jax.ShapeDtypeStruct(k_cache.shape, k_cache.dtype),
                 jax.ShapeDtypeStruct(v_cache.shape, v_cache.dtype))
    return _call(kernel, interpret, grid=(R, kv_heads), out_shape=out_shape,
                 input_output_aliases={7: 1, 8: 2})(
        qkv_RxNxD, q_norm.astype(dt), k_norm.astype(dt), cos_BxD.astype(dt), sin_BxD.astype(dt),
        mask_BxS.astype(jnp.int32), idx, k_cache, v_cache)


# --- the stack ---------------------------------------------------------------------------------

def covers(p_layers, x_BxTxD, caches, cfg) -> bool:
    """Whether `decoder_stack` takes this call (else XLA's path)."""
    from .cpu_kernels import PackedWeight
    from .layers import KVCache
    B, T, D = x_BxTxD.shape
    H, KV, Dh, F = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, \
        cfg.intermediate_size
    lp, t = p_layers[0], tiles()
    return (T == 1 and B <= ROWS and all(isinstance(c, KVCache) for c in caches)
            and "qkv" in lp["attn"] and "gate_up" in lp["mlp"]
            and not any(isinstance(a, PackedWeight) for a in
                        (lp["attn"]["qkv"], lp["attn"]["o"], lp["mlp"]["gate_up"], lp["mlp"]["down"]))
            and lp["attn"]["qkv"].dtype == x_BxTxD.dtype and caches[0].k.dtype == x_BxTxD.dtype
            and _pow2(Dh) and Dh >= 32 and H % KV == 0
            and None not in (_block(D, t["k"]), _block(H * Dh, t["k"]), _block(F, t["k"]),
                             _block((H + 2 * KV) * Dh, t["n"]), _block(D, t["n"]),
                             _block(F, t["n"])))


def decoder_stack(p_layers, x_BxD, cos_BxD, sin_BxD, caches, write_index, mask_BxS, cfg,
                  interpret: bool = False):
    """`layers.decoder_layer` over the stack for one position per row, five kernels a layer.
    Returns (hidden B x D before the final norm, new caches)."""
    B, D = x_BxD.shape
    H, KV, Dh, eps = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                      cfg.rms_norm_eps)
    x = jnp.pad(x_BxD, [(0, ROWS - B), (0, 0)])
    new = []
    for lp, cache in zip(p_layers, caches):
        a, m = lp["attn"], lp["mlp"]
        qkv = norm_matmul(x, a["qkv"], lp["input_norm"], eps, interpret=interpret)
        o, k, v = attend(qkv.reshape(ROWS, H + 2 * KV, Dh), a["q_norm"], a["k_norm"], cos_BxD,
                         sin_BxD, cache.k, cache.v, mask_BxS, write_index, H, KV, eps, interpret)
        new.append(type(cache)(k, v))
        x = norm_matmul(o.reshape(ROWS, H * Dh), a["o"], residual_RxN=x, interpret=interpret)
        h = norm_matmul(x, m["gate_up"], lp["post_norm"], eps, swiglu=True, interpret=interpret)
        x = norm_matmul(h, m["down"], residual_RxN=x, interpret=interpret)
    return x[:B], new
