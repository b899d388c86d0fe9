"""XLA compile options for the generation programs, chosen per backend by measurement.

On the CPU, XLA (jaxlib 0.10) hands matrix products to the YNNPACK library by default. For the
frame loop's products, a few rows times a weight matrix that arrives as a program argument,
YNNPACK repacks the weight on every call, and the frame costs 1.6x more at batch 8 and 1.1x more at
batch 1 than with XLA's own (Eigen) products; for the prefill's hundreds of rows YNNPACK is as
fast or slightly faster (benchmarks/RESULTS.md, "CPU: XLA's matrix-product library"). So the
frame loop (`generate.decode`) is compiled with YNNPACK fusions off on the CPU for float32
weights (XLA's own products do not take bfloat16 x bfloat16 -> float32, which the bf16 path
needs), and every other program keeps XLA's defaults. Other backends get no options.

`decode_options()` is decided at the first compile, when JAX's backend exists (never at import:
`jax.distributed.initialize` must run before any backend starts), and only if this jaxlib knows
the option (a probe compile); `QWEN3_TTS_JAX_CPU_DECODE_OPTIONS=default` keeps XLA's defaults.
"""
from __future__ import annotations

import functools
import os

import jax

CPU_DECODE = {"xla_cpu_experimental_ynn_fusion_type": ""}


@functools.cache
def _accepted(items: tuple) -> bool:
    try:
        jax.jit(lambda x: x + 1, compiler_options=dict(items)).lower(1.0).compile()
        return True
    except Exception:  # noqa: BLE001 - an option this jaxlib does not know: keep the defaults
        return False


def decode_options(params=None, *args, **kwargs) -> dict | None:
    """Compiler options for the frame loop over `params` on the default backend (None: XLA's
    defaults)."""
    if os.environ.get("QWEN3_TTS_JAX_CPU_DECODE_OPTIONS", "") == "default":
        return None
    if jax.default_backend() != "cpu":
        return None
    leaves = jax.tree_util.tree_leaves(params)
    if any(jax.numpy.dtype(x.dtype) != jax.numpy.float32 for x in leaves
           if jax.numpy.issubdtype(x.dtype, jax.numpy.floating)):
        return None
    return CPU_DECODE if _accepted(tuple(sorted(CPU_DECODE.items()))) else None


class LazyJit:
    """`jax.jit(fun, compiler_options=options(*args, **kwargs), **jit_kwargs)`: the options are
    decided per call from the arguments (and the backend, which exists by then), one jitted
    function per distinct set of options. Attributes (`lower`, `_cache_size`, ...) go to the
    jitted function of XLA's defaults' kind for the first call's options."""

    def __init__(self, fun, options, **jit_kwargs):
        functools.update_wrapper(self, fun)
        self._fun, self._options, self._kwargs, self._jitted, self._last = (
            fun, options, jit_kwargs, {}, None)

    def _get(self, options):
        key = tuple(sorted((options or {}).items()))
        if key not in self._jitted:
            self._jitted[key] = jax.jit(self._fun, compiler_options=options, **self._kwargs)
        self._last = self._jitted[key]
        return self._last

    def __call__(self, *args, **kwargs):
        return self._get(self._chosen(args, kwargs))(*args, **kwargs)

    def _chosen(self, args, kwargs):
        # Inside another jit (e.g. `generate.synthesize` under the user's jit) only the outer
        # program has compile options.
        if any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves((args, kwargs))):
            return None
        return self._options(*args, **kwargs)

    def lower(self, *args, **kwargs):
        return self._get(self._chosen(args, kwargs)).lower(*args, **kwargs)

    def _cache_size(self) -> int:
        return sum(f._cache_size() for f in self._jitted.values())

    def __getattr__(self, name):
        if name.startswith("__") or self._last is None:
            raise AttributeError(name)
        return getattr(self._last, name)


def lazy_jit(options, **jit_kwargs):
    """Decorator form of `LazyJit`."""
    return lambda fun: LazyJit(fun, options, **jit_kwargs)
