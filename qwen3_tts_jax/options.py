"""The numerical and kernel choices of generation, as one static value.

`Options` is a frozen, hashable dataclass passed as a STATIC argument to the jitted programs
(`generate.prefill`, `decode`, `insert`, ...): every field is part of a compiled program's key,
so two values give two programs and nothing is read from the environment or from module globals
while a program is traced. `Options.for_backend()` gives the measured per-backend defaults;
`Options(...)` (or `for_backend(..., field=value)`) sets a field explicitly.

    opts = Options.for_backend()                      # this process's backend
    opts = Options.for_backend("gpu", attention="cudnn")
    tts = Qwen3TTS.from_pretrained(path, options=opts)

The measurements behind each default are in benchmarks/RESULTS.md.
"""
from __future__ import annotations

import dataclasses
import functools

CACHE_LAYOUTS = ("heads", "positions")
KTH_METHODS = ("top_k", "pairwise")
ATTENTIONS = (None, "xla", "cudnn")
INT8_ACTIVATIONS = ("float", "int8")
CODEC_OVERLAPS = ("off", "queue", "thread")
KERNEL_MODES = ("xla", "auto", "pallas", "interpret")

# XLA:CPU hands matrix products to YNNPACK by default; these options turn its fusions off.
CPU_DECODE_OPTIONS = (("xla_cpu_experimental_ynn_fusion_type", ""),)


