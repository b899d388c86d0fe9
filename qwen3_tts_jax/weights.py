"""safetensors (official key names) -> params pytree (our names), and the fast-loading form.

A component (talker, codec decoder, ...) describes its weights with two things:
- `expected(cfg) -> {official_key: shape}`: every tensor the official module has, from the config;
- a declarative table of `Rule(src_regex, dst_template, transform)` mapping official keys to our paths.

Loading streams tensor by tensor (`TensorFile`, numpy), checks the WHOLE checkpoint against `expected`
first and fails with ONE `CheckpointError` listing every missing, unexpected and misshapen key, then
converts (transpose torch Linear weights to (in, out)), casts to the requested dtype and nests the
result: path components that are integers become list indices, so `layers/3/attn/q` is
`params["layers"][3]["attn"]["q"]`.

The fast-loading form (`convert/`) is one safetensors file per component holding OUR paths, already
transposed and cast: loading it is a plain read.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import struct
from typing import Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file


class CheckpointError(ValueError):
    """The checkpoint does not match the model its config describes."""


@dataclasses.dataclass(frozen=True)
class Rule:
    """Official keys matching `src` (full match) go to `dst`, where {1}, {2}... are regex groups."""
    src: str
    dst: str
    # "keep" | "linear": torch Linear (out, in) -> (in, out) | "conv": torch Conv1d (out, in, k)
    # -> (k, in, out) | "polyphase1", "polyphase2": torch ConvTranspose1d (in, out, m * s) with m
    # taps per output phase -> (m, in, s * out), taps reversed (see `polyphase`)
    transform: str = "keep"

    def __post_init__(self):
        object.__setattr__(self, "_re", re.compile(self.src))


def polyphase(w_IxOxK, taps: int):
    """A ConvTranspose1d weight (in, out, k = taps * stride) as the weight of the causal stride-1
    convolution that computes it polyphase: (taps, in, stride * out), where row i multiplies input
    frame t - taps + 1 + i and column r * out + o is output sample t * stride + r, channel o.
    Works on numpy and jax arrays."""
    cin, cout, k = w_IxOxK.shape
    assert k % taps == 0, (k, taps)
    s = k // taps
    return w_IxOxK.reshape(cin, cout, taps, s).transpose(2, 0, 3, 1).reshape(taps, cin, -1)[::-1]


_TRANSFORMS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "keep": lambda a: a,
    "linear": lambda a: a.T,
    "conv": lambda a: a.transpose(2, 1, 0),
    "polyphase1": lambda a: polyphase(a, 1),
    "polyphase2": lambda a: polyphase(a, 2),
}


def _shape_after(transform: str, shape: tuple) -> tuple:
    if transform in ("linear", "conv"):
        return tuple(reversed(shape))
    if transform.startswith("polyphase"):
        taps = int(transform[len("polyphase"):])
        cin, cout, k = shape
        return (taps, cin, k // taps * cout)
    return tuple(shape)


def map_key(rules: Iterable[Rule], key: str) -> tuple[str, str] | None:
    for r in rules:
        m = r._re.fullmatch(key)
        if m:
            return r.dst.format(*(m.group(0),) + m.groups()), r.transform
    return None


def np_dtype(dtype) -> np.dtype:
    if dtype in (jnp.bfloat16, "bfloat16", ml_dtypes.bfloat16):
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(dtype)


def check_keys(found: Mapping[str, tuple], expected: Mapping[str, tuple], what: str) -> None:
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    misshapen = sorted(k for k in set(found) & set(expected)
                       if tuple(found[k]) != tuple(expected[k]))
    if not (missing or unexpected or misshapen):
        return
    lines = [f"{what} does not match its config.json:"]
    if missing:
        lines.append(f"  {len(missing)} missing key(s):")
        lines += [f"    {k} {tuple(expected[k])}" for k in missing]
    if unexpected:
        lines.append(f"  {len(unexpected)} unexpected key(s):")
        lines += [f"    {k} {tuple(found[k])}" for k in unexpected]
    if misshapen:
        lines.append(f"  {len(misshapen)} key(s) with the wrong shape:")
        lines += [f"    {k}: checkpoint {tuple(found[k])}, config expects {tuple(expected[k])}"
                  for k in misshapen]
    lines.append("Is the checkpoint complete, and is config.json the one that came with it?")
    raise CheckpointError("\n".join(lines))


def nest(flat: Mapping[str, object]):
    """{"a/0/b": x} -> {"a": [{"b": x}]}: integer path components become list indices."""
    root: dict = {}
    for path, value in flat.items():
        node = root
        parts = path.split("/")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value

    def listify(node):
        if not isinstance(node, dict):
            return node
        node = {k: listify(v) for k, v in node.items()}
        if node and all(k.isdigit() for k in node):
            return [node[str(i)] for i in range(len(node))]
        return node

    return listify(root)


def flatten(tree, prefix="") -> dict:
    """Inverse of `nest`."""
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, (list, tuple)):
        items = ((str(i), v) for i, v in enumerate(tree))
    else:
        return {prefix: tree}
    out = {}
    for k, v in items:
        out.update(flatten(v, f"{prefix}/{k}" if prefix else k))
    return out


def safetensors_files(folder: str, stem: str = "model") -> list[str]:
    """model.safetensors, or the shards named by model.safetensors.index.json."""
    single = os.path.join(folder, f"{stem}.safetensors")
    index = os.path.join(folder, f"{stem}.safetensors.index.json")
    if os.path.exists(single):
        return [single]
    if os.path.exists(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(folder, s) for s in shards]
    raise CheckpointError(f"no {stem}.safetensors (or sharded index) in {folder}")


def read_header(files: Iterable[str], keep: Callable[[str], bool] = lambda k: True):
    """{key: (file, shape)} without reading tensor data."""
    out = {}
    for file in files:
        try:
            with safe_open(file, framework="np") as f:
                for k in f.keys():
                    if keep(k):
                        out[k] = (file, tuple(f.get_slice(k).get_shape()))
        except CheckpointError:
            raise
        except Exception as e:  # a truncated or non-safetensors file
            raise CheckpointError(f"cannot read {file}: {e} (corrupt or incomplete download?)") from e
    return out


# ------------------------------------------------------------------ reading without extra copies
# `jnp.asarray(host_array)` copies; `jax.device_put` of a C-contiguous host array aligned to 64
# bytes does not on the CPU (the array's memory becomes the device buffer). So a tensor is read
# from its file straight into an aligned buffer and handed over: one copy from the page cache
# instead of three (benchmarks/RESULTS.md, Decisions: "weights read into aligned buffers").
ALIGN = 64
_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
              "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32, "I16": np.int16,
              "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def aligned_empty(shape, dtype) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts on an ALIGN-byte boundary."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(n + ALIGN, np.uint8)
    off = (-raw.ctypes.data) % ALIGN
    return raw[off:off + n].view(dtype).reshape(shape)


def to_device(a: np.ndarray) -> jax.Array:
    """A host array that nobody else holds as a JAX array: aliased where the backend can (the
    CPU), else copied once."""
    if not (a.flags.c_contiguous and a.ctypes.data % ALIGN == 0):
        b = aligned_empty(a.shape, a.dtype)
        np.copyto(b, a)
        a = b
    return jax.device_put(a)


class TensorFile:
    """A safetensors file read tensor by tensor into aligned buffers (`read`); raises
    CheckpointError for a file that is not safetensors or ends early."""

    def __init__(self, file: str):
        self.file = file
        self._f = open(file, "rb")
        try:
            head = self._f.read(8)
            if len(head) < 8:
                raise ValueError("shorter than a safetensors header")
            (n,) = struct.unpack("<Q", head)
            if n > 100 << 20:
                raise ValueError(f"header of {n} bytes")
            header = json.loads(self._f.read(n))
            if not isinstance(header, dict):
                raise ValueError("the header is not a JSON object")
        except (ValueError, UnicodeDecodeError) as e:
            self._f.close()
            raise CheckpointError(f"cannot read {file}: {e}") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self.header = header
        self._base = 8 + n

    def keys(self) -> list[str]:
        return list(self.header)

    def shape(self, name: str) -> tuple:
        return tuple(self.header[name]["shape"])

    def dtype(self, name: str) -> np.dtype:
        code = self.header[name]["dtype"]
        if code not in _ST_DTYPES:
            raise CheckpointError(f"{self.file}: {name} has dtype {code}, which we cannot load")
        return np.dtype(_ST_DTYPES[code])

    def read(self, name: str) -> np.ndarray:
        info = self.header[name]
        start, stop = info["data_offsets"]
        a = aligned_empty(self.shape(name), self.dtype(name))
        if a.nbytes != stop - start:
            raise CheckpointError(f"{self.file}: {name} has {stop - start} bytes for shape "
                                  f"{self.shape(name)} {self.dtype(name)}")
        self._f.seek(self._base + start)
        if self._f.readinto(memoryview(a.reshape(-1).view(np.uint8))) != a.nbytes:
            raise CheckpointError(f"cannot read {self.file}: it ends inside {name} "
                                  "(corrupt or incomplete?)")
        return a

    def close(self):
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def load_official(files: list[str], rules: list[Rule], expected: Mapping[str, tuple], dtype,
                  what: str, prefix: str = "", dtype_for: Callable[[str], object] | None = None):
    """Stream the official tensors whose key starts with `prefix` into our nested params.

    `dtype_for(our_path)` may override the dtype per tensor (e.g. keep norms in float32)."""
    header = read_header(files, keep=lambda k: k.startswith(prefix))
    check_keys({k: s for k, (_, s) in header.items()}, expected, what)
    unmapped = sorted(k for k in header if map_key(rules, k) is None)
    if unmapped:  # a bug in our table, not in the checkpoint
        raise CheckpointError(f"{what}: no conversion rule for {unmapped[:5]}")
    flat = {}
    by_file: dict[str, list[str]] = {}
    for k, (file, _) in header.items():
        by_file.setdefault(file, []).append(k)
    for file, keys in by_file.items():
        with TensorFile(file) as f:
            for k in keys:
                dst, transform = map_key(rules, k)
                dt = np_dtype(dtype_for(dst) if dtype_for else dtype)
                # One host copy at most (cast and/or transpose) after the read: the 151936-row
                # text embedding alone is 1.2 GB in f32.
                flat[dst] = to_device(_TRANSFORMS[transform](f.read(k).astype(dt, copy=False)))
    return nest(flat)


def expected_ours(rules: list[Rule], expected: Mapping[str, tuple]) -> dict[str, tuple]:
    out = {}
    for k, shape in expected.items():
        dst, transform = map_key(rules, k)
        out[dst] = _shape_after(transform, shape)
    return out


def without_transforms(rules: list[Rule], transforms: Iterable[str]) -> list[Rule]:
    """`rules` with the given transforms replaced by "keep": what a fast form written before a
    component adopted them holds."""
    transforms = set(transforms)
    return [Rule(r.src, r.dst, "keep") if r.transform in transforms else r for r in rules]


def apply_transforms(params, rules: list[Rule], expected: Mapping[str, tuple],
                     transforms: Iterable[str]):
    """params loaded with `without_transforms(rules, transforms)` -> as `rules` would load them."""
    transforms, flat = set(transforms), flatten(params)
    for k in expected:
        dst, transform = map_key(rules, k)
        if transform in transforms:
            flat[dst] = to_device(_TRANSFORMS[transform](np.asarray(flat[dst])))
    return nest(flat)


def file_metadata(file: str) -> dict:
    """The safetensors header's __metadata__ ({} if none)."""
    with safe_open(file, "numpy") as f:
        return dict(f.metadata() or {})


def save_params(params, file: str, metadata: Mapping[str, str] | None = None) -> None:
    """Write params (our paths) as one safetensors file; the fast-loading form."""
    flat = {k: np.asarray(v) for k, v in flatten(params).items()}
    tmp = file + ".tmp"
    save_file(flat, tmp, metadata=dict(metadata or {}))
    os.replace(tmp, file)


def load_params(file: str, expected: Mapping[str, tuple], dtype, what: str,
                dtype_for: Callable[[str], object] | None = None):
    header = read_header([file])
    check_keys({k: s for k, (_, s) in header.items()}, expected, what)
    flat = {}
    with TensorFile(file) as f:
        for k in f.keys():
            dt = np_dtype(dtype_for(k) if dtype_for else dtype)
            flat[k] = to_device(f.read(k).astype(dt, copy=False))
    return nest(flat)
