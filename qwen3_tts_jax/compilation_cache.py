"""JAX's persistent compilation cache for our programs: a new process finds the shape buckets it
compiled before on disk instead of compiling them again."""
from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger("qwen3_tts_jax")

_CACHE_WARNED: set = set()


def enable_compilation_cache(path: str | None = None,
                             min_compile_time_secs: float = 0.5) -> str | None:
    """Keep compiled programs on disk (JAX's persistent compilation cache), so that a new process
    does not compile the same shape buckets again. Default folder: ~/.cache/qwen3-tts-jax/xla.
    Programs that compile in less than `min_compile_time_secs` are compiled again instead.
    Returns the folder, or None (with one warning) where it cannot be created or written."""
    path = path or os.path.join(os.path.expanduser("~"), ".cache", "qwen3-tts-jax", "xla")
    try:
        os.makedirs(path, exist_ok=True)
        if not os.access(path, os.W_OK | os.X_OK):
            raise PermissionError(f"{path} is not writable")
    except OSError as e:   # read-only home, no disk: run without the cache rather than fail
        if path not in _CACHE_WARNED:
            _CACHE_WARNED.add(path)
            log.warning("compilation cache disabled: cannot use %s (%s)", path, e)
        return None
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_time_secs)
    return path
