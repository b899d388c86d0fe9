"""Compiled programs kept on disk for a new process: JAX's persistent compilation cache
(`enable_compilation_cache`, a global JAX setting made at the command line's and the server's
start), and our own serialized executables (`Executables`, a folder passed to
`Qwen3TTS.from_pretrained(compile_cache=...)`), which also skip tracing and lowering."""
from __future__ import annotations

import hashlib
import inspect
import logging
import os
import pickle
import platform
import threading
import time

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


# ------------------------------------------------------------------------------------------------
# Serialized executables: a warm process skips tracing, lowering and the persistent cache's read
# ------------------------------------------------------------------------------------------------

EXECUTABLE_FORMAT = "qwen3-tts-jax executable v1"
PACKAGE = os.path.dirname(os.path.abspath(__file__))


def _package_digest() -> str:
    """sha256 of this package's source: every .py under it and the kernels' C++ source."""
    h = hashlib.sha256()
    for root, dirs, files in os.walk(PACKAGE):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(files):
            if name.endswith((".py", ".cc")):
                path = os.path.join(root, name)
                h.update(os.path.relpath(path, PACKAGE).encode() + b"\0")
                with open(path, "rb") as f:
                    h.update(f.read())
    return h.hexdigest()


def _cpu() -> str:
    """The CPU model and feature flags (XLA:CPU compiles for the host's instructions)."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags", "Features"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return f"{platform.machine()} {platform.processor()}"


def environment_key() -> str:
    """What a serialized executable depends on besides its program: JAX and jaxlib, the backend
    (platform, its version, device kind and count), the CPU, XLA_FLAGS, the JAX settings that
    change programs, and this package's source."""
    import jaxlib

    dev = jax.devices()
    conf = jax.config
    parts = [EXECUTABLE_FORMAT, jax.__version__, getattr(jaxlib, "__version__", "?"),
             dev[0].platform, dev[0].client.platform_version, dev[0].device_kind, str(len(dev)),
             platform.machine(), _cpu(), os.environ.get("XLA_FLAGS", ""),
             repr([getattr(conf, n, None) for n in (
                 "jax_enable_x64", "jax_default_matmul_precision", "jax_threefry_partitionable",
                 "jax_default_prng_impl")]),
             _package_digest()]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _aval(x) -> str:
    t = jax.typeof(x)
    return f"{'~' if getattr(t, 'weak_type', False) else ''}{t.str_short()}"