@dataclasses.dataclass(frozen=True)
class Options:
    """Static generation choices. The dataclass defaults are portable (XLA's ops on any backend,
    the CPU's sampler and cache choices); `for_backend` gives the measured defaults."""

    # KV-cache layout of the talker and the code predictor: "heads" (B, KV heads, Dh, S), what
    # XLA:CPU's batched products take without copying (2-4x faster attention on a 2-core CPU,
    # f32, 0.6B talker, batch 8-32, cache lengths 300-560), or "positions" (B, S, KV heads, Dh),
    # what `jax.nn.dot_product_attention` and cuDNN take (accelerators).
    cache_layout: str = "heads"

    # The code predictor's steps 1..14 unrolled (14 copies) instead of a loop: on accelerators
    # each loop step costs a read-back of its condition (one H100, bf16, 0.6B, batch 1: greedy
    # 251.0 frames/s unrolled vs 244.2 as a loop; sampled 241.9 vs 234.3; ~10 s more compile);
    # on the CPU a step has no such cost and the copies only lengthen the compile.
    unroll_predictor: bool = False

    # How the "top_k" sampler kind finds each row's k-th largest logit: "top_k" (`lax.top_k`
    # candidates; XLA lowers it to a sort of the row on GPUs, 15 us a step on an H100) or
    # "pairwise" (for every logit, how many are >= it: two fused reductions over rows x V x V
    # comparisons, no sort; H100, bf16, 0.6B, batch 1 sampled: 234.3 frames/s vs 224.7).
    kth_by: str = "top_k"
    # Comparisons per call (rows x V x V) above which "pairwise" uses `lax.top_k` anyway.
    pairwise_max: int = 1 << 26

    # `SamplingParams.create` gives the settings' narrowest sampler kind (greedy / top-k only /
    # full), one compiled program per kind, instead of always "full": on accelerators the
    # sampler's sort and draw are dozens of small kernels a frame (H100, batch 1 greedy: 1.12x).
    specialize_sampler: bool = False

    # The sampler picks its fast path (top-k candidates) and the all-greedy skip at run time with
    # `lax.cond`: free on the CPU; on GPUs XLA reads a conditional's predicate back to the host,
    # 32 times a frame, so there the sampler is the single full-sort program (same results).
    runtime_dispatch: bool = True

    # The CPU kernels (`cpu_kernels.py`): packed decoder products (1.7-2.5x XLA's at 8-16 rows)
    # and attention over the filled cache slots only. Needs the CPU backend with one local
    # device (the custom calls have no sharding rule) and the kernels built.
    cpu_kernels: bool = False

    # With `quantize="int8"` and `cpu_kernels`: the activations of the int8 products. "float":
    # float32 activations times the int8 weights widened to float32 (`PackedInt8Weight`);
    # "int8": each row quantized to int8 per block of 32 k on the fly, integer dot instructions
    # (AVX-512 VNNI or AVX2, picked from CPUID at run time; `PackedInt8DotWeight`). The weights
    # are packed for it at load (`checkpoint.pack_for_inference`). Measured speed and closeness
    # to float32: benchmarks/RESULTS.md, Decisions: "int8 activations". `quantize="int4"` has
    # int8 activations (per block of 32 k) whatever this field says.
    int8_activations: str = "float"

    # XLA compiler options of the frame loop (`generate.decode`), (name, value) pairs or None.
    # On the CPU with float32 weights YNNPACK's fusions are off: YNNPACK repacks each weight on
    # every call, and the frame costs 1.6x more at batch 8 and 1.1x at batch 1 than with XLA's
    # own (Eigen) products (for the prefill's hundreds of rows it is as fast, so other programs
    # keep the defaults). bfloat16 weights keep the defaults: Eigen has no bf16 x bf16 -> f32.
    decode_compiler_options: tuple | None = None

    # `jax.nn.dot_product_attention`'s implementation: None / "xla" (XLA's) or "cudnn" (cuDNN's
    # fused kernel on NVIDIA GPUs, 16-bit inputs only; float32 calls stay on XLA). Measured
    # within noise of XLA's (H100, one-position decode steps), so XLA's is the default.
    attention: str | None = None

    # The fewest rows a generation batch runs with (a lone request is padded; the extra rows stop
    # at once and are dropped). On NVIDIA GPUs XLA's program for one row is slower than for two
    # (0.6B, bf16, H200: 100 frames in 0.60 s at one row, 0.45 s at two, four or eight).
    min_rows: int = 1

    # Frame capacity of the first KV-cache segment (256: 20 s of audio); doubled as needed, so
    # that attention never reads a cache much longer than the audio so far (`generate.capacity`).
    first_frames: int = 256

    # A streamed chunk's codec decode beside the next chunk's frames (`runner.stream`, the
    # engine): "off" (a chunk's audio is done before the next chunk's frames start), "queue"
    # (the codec's programs are dispatched, then the next chunk's frames, then the audio is
    # waited for: an accelerator runs them in that order without the host's gap between them),
    # "thread" (the codec runs on a worker thread: the CPU client runs one thread's programs in
    # order but two threads' at once, and the frames are bound by memory bandwidth, the codec by
    # arithmetic: 0.6B int4 + bf16 codec, 2 cores, streaming: 1.17x at 12-frame chunks, 1.24x at
    # 4). A chunk that is some stream's first is decoded alone in every mode (the time to first
    # audio is unchanged). The audio is the same in every mode. Host-side only: not part of the
    # compiled programs' key (compare=False).
    codec_overlap: str = dataclasses.field(default="off", compare=False)

    # The code predictor's one-position steps (1..14) as Pallas kernels, two a decoder layer
    # instead of XLA's ~13 (`decode_kernels.py`): "xla" (XLA's ops), "pallas" (Triton
    # kernels: NVIDIA GPUs), "auto" (the kernels on an NVIDIA GPU wherever they can run, XLA's
    # ops elsewhere and with `model_parallel`: never refused, the value for a default) or
    # "interpret" (the same kernels through Pallas' interpreter, on any backend: the tests).
    # Calls over 16 rows take XLA's ops; with "pallas" or "interpret" a model they can never
    # run (quantized weights but int8, the heads-major cache, ...: `decode_kernels.why_not`)
    # is refused at load. Their split-K atomic adds make a GPU's outputs vary at float rounding from
    # run to run. Off until measured on a GPU (benchmarks/gpu_session.sh kernels).
    predictor_kernels: str = "xla"
    # Their tiles, (reduction chunk, intermediate columns per MLP program, output columns per
    # atomic add, Triton warps, pipeline stages, o split: 0 for one attention kernel, P for two
    # with the o product in P column blocks[, slot parts: Q > 1 (with P > 0) for a third kernel
    # between them, each head's attention over Q shares of the cache (flash decoding)]); () for
    # `decode_kernels.DEFAULT_TILES`.
    predictor_tiles: tuple = ()
    # The talker's frame steps (one position per row over its long, left-padded cache) through
    # the same kernels: the same values as `predictor_kernels`; batches over 16 rows take XLA's
    # ops. Off until measured on a GPU (benchmarks/gpu_session.sh kernels3).
    talker_kernels: str = "xla"
    talker_tiles: tuple = ()   # as `predictor_tiles`

    def __post_init__(self):
        def bad(field, value, want):
            raise ValueError(f"Options.{field}={value!r}: {want}")

        if self.cache_layout not in CACHE_LAYOUTS:
            bad("cache_layout", self.cache_layout, f"use one of {CACHE_LAYOUTS}")
        if self.kth_by not in KTH_METHODS:
            bad("kth_by", self.kth_by, f"use one of {KTH_METHODS}")
        if self.attention not in ATTENTIONS:
            bad("attention", self.attention, f"use one of {ATTENTIONS}")
        if self.int8_activations not in INT8_ACTIVATIONS:
            bad("int8_activations", self.int8_activations, f"use one of {INT8_ACTIVATIONS}")
        if self.codec_overlap not in CODEC_OVERLAPS:
            bad("codec_overlap", self.codec_overlap, f"use one of {CODEC_OVERLAPS}")
        for name in ("predictor_kernels", "talker_kernels"):
            if getattr(self, name) not in KERNEL_MODES:
                bad(name, getattr(self, name), f"use one of {KERNEL_MODES}")
        for name in ("predictor_tiles", "talker_tiles"):
            tiles = getattr(self, name)
            if not (isinstance(tiles, tuple) and (tiles == () or (
                    len(tiles) in (6, 7) and all(isinstance(v, int) and not isinstance(v, bool)
                                                 for v in tiles)
                    and min(tiles[:5] + tiles[6:]) > 0 and tiles[5] >= 0))):
                bad(name, tiles, "use () or six or seven integers (k, f, n, warps, stages: "
                    "positive; o split: 0 or more; slot parts: positive)")
        for name in ("unroll_predictor", "specialize_sampler", "runtime_dispatch", "cpu_kernels"):
            if not isinstance(getattr(self, name), bool):
                bad(name, getattr(self, name), "use True or False")
        for name, low in (("pairwise_max", 0), ("min_rows", 1), ("first_frames", 1)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                bad(name, v, f"use an integer >= {low}")
        opts = self.decode_compiler_options
        if opts is not None:
            if isinstance(opts, dict):
                opts = tuple(opts.items())
            try:
                opts = tuple(sorted((str(k), v) for k, v in opts))
                hash(opts)
            except (TypeError, ValueError):
                bad("decode_compiler_options", self.decode_compiler_options,
                    "use None or (name, value) pairs of hashable values")
            object.__setattr__(self, "decode_compiler_options", opts or None)

    @classmethod
    def for_backend(cls, backend: str | None = None, *, dtype=None, **overrides) -> "Options":
        """The measured defaults for `backend` ("cpu", "gpu", "tpu"; None: JAX's default
        backend), with `overrides` (field=value) on top. `dtype`: the weights' floating dtype
        (None: the backend's default, float32 on the CPU, bfloat16 elsewhere), which decides the
        CPU's decode compiler options (float32 only)."""
        import jax
        import jax.numpy as jnp

        from . import cpu_kernels

        backend = backend or jax.default_backend()
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"Options has no field(s) {sorted(unknown)}")
        if backend == "cpu":
            f32 = dtype is None or jnp.dtype(dtype) == jnp.float32
            base = dict(cache_layout="heads", unroll_predictor=False, kth_by="top_k",
                        specialize_sampler=False, runtime_dispatch=True,
                        cpu_kernels=cpu_kernels.available(),
                        int8_activations=("int8" if {"avx2", "avx512vnni"} &
                                          set(cpu_kernels.int8_paths()) else "float"),
                        decode_compiler_options=(CPU_DECODE_OPTIONS if f32 and
                                                 _accepted(CPU_DECODE_OPTIONS) else None),
                        min_rows=1, codec_overlap="thread")
        else:
            base = dict(cache_layout="positions", unroll_predictor=True, kth_by="pairwise",
                        specialize_sampler=True, runtime_dispatch=False, cpu_kernels=False,
                        int8_activations="float",
                        decode_compiler_options=None, min_rows=2 if backend == "gpu" else 1)
        return cls(**{**base, **overrides})


@functools.cache
def _accepted(items: tuple) -> bool:
    """Whether this jaxlib (on the default backend) knows these compiler options: a probe
    compile, once per process."""
    import jax

    try:
        jax.jit(lambda x: x + 1, compiler_options=dict(items)).lower(1.0).compile()
        return True
    except Exception:  # noqa: BLE001 - an option this jaxlib does not know: keep the defaults
        return False
