"""Generation settings: the user's values checked and bounded (`GenerationSettings`), and their one
conversion to the traced per-row arrays of the compiled program (`traced`), with the PRNG keys of a
seed (`keys`). A request layer: it knows nothing of devices beyond building arrays."""
from __future__ import annotations

import dataclasses
import secrets
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from . import generate as gen, sampling
from .config import GenerationDefaults
from .options import Options

GEN_KWARGS = ("do_sample", "top_k", "top_p", "temperature", "repetition_penalty",
              "subtalker_dosample", "subtalker_top_k", "subtalker_top_p", "subtalker_temperature",
              "max_new_tokens", "seed")

# Frames are generated into a KV cache that grows by doubling (`generate.grow`) and positions are
# int32; generation may run past max_position_embeddings (as in the official code), so the bound is
# practical rather than architectural: 2**20 frames is ~23 hours of 12.5 Hz audio, far above any
# checkpoint's generation_config (8192), and keeps every frame count an int32.
MAX_NEW_TOKENS = 2 ** 20
# Seeds are PRNGKey seeds; with 32-bit JAX, values from 2**32 on alias smaller ones. The server and
# the batch tool accept [0, 2**31): the same range here.
SEED_LIMIT = 2 ** 31
# Every setting reaches the compiled program as int32 / float32 (`traced`). Values the official
# accepts but those types cannot hold are clamped there to values that sample the same: a top_k
# above the vocabulary keeps every token (as the official's), so any top_k >= 0 becomes at most
# TOP_K_MAX; a temperature or repetition penalty is clamped to FACTOR_RANGE (past 1e6 a
# temperature samples uniformly and a penalty zeroes or floors a logit already; below 1e-6 a
# temperature is greedy to float32 precision), where float32 holds it and its inverse.
TOP_K_MAX = 2 ** 31 - 1
FACTOR_RANGE = (1e-6, 1e6)


