"""Serialized compiled programs (`compilation_cache.Executables`, `from_pretrained(compile_cache=)`):
a new instance on the same folder runs a program without compiling it, with the jit path's
results; a stale key is never used; a corrupt file warns and is compiled again."""
import functools
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from qwen3_tts_jax import Qwen3TTS, compilation_cache
from qwen3_tts_jax.compilation_cache import Executables


class _State(NamedTuple):
    x: jax.Array
    n: jax.Array


@functools.partial(jax.jit, static_argnames=("scale",), donate_argnames=("state",))
def _step(w, state: _State, until, scale: int = 2):
    def body(s):
        return _State(jnp.tanh(s.x @ w) * scale, s.n + 1)
    return jax.lax.while_loop(lambda s: s.n < until, body, state)


def _args():
    w = jnp.asarray(np.random.default_rng(0).standard_normal((8, 8)), jnp.float32)
    return w, _State(jnp.ones((2, 8), jnp.float32), jnp.zeros((), jnp.int32))


def _run(call, scale=2):
    w, state = _args()
    out = call(w, state, 5, scale=scale)
    return np.asarray(out.x), int(out.n), state


def test_loaded_program_gives_the_jit_results_without_compiling(tmp_path):
    want, n, _ = _run(_step)
    first = Executables(str(tmp_path), environment="env")
    got, got_n, state = _run(first.wrap(_step, "step", ("scale",)))
    assert first.stats["compiled"] == 1 and first.stats["written"] == 1
    assert state.x.is_deleted()                       # the donation is kept
    np.testing.assert_array_equal(got, want)
    assert got_n == n
    # a new process: the program is read from the folder, not compiled
    second = Executables(str(tmp_path), environment="env")
    got2, _, state2 = _run(second.wrap(_step, "step", ("scale",)))
    assert second.stats == {"loaded": 1, "compiled": 0, "written": 0, "failed": 0}
    assert state2.x.is_deleted()
    np.testing.assert_array_equal(got2, want)
    # the same instance reuses it from memory; another static value is another program
    _run(second.wrap(_step, "step", ("scale",)))
    assert second.stats["loaded"] == 1 and second.stats["compiled"] == 0
    got3, _, _ = _run(second.wrap(_step, "step", ("scale",)), scale=3)
    assert second.stats["compiled"] == 1
    np.testing.assert_array_equal(got3, _run(_step, scale=3)[0])


def test_other_shapes_and_a_trace_take_their_own_path(tmp_path):
    ex = Executables(str(tmp_path), environment="env")
    run = ex.wrap(_step, "step", ("scale",))
    w, state = _args()
    wide = _State(jnp.ones((3, 8), jnp.float32), jnp.zeros((), jnp.int32))
    np.testing.assert_array_equal(np.asarray(run(w, wide, 4).x),
                                  np.asarray(_step(w, _State(jnp.ones((3, 8)), state.n), 4).x))
    assert ex.stats["compiled"] == 1
    inner = jax.jit(lambda w, s: run(w, s, 4).x)      # under a trace: the jit function itself
    np.testing.assert_allclose(np.asarray(inner(w, _args()[1])),
                               np.asarray(_step(w, _args()[1], 4).x), rtol=1e-6)
    assert ex.stats["compiled"] == 1


def test_stale_key_is_not_used(tmp_path, caplog):
    want = _run(_step)[0]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    _run(Executables(a, environment="env").wrap(_step, "step", ("scale",)))
    # another environment (JAX, machine, package source): another key, the file is not used
    other = Executables(a, environment="other env")
    _run(other.wrap(_step, "step", ("scale",)))
    assert other.stats["loaded"] == 0 and other.stats["compiled"] == 1
    # a file under the right name whose stored key differs is refused too
    _run(Executables(b, environment="other env").wrap(_step, "step", ("scale",)))
    (name,) = os.listdir(b)
    (mine,) = [f for f in os.listdir(a) if f != name]
    with open(os.path.join(a, mine), "rb") as f, open(os.path.join(b, name), "wb") as g:
        g.write(f.read())
    ex = Executables(b, environment="other env")
    with caplog.at_level("WARNING", logger="qwen3_tts_jax"):
        got = _run(ex.wrap(_step, "step", ("scale",)))[0]
    assert "stale" in caplog.text
    assert ex.stats["loaded"] == 0 and ex.stats["compiled"] == 1
    np.testing.assert_array_equal(got, want)