class Executables:
    """Compiled programs kept in a folder as serialized executables
    (`jax.experimental.serialize_executable`), so that a new process runs a program it ran
    before without tracing, lowering or compiling it (nor reading JAX's persistent compilation
    cache, which still traces and lowers to find its entry). Used by `generate.generate` /
    `stream` and the codec's decode where a model is loaded with `compile_cache=`.

    A program is found by a key that covers everything it was made from: the function's name,
    its static arguments (repr: configs, `Options`, shape buckets), the tree structure, shapes
    and dtypes of its other arguments (the weights' pytree included), and `environment_key()`
    (JAX/jaxlib, backend, CPU, XLA_FLAGS, this package's source). The file also holds the key,
    checked when it is read. A file that cannot be read or loaded is compiled again (one
    warning) and rewritten; programs that cannot be serialized run as compiled, kept in memory.

    `group` (a file-name prefix, e.g. one per model and options) picks the files that `preload`
    reads ahead; files of the group made in another environment are deleted there.

    The folder must be the user's own: a serialized executable is code (a pickle); never point
    this at files from elsewhere."""

    def __init__(self, folder: str, group: str = "", environment: str | None = None):
        self.folder = folder
        self.group = group             # a file-name prefix: the programs `preload` reads
        self._environment = environment
        self._memory: dict = {}        # (name, statics, treedef, avals) -> jax.stages.Compiled
        self._preloaded: dict = {}     # file name -> Compiled, read ahead by `preload`
        self._preloading = None        # the thread of `preload`
        self._wrapped: dict = {}       # (fn, name) -> its `wrap`
        self._lock = threading.RLock()
        self._warned: set = set()
        self.stats = {"loaded": 0, "compiled": 0, "written": 0, "failed": 0}

    @property
    def environment(self) -> str:
        if self._environment is None:
            self._environment = environment_key()
        return self._environment

    def wrap(self, fn, name: str, static_argnames: tuple[str, ...]):
        """`fn` (a `jax.jit` function with these static arguments) through this cache: same
        arguments, same results. Under a trace (inside another jit) it is `fn` itself."""
        wrapped = self._wrapped.get((fn, name))
        if wrapped is not None:
            return wrapped
        sig = inspect.signature(fn)

        def call(*args, **kwargs):
            bound = sig.bind(*args, **kwargs)
            bound.apply_defaults()
            every = dict(bound.arguments)
            dyn = {k: v for k, v in every.items() if k not in static_argnames}
            leaves, treedef = jax.tree_util.tree_flatten(dyn)
            if any(isinstance(x, jax.core.Tracer) for x in leaves):
                return fn(*args, **kwargs)
            statics = tuple((k, every[k]) for k in static_argnames if k in every)
            key = (name, statics, treedef, tuple(_aval(x) for x in leaves))
            exe = self._memory.get(key)
            if exe is None:
                exe = self._find(fn, key, every)
            return exe(**dyn)

        call.__wrapped__ = fn
        self._wrapped[(fn, name)] = call
        return call

    # -------------------------------------------------------------- files
    def _file_key(self, key) -> str:
        name, statics, treedef, avals = key
        return "\n".join([self.environment, name, repr(statics), str(treedef), repr(avals)])

    def _path(self, name: str, text: str) -> str:
        digest = hashlib.sha256(text.encode()).hexdigest()[:32]
        return os.path.join(self.folder, f"{self.group}{name}-{digest}.exe")

    def _warn(self, path: str, why: str) -> None:
        self.stats["failed"] += 1
        if path not in self._warned:
            self._warned.add(path)
            log.warning("compiled program %s not used (%s); compiling it again", path, why)

    def _read(self, path: str, text: str | None):
        """(Compiled, key) in `path`, its key checked against `text` where given, else against
        the environment (`_Stale`); (None, None) if the file is missing; raises on a file that
        cannot be read or loaded."""
        from jax.experimental import serialize_executable

        try:
            with open(path, "rb") as f:
                blob = f.read()
        except FileNotFoundError:
            return None, None
        entry = pickle.loads(blob)
        if not isinstance(entry, dict) or entry.get("format") != EXECUTABLE_FORMAT:
            raise ValueError("not a serialized executable of this format")
        if text is not None and entry["key"] != text:
            raise ValueError("its key differs (stale)")
        if text is None and not entry["key"].startswith(self.environment + "\n"):
            raise _Stale("made in another environment")
        exe = serialize_executable.deserialize_and_load(entry["exe"], entry["in_tree"],
                                                        entry["out_tree"])
        return exe, entry["key"]

    def _find(self, fn, key, every: dict):
        text = self._file_key(key)
        path = self._path(key[0], text)
        with self._lock:
            exe = self._memory.get(key)
            if exe is not None:
                return exe
            self._wait_preload()
            exe = self._preloaded.pop(os.path.basename(path), (None, None))
            if exe[0] is not None and exe[1] == text:
                exe = exe[0]
            else:
                exe = None
                try:
                    exe = self._read(self._shared(path), text)[0]
                except Exception as e:  # noqa: BLE001 - any unreadable file: compile instead
                    self._warn(path, f"{type(e).__name__}: {str(e)[:200]}")
            if exe is not None:
                self.stats["loaded"] += 1
                _touch(path)
            else:
                hits = _persistent_cache_hits()
                exe = fn.lower(**every).compile()
                self.stats["compiled"] += 1
                if _persistent_cache_hits() == hits:
                    self._write(exe, path, text)
                else:   # re-serialized, an executable read from JAX's cache fails to run
                    log.info("compiled program %s came from JAX's persistent cache: not kept",
                             os.path.basename(path))
            self._memory[key] = exe
            return exe

    def _shared(self, path: str) -> str:
        """`path`, or where it is missing, the same program written by another group (the
        same key: e.g. two models' codec), linked to `path` for this group's `preload`."""
        if os.path.exists(path) or not self.group:
            return path
        suffix = os.path.basename(path)[len(self.group):]
        try:
            other = next((n for n in os.listdir(self.folder)
                          if n.endswith(suffix) and n[:-len(suffix)].endswith("-")), None)
        except OSError:
            return path
        if other is None:
            return path
        try:
            os.link(os.path.join(self.folder, other), path)
        except OSError:
            return os.path.join(self.folder, other)
        return path

    def _write(self, exe, path: str, text: str) -> None:
        from jax.experimental import serialize_executable

        try:
            blob, in_tree, out_tree = serialize_executable.serialize(exe)
            data = pickle.dumps({"format": EXECUTABLE_FORMAT, "key": text, "exe": blob,
                                 "in_tree": in_tree, "out_tree": out_tree})
        except Exception as e:  # noqa: BLE001 - a program that cannot be serialized runs anyway
            log.info("compiled program %s not kept on disk (%s)", os.path.basename(path), e)
            return
        tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
        try:
            os.makedirs(self.folder, exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
            self.stats["written"] += 1
        except OSError as e:       # read-only or full disk: run without keeping it
            if self.folder not in self._warned:
                self._warned.add(self.folder)
                log.warning("compiled programs: cannot write to %s (%s)", self.folder, e)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    # -------------------------------------------------------------- read ahead
    def preload(self, limit: int = 8) -> threading.Thread:
        """Read the `limit` most recently used programs of the group in a background thread
        (they are used on the first call that needs them, if their key matches; a call waits for
        this thread first). Returns the thread. Opt-in: on two shared cores it competed with
        the weights' load and did not pay (benchmarks/RESULTS.md, Decisions)."""
        def run():
            t = time.perf_counter()
            try:
                names = sorted((n for n in os.listdir(self.folder)
                                if n.startswith(self.group) and n.endswith(".exe")),
                               key=lambda n: -os.path.getmtime(os.path.join(self.folder, n)))
            except OSError:
                return
            for n in names[:limit]:
                path = os.path.join(self.folder, n)
                try:
                    exe, text = self._read(path, None)
                except _Stale:              # another version of the package, JAX or machine
                    try:
                        os.remove(path)
                    except OSError:
                        pass
                    continue
                except Exception:  # noqa: BLE001 - read again (and warned about) when needed
                    continue
                if exe is not None:
                    self._preloaded[n] = (exe, text)
            self.stats["preload_s"] = time.perf_counter() - t

        with self._lock:
            if self._preloading is None:
                self._preloading = threading.Thread(target=run, name="qwen3-tts-jax preload",
                                                    daemon=True)
                self._preloading.start()
            return self._preloading

    def _wait_preload(self) -> None:
        if self._preloading is not None:
            self._preloading.join()


class _Stale(Exception):
    pass


_HITS = threading.local()      # this thread's persistent-cache hits (`_persistent_cache_hits`)
_LISTENING: list = []


def _persistent_cache_hits() -> int:
    """JAX persistent-cache hits in this thread so far. An executable that JAX's cache gave is
    not serialized again: on jaxlib 0.10.2 (CPU) the copy loads but fails when run ("Function
    ... not found"), so such a program is kept in memory only."""
    if not _LISTENING:
        def on_event(event, **_):
            if event == "/jax/compilation_cache/cache_hits":
                _HITS.count = getattr(_HITS, "count", 0) + 1

        _LISTENING.append(on_event)
        jax.monitoring.register_event_listener(on_event)
    return getattr(_HITS, "count", 0)


def _touch(path: str) -> None:
    try:
        os.utime(path)
    except OSError:
        pass