class SettingError(ValueError, TypeError):
    """A generation setting of the wrong type or out of range; `param` names it (the server
    answers 400 with that param)."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def check_seed(s) -> int:
    if isinstance(s, (bool, np.bool_)) or not isinstance(s, (int, np.integer)):
        raise SettingError(f"seed must be an integer (or a list of one integer per text), "
                           f"got {s!r}", "seed")
    if not 0 <= s < SEED_LIMIT:
        raise SettingError(f"seed must be in [0, 2**31), got {s!r}", "seed")
    return int(s)


@dataclasses.dataclass(frozen=True)
class GenerationSettings:
    """Validated generation settings for one call. `seed` and `max_new_tokens` may hold one
    value per utterance (a list; the official takes one `max_new_tokens` for the call): `budgets`
    gives each utterance's, `most_new_tokens` the largest (the KV cache's and frame loop's)."""
    do_sample: bool
    top_k: int
    top_p: float
    temperature: float
    repetition_penalty: float
    subtalker_dosample: bool
    subtalker_top_k: int
    subtalker_top_p: float
    subtalker_temperature: float
    max_new_tokens: int
    seed: Any = None

    @classmethod
    def merge(cls, defaults: GenerationDefaults, **kw) -> "GenerationSettings":
        """User value > generation_config.json value > official hard default; then validate."""
        unknown = sorted(set(kw) - set(GEN_KWARGS))
        if unknown:
            raise TypeError(f"unknown generation argument(s) {unknown}; valid: {list(GEN_KWARGS)}")
        vals = dataclasses.asdict(defaults)
        vals.update({k: v for k, v in kw.items() if v is not None})
        s = cls(**{k: vals.get(k) for k in GEN_KWARGS})
        s.validate()
        return s

    def validate(self):
        def number(name):
            v = getattr(self, name)
            if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer,
                                                                      np.floating)):
                raise SettingError(f"{name} must be a number, got {type(v).__name__} {v!r}", name)
            try:
                finite = np.isfinite(float(v))
            except OverflowError:            # an int past float's range
                finite = False
            if not finite:
                raise SettingError(f"{name} must be a finite number, got {str(v)[:40]}", name)
            return v

        for name in ("do_sample", "subtalker_dosample"):
            v = getattr(self, name)
            if not isinstance(v, (bool, np.bool_)):
                raise SettingError(f"{name} must be True or False, got {type(v).__name__} {v!r}",
                                   name)
        for prefix, do_sample in (("", self.do_sample), ("subtalker_", self.subtalker_dosample)):
            t, p = number(prefix + "temperature"), number(prefix + "top_p")
            k = getattr(self, prefix + "top_k")
            if do_sample and not t > 0:
                raise SettingError(f"{prefix}temperature must be > 0 when sampling (got {t}); "
                                   f"use {prefix or ''}{'do_sample' if not prefix else 'dosample'}"
                                   "=False for greedy decoding", prefix + "temperature")
            if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 0:
                raise SettingError(f"{prefix}top_k must be an integer >= 0 (0 = off), got {k!r}",
                                   prefix + "top_k")
            if not 0 < p <= 1:
                raise SettingError(f"{prefix}top_p must be in (0, 1], got {p!r}", prefix + "top_p")
        if not number("repetition_penalty") > 0:
            raise SettingError(f"repetition_penalty must be > 0, got {self.repetition_penalty!r}",
                               "repetition_penalty")
        m = self.max_new_tokens
        if isinstance(m, (list, tuple)) and not m:
            raise SettingError("max_new_tokens is an empty list: give an integer, or one per "
                               "utterance", "max_new_tokens")
        # At least 2, like the official generate (min_new_tokens=2): N talker tokens give at most
        # N - 1 frames (the last token's codes are never predicted), so 1 would give no audio.
        for v in m if isinstance(m, (list, tuple)) else [m]:
            if (not isinstance(v, (int, np.integer)) or isinstance(v, bool)
                    or not 2 <= v <= MAX_NEW_TOKENS):
                raise SettingError(f"max_new_tokens must be an integer in [2, {MAX_NEW_TOKENS}] "
                                   f"(2**20) or a list of them, one per utterance, got {v!r}",
                                   "max_new_tokens")
        if self.seed is not None:
            for s in self.seed if isinstance(self.seed, (list, tuple)) else [self.seed]:
                check_seed(s)

    def budgets(self, n: int) -> list[int]:
        """Each of `n` utterances' `max_new_tokens` (one value broadcasts)."""
        return [int(m) for m in as_list(self.max_new_tokens, n, "max_new_tokens")]

    @property
    def most_new_tokens(self) -> int:
        """The largest budget: the frames the call's KV cache and frame loop are sized for."""
        m = self.max_new_tokens
        return int(max(m) if isinstance(m, (list, tuple)) else m)

    def row(self, i: int, n: int) -> "GenerationSettings":
        """Utterance `i`'s settings (of `n`): its own budget, the other values as they are."""
        return dataclasses.replace(self, max_new_tokens=self.budgets(n)[i])

    def rows(self, start: int, stop: int, n: int) -> "GenerationSettings":
        """Utterances `start`..`stop - 1`'s settings (of `n`): their budgets and, for a seed per
        utterance, their seeds (an int seed stays: `keys(..., first_row=start)` continues it)."""
        seed = self.seed
        if isinstance(seed, (list, tuple)):
            seed = as_list(seed, n, "seed")[start:stop]
        return dataclasses.replace(self, max_new_tokens=self.budgets(n)[start:stop], seed=seed)


def as_list(x, n: int, name: str) -> list:
    """A scalar for every item, or one value per item (the official broadcasting rules)."""
    xs = list(x) if isinstance(x, (list, tuple)) else [x]
    if len(xs) == 1 and n > 1:
        xs = xs * n
    if len(xs) != n:
        raise ValueError(f"batch size mismatch: {n} text(s) but {len(xs)} {name} value(s)")
    return xs