def test_environment_key_covers_the_package_source(tmp_path, monkeypatch):
    base = compilation_cache.environment_key()
    assert base == compilation_cache.environment_key()
    monkeypatch.setattr(compilation_cache, "_package_digest", lambda: "edited")
    assert compilation_cache.environment_key() != base
    monkeypatch.undo()
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=false")
    assert compilation_cache.environment_key() != base


def test_corrupt_file_warns_and_compiles_again(tmp_path, caplog):
    want = _run(_step)[0]
    _run(Executables(str(tmp_path), environment="env").wrap(_step, "step", ("scale",)))
    (file,) = [os.path.join(tmp_path, f) for f in os.listdir(tmp_path)]
    with open(file, "r+b") as f:
        f.truncate(os.path.getsize(file) // 2)
    ex = Executables(str(tmp_path), environment="env")
    with caplog.at_level("WARNING", logger="qwen3_tts_jax"):
        got = _run(ex.wrap(_step, "step", ("scale",)))[0]
    assert "not used" in caplog.text and ex.stats["failed"] == 1 and ex.stats["compiled"] == 1
    np.testing.assert_array_equal(got, want)
    again = Executables(str(tmp_path), environment="env")     # rewritten
    _run(again.wrap(_step, "step", ("scale",)))
    assert again.stats["loaded"] == 1


def test_unwritable_folder_runs_without_keeping(tmp_path, caplog):
    (tmp_path / "file").write_text("")
    ex = Executables(str(tmp_path / "file" / "programs"), environment="env")
    with caplog.at_level("WARNING", logger="qwen3_tts_jax"):
        got = _run(ex.wrap(_step, "step", ("scale",)))[0]
    assert "cannot write" in caplog.text
    np.testing.assert_array_equal(got, _run(_step)[0])


def test_preload_reads_the_group_and_deletes_stale_files(tmp_path):
    folder = str(tmp_path)
    _run(Executables(folder, group="a-", environment="env").wrap(_step, "step", ("scale",)))
    _run(Executables(folder, group="b-", environment="env").wrap(_step, "step", ("scale",)))
    _run(Executables(folder, group="a-", environment="old").wrap(_step, "step", ("scale",)),
         scale=3)
    assert len(os.listdir(folder)) == 3
    ex = Executables(folder, group="a-", environment="env")
    ex.preload().join()
    assert len(ex._preloaded) == 1                      # its group, its environment
    assert sorted(f[:2] for f in os.listdir(folder)) == ["a-", "b-"]   # "old" deleted
    _run(ex.wrap(_step, "step", ("scale",)))
    assert ex.stats["loaded"] == 1 and not ex._preloaded


def test_the_folder_is_a_value_not_a_global(tmp_path):
    before = jax.config.jax_compilation_cache_dir
    a = Executables(str(tmp_path / "a"), environment="env")
    b = Executables(str(tmp_path / "b"), environment="env")
    _run(a.wrap(_step, "step", ("scale",)))
    _run(b.wrap(_step, "step", ("scale",)))
    assert a.stats["compiled"] == b.stats["compiled"] == 1     # nothing shared
    assert len(os.listdir(tmp_path / "a")) == len(os.listdir(tmp_path / "b")) == 1
    assert jax.config.jax_compilation_cache_dir == before


def test_from_pretrained_compile_cache_gives_the_same_audio(tmp_path, make_checkpoint):
    path = make_checkpoint("cv_proj")
    gen = dict(speaker=None, language="english", do_sample=False, subtalker_dosample=False,
               max_new_tokens=6)
    plain = Qwen3TTS.from_pretrained(path)
    gen["speaker"] = plain.get_supported_speakers()[0]
    want, sr = plain.generate_custom_voice("Hello there.", **gen)
    folder = str(tmp_path / "programs")
    first = Qwen3TTS.from_pretrained(path, compile_cache=folder)
    got, _ = first.generate_custom_voice("Hello there.", **gen)
    assert first.executables.stats["compiled"] == 3        # prefill, frame loop, codec
    assert len(os.listdir(folder)) == 3
    again = Qwen3TTS.from_pretrained(path, compile_cache=folder)   # a new process's load
    got2, _ = again.generate_custom_voice("Hello there.", **gen)
    assert again.executables.stats["compiled"] == 0 and again.executables.stats["loaded"] == 3
    for w in (got, got2):
        np.testing.assert_array_equal(w[0], want[0])
    codes = again.generate_custom_voice_codes("Hello there.", **gen)
    np.testing.assert_array_equal(codes[0], plain.generate_custom_voice_codes(
        "Hello there.", **gen)[0])
    # streaming runs the same prefill and frame loop programs, chunk by chunk
    loaded = again.executables.stats["loaded"]
    chunks = list(again.generate_custom_voice_streaming("Hello there.", chunk_frames=2,
                                                        first_chunk_frames=1, **gen))
    want_chunks = list(plain.generate_custom_voice_streaming("Hello there.", chunk_frames=2,
                                                             first_chunk_frames=1, **gen))
    assert len(chunks) == len(want_chunks) > 1
    for c, w in zip(chunks, want_chunks):
        np.testing.assert_array_equal(c, w)
    assert again.executables.stats["loaded"] == loaded and again.executables.stats[
        "compiled"] == 0


_PERSISTENT = """
import sys, jax, jax.numpy as jnp
from qwen3_tts_jax.compilation_cache import Executables
jax.config.update("jax_compilation_cache_dir", sys.argv[1] + "/xla")
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
f = jax.jit(lambda x: jnp.sin(-x ** 2) * jnp.exp(x) + jnp.tanh(x @ x.T).sum())
x = jnp.linspace(0, 1, 64 * 64).reshape(64, 64)
if sys.argv[2] == "jit":
    print(float(f(x).sum()))
else:
    ex = Executables(sys.argv[1] + "/programs", environment="env")
    print(float(ex.wrap(f, "f", ())(x).sum()), ex.stats["loaded"], ex.stats["written"])
"""


def test_a_program_from_jaxs_persistent_cache_is_not_kept(tmp_path):
    """Re-serialized, an executable that JAX's persistent cache gave fails to run in the next
    process ("Function ... not found"): such a program is not written."""
    import subprocess
    import sys

    def run(mode):
        out = subprocess.run([sys.executable, "-c", _PERSISTENT, str(tmp_path), mode],
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        return out.stdout.split()

    want = run("jit")[0]                          # fills JAX's persistent cache
    assert run("exe") == [want, "0", "0"]         # a persistent-cache hit: not written
    assert not (tmp_path / "programs").exists()
    assert run("exe") == [want, "0", "0"]         # nor read (nothing broken to read)


def test_a_program_of_another_group_is_shared(tmp_path):
    folder = str(tmp_path)
    _run(Executables(folder, group="a-", environment="env").wrap(_step, "step", ("scale",)))
    b = Executables(folder, group="b-", environment="env")
    np.testing.assert_array_equal(_run(b.wrap(_step, "step", ("scale",)))[0], _run(_step)[0])
    assert b.stats["loaded"] == 1 and b.stats["compiled"] == 0
    assert sorted(f[:2] for f in os.listdir(folder)) == ["a-", "b-"]     # linked for its preload
    ahead = Executables(folder, group="b-", environment="env")
    ahead.preload().join()
    assert len(ahead._preloaded) == 1