def _threefry2x32(k1, k2, x0, x1):
    """JAX's Threefry-2x32 hash (`jax._src.random.threefry2x32`, 20 rounds) in NumPy uint32."""
    ks = [k1, k2, k1 ^ k2 ^ np.uint32(0x1BD11BDA)]
    x = [x0 + ks[0], x1 + ks[1]]
    for i in range(5):
        for r in ((13, 15, 26, 6), (17, 29, 16, 24))[i % 2]:
            x[0] = x[0] + x[1]
            x[1] = x[0] ^ ((x[1] << np.uint32(r)) | (x[1] >> np.uint32(32 - r)))
        x[0] = x[0] + ks[(i + 1) % 3]
        x[1] = x[1] + ks[(i + 2) % 3] + np.uint32(i + 1)
    return x


def keys(seed, n: int, B: int, first_row: int = 0) -> jax.Array:
    """Per-row PRNG keys (B, 2) of n requests padded to B rows: `seed` an int (row b gets
    fold_in(key(seed), first_row + b): `first_row` > 0 continues a call run in groups of rows), a
    list of ints (one per row: a row then samples the same whatever else is in the batch), or
    None (fresh random). With JAX's default raw threefry keys they are
    computed on the host (`PRNGKey(s)` is [0, s] for s < 2**31, `fold_in(k, b)` is
    threefry2x32(k, [0, b])): the same keys without compiling three small programs per process."""
    if jax.config.jax_default_prng_impl == "threefry2x32" and not jax.config.jax_enable_custom_prng:
        if isinstance(seed, (list, tuple)):
            s = np.asarray([check_seed(x) for x in as_list(seed, n, "seed")], np.uint32)
            ks = np.stack([np.zeros_like(s), s], -1)
        else:
            s = np.uint32(secrets.randbits(31) if seed is None else check_seed(seed))
            ks = np.stack(_threefry2x32(np.uint32(0), s, np.zeros(n, np.uint32),
                                        np.arange(first_row, first_row + n, dtype=np.uint32)), -1)
        return jnp.asarray(np.concatenate([ks, np.repeat(ks[:1], B - n, 0)]))
    if isinstance(seed, (list, tuple)):
        ks = [jax.random.PRNGKey(check_seed(s)) for s in as_list(seed, n, "seed")]
    else:
        base = jax.random.PRNGKey(secrets.randbits(31) if seed is None else check_seed(seed))
        ks = [jax.random.fold_in(base, first_row + b) for b in range(n)]
    ks += [ks[0]] * (B - n)
    return jnp.stack(ks)


def traced(rows: Sequence[GenerationSettings | None], options: Options,
           kind: Callable[[str, dict], str | None] | None = None) -> gen.Settings:
    """The traced per-row `generate.Settings` of a batch. A row without settings (None: padding)
    copies the first row's with a budget of 1 token, so it stops at once. `kind(role, columns)`
    may name the sampler kind for "talker" / "predictor" (`sampling.KINDS`; None: the
    settings' own under `options`), so that a batch can reuse a program compiled for a wider
    kind."""
    first = next(s for s in rows if s is not None)
    filled = [first if s is None else s for s in rows]
    B = len(rows)

    def col(name):
        return [getattr(s, name) for s in filled]

    def factor(values):
        return [min(max(float(v), FACTOR_RANGE[0]), FACTOR_RANGE[1]) for v in values]

    def params(role, prefix):
        cols = dict(do_sample=col(prefix + "dosample" if prefix else "do_sample"),
                    temperature=factor(col(prefix + "temperature")),
                    top_k=[min(int(k), TOP_K_MAX) for k in col(prefix + "top_k")],
                    top_p=[float(p) for p in col(prefix + "top_p")])
        return sampling.SamplingParams.create(B, **cols, kind=kind(role, cols) if kind else None,
                                              options=options)

    budget = [1 if s is None else s.max_new_tokens for s in rows]
    return gen.Settings(params("talker", ""), params("predictor", "subtalker_"),
                        jnp.asarray(np.asarray(factor(col("repetition_penalty")), np.float32)),
                        jnp.asarray(np.asarray(budget, np.int32)))
