"""The batch tool (`qwen3-tts-jax batch`): bad lines reported and skipped, restart after a kill
without redoing or losing finished files (written durably; a broken one redone, temp files
removed), a failing request or padded batch failing only itself, data-parallel sharding over 8
simulated devices giving the same codes as one device, and tensor-parallel weights (2 and 8 ways)
giving the same greedy codes."""
import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

from test_cli import EXE


def _env(**extra):
    return dict(os.environ, JAX_PLATFORMS="cpu", **extra)


def test_bad_lines_are_reported_and_skipped(tmp_path, make_checkpoint):
    lines = [json.dumps({"text": "Hello world.", "name": "a", "speaker": "ryan"}),
             "{not json",
             json.dumps({"text": "", "name": "b"}),
             json.dumps({"text": "Hi.", "name": "c", "speaker": "bob"}),
             json.dumps({"text": "Hi.", "name": "d", "language": "english"}),
             json.dumps({"text": "Hi.", "colour": "red"}),
             json.dumps({"text": "Hi.", "name": "e", "seed": "abc"}),
             json.dumps({"text": "Hi.", "name": "f", "speaker": 3})]
    inp = tmp_path / "req.jsonl"
    inp.write_text("\n".join(lines) + "\n")
    out = tmp_path / "wavs"
    r = subprocess.run([EXE, "batch", str(inp), "--out-dir", str(out), "--model",
                        make_checkpoint("cv_proj"), "--speaker", "vivian", "--greedy",
                        "--max-new-tokens", "5", "--quiet", "--batch-size", "4",
                        "--format", "flac"],
                       capture_output=True, text=True, env=_env(), timeout=900)
    assert r.returncode == 1, r.stderr
    assert sorted(os.listdir(out)) == ["a.flac", "d.flac"]
    report = r.stdout + r.stderr
    for needle in ("line 2", "line 3: no text", "line 4", "unknown speaker", "line 6",
                   "line 7: seed must be an integer", "line 8: speaker must be a string",
                   "2 written", "6 failed"):
        assert needle in report, report
    assert "Traceback" not in report


def test_bad_names_are_reported_and_the_others_written(tmp_path, make_checkpoint):
    """A name that cannot be a file name is a bad line (its number reported), never a failed
    write that takes valid requests down with it; the counts are the files written."""
    names = ["a", "x\0y", "..", ".hidden", "x\\y", "two\nlines", "n" * 201, "b"]
    inp = tmp_path / "req.jsonl"
    inp.write_text("\n".join(json.dumps({"text": "Hello world.", "name": n}) for n in names))
    out = tmp_path / "wavs"
    r = subprocess.run([EXE, "batch", str(inp), "--out-dir", str(out), "--model",
                        make_checkpoint("cv_proj"), "--speaker", "vivian", "--greedy",
                        "--max-new-tokens", "5", "--quiet"],
                       capture_output=True, text=True, env=_env(), timeout=900)
    assert r.returncode == 1, r.stderr
    assert sorted(os.listdir(out)) == ["a.wav", "b.wav"]
    report = r.stdout + r.stderr
    for i in range(2, 8):
        assert f"line {i}: bad name" in report, report
    assert "2 written, 0 already there, 6 failed" in report, report
    assert "Traceback" not in report
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(out / "a.wav").st_mode & 0o777 == 0o666 & ~umask   # not mkstemp's 0600


def test_a_failing_write_fails_only_its_request(tmp_path, make_checkpoint):
    """`batch.run` given a name the OS refuses (no `read_requests` check): that request is
    reported failed, the others are written, in both batching modes."""
    from qwen3_tts_jax import Qwen3TTS, batch

    tts = Qwen3TTS.from_pretrained(make_checkpoint("cv_proj"))
    reqs = [batch.Request(line=i + 1, text="Hello world.", name=n, speaker="ryan")
            for i, n in enumerate(["a", "x\0y", "c"])]
    for continuous in (True, False):
        out = tmp_path / str(continuous)
        s = batch.run(tts, reqs, str(out), batch_size=2, progress=False, continuous=continuous,
                      gen={"max_new_tokens": 3, "do_sample": False, "subtalker_dosample": False})
        assert s["done"] == 2 and len(s["failed"]) == 1 and "line 2" in s["failed"][0], s
        assert sorted(os.listdir(out)) == ["a.wav", "c.wav"]


class _FakeTTS:
    """What `batch.run` reads of the model on the padded path (`_generate` is faked)."""
    model_parallel = 1


def _fake_generate(calls, raise_for=None, exc=None):
    """A stand-in for `batch._generate`: records each batch's texts, raises `exc` for a batch
    holding the text `raise_for` (every one, or the n-th with raise_for=("#", n)), else returns
    a short tone per request."""
    import numpy as np

    def generate(tts, chunk, gen, devices, limit, voice_of=None):
        calls.append([r.text for r in chunk])
        if raise_for == ("#", len(calls)) or any(r.text == raise_for for r in chunk):
            raise exc or RuntimeError("device lost")
        return [np.full(240 + 10 * r.line, 0.25, np.float32) for r in chunk], 24000, set()
    return generate


def _reqs(n):
    from qwen3_tts_jax import batch

    return [batch.Request(line=i + 1, text=f"Text {i:02d}.", name=f"r{i}") for i in range(n)]


def test_write_audio_fsyncs_the_file_before_the_rename_and_the_folder_after(tmp_path,
                                                                           monkeypatch):
    """A crash leaves the output whole or absent: the temp file's bytes are fsynced before the
    rename gives it the output's name, and the folder (the rename) after."""
    import stat

    from qwen3_tts_jax import audio

    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        st = os.fstat(fd)
        events.append(("fsync", "folder" if stat.S_ISDIR(st.st_mode) else st.st_ino))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.stat(src).st_ino, os.stat(src).st_size))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    out = tmp_path / "a.wav"
    audio.write_audio(str(out), [0.1] * 1000, 24000)
    ino, size = os.stat(out).st_ino, os.stat(out).st_size
    assert events == [("fsync", ino), ("replace", ino, size), ("fsync", "folder")], events
    assert os.listdir(tmp_path) == ["a.wav"]


@pytest.mark.parametrize("fmt", ["wav", "flac", "mp3", "opus", "ogg"])
def test_unfinished_accepts_whole_files_only(tmp_path, fmt):
    import numpy as np

    from qwen3_tts_jax import audio, batch

    if fmt not in audio.output_formats():
        pytest.skip(f"this libsndfile does not write {fmt}")
    f = tmp_path / f"a.{fmt}"
    audio.write_audio(str(f), (0.5 * np.sin(np.arange(24000) / 10)).astype(np.float32), 24000)
    assert batch.unfinished(str(f)) is None
    data = f.read_bytes()
    f.write_bytes(data[:len(data) // 2])               # cut short (a copy that stopped, ...)
    assert batch.unfinished(str(f)) is not None
    f.write_bytes(b"")
    assert "does not decode" in batch.unfinished(str(f))
    f.write_bytes(b"RIFF" + os.urandom(200))
    assert "does not decode" in batch.unfinished(str(f))


def test_resume_redoes_broken_outputs_and_removes_our_temp_files(tmp_path, monkeypatch, capsys):
    """On restart an existing output counts as finished only if it decodes whole: an empty, a
    garbage, a cut and a zero-frame file are generated again (one stderr line each), a whole file
    is kept as it is; temp files of our names (any format) are removed, other jobs' stay."""
    import tempfile

    import numpy as np
    import soundfile as sf

    from qwen3_tts_jax import audio, batch

    out = tmp_path / "wavs"
    out.mkdir()
    names = []                         # the temp file names write_audio really makes
    real_mkstemp = tempfile.mkstemp

    def mkstemp(*a, **k):
        fd, name = real_mkstemp(*a, **k)
        names.append(os.path.basename(name))
        return fd, name

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    audio.write_audio(str(out / "r0.wav"), np.full(2400, 0.25, np.float32), 24000)  # whole
    audio.write_audio(str(out / "r3.wav"), np.full(2400, 0.25, np.float32), 24000)
    (out / "r3.wav").write_bytes((out / "r3.wav").read_bytes()[:1000])             # cut
    (out / "r1.wav").write_bytes(b"")                                               # empty
    (out / "r2.wav").write_bytes(b"this is not a WAV file" * 10)                    # garbage
    sf.write(str(out / "r4.wav"), np.zeros(0, np.float32), 24000)                   # 0 frames
    assert sf.info(str(out / "r4.wav")).frames == 0
    stale = [names[0], ".r5.flac.k2j4x_0a.part", ".r6.wav.zzzzzzzz.part"]
    for n in stale + [".other.wav.abcdefgh.part", ".r5.wav.notes", "r7.wav.part"]:
        (out / n).write_bytes(b"partial")
    kept = os.stat(out / "r0.wav").st_mtime_ns
    calls = []
    monkeypatch.setattr(batch, "_generate", _fake_generate(calls))
    s = batch.run(_FakeTTS(), _reqs(8), str(out), batch_size=8, progress=False,
                  continuous=False)
    assert calls == [[f"Text {i:02d}." for i in range(1, 8)]], calls     # r0 not generated
    assert s["done"] == 7 and s["skipped"] == 1 and not s["failed"], s
    assert s["redone"] == ["r1", "r2", "r3", "r4"], s
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 4 and all("again" in line for line in err), err
    for i, why in [(1, "does not decode"), (2, "does not decode"), (3, "cut short"),
                   (4, "no audio")]:
        assert any(f"r{i}.wav again: it " in line and why in line for line in err), (i, err)
    assert os.stat(out / "r0.wav").st_mtime_ns == kept
    assert sorted(os.listdir(out)) == sorted(
        [".other.wav.abcdefgh.part", ".r5.wav.notes", "r7.wav.part"]
        + [f"r{i}.wav" for i in range(8)])
    for i in range(8):
        assert batch.unfinished(str(out / f"r{i}.wav")) is None
        assert sf.info(str(out / f"r{i}.wav")).frames == (2400 if i == 0 else 250 + 10 * i)


def test_a_failing_padded_batch_fails_only_its_own_requests(tmp_path, monkeypatch):
    """`--no-continuous-batching`: a runtime error in one padded batch does not end the run; that
    batch's requests are tried one by one (the one that fails alone is reported, with the
    error's type), and every other batch is written."""
    from qwen3_tts_jax import batch

    calls = []
    monkeypatch.setattr(batch, "_generate", _fake_generate(calls, raise_for="Text 03."))
    out = tmp_path / "wavs"
    s = batch.run(_FakeTTS(), _reqs(8), str(out), batch_size=2, progress=False,
                  continuous=False)
    assert s["failed"] == ["line 4 (r3): RuntimeError: device lost"], s
    assert s["done"] == 7, s
    assert calls[1:4] == [["Text 02.", "Text 03."], ["Text 02."], ["Text 03."]], calls
    assert sorted(os.listdir(out)) == [f"r{i}.wav" for i in range(8) if i != 3]
    # a device error that every try hits: each of the batch's requests fails, the rest written
    calls.clear()
    reqs = [batch.Request(line=i + 1, text=f"Text {10 + i}.", name=f"q{i}") for i in range(6)]
    bad = {"Text 12.", "Text 13."}

    def every_try(tts, chunk, gen, devices, limit, voice_of=None):
        if bad & {r.text for r in chunk}:
            raise MemoryError("out of device memory")
        return _fake_generate(calls)(tts, chunk, gen, devices, limit)

    monkeypatch.setattr(batch, "_generate", every_try)
    s = batch.run(_FakeTTS(), reqs, str(out), batch_size=2, progress=False, continuous=False)
    assert s["failed"] == ["line 3 (q2): MemoryError: out of device memory",
                           "line 4 (q3): MemoryError: out of device memory"], s
    assert s["done"] == 4
    assert sorted(f for f in os.listdir(out) if f.startswith("q")) == [
        "q0.wav", "q1.wav", "q4.wav", "q5.wav"]


def test_an_interrupt_mid_run_keeps_every_finished_output(tmp_path, monkeypatch):
    """Ctrl-C (KeyboardInterrupt) during the third padded batch ends the run; the two batches
    written before stay whole, nothing half-written is left, and a restart does the rest."""
    from qwen3_tts_jax import batch

    calls = []
    monkeypatch.setattr(batch, "_generate",
                        _fake_generate(calls, raise_for=("#", 3), exc=KeyboardInterrupt()))
    out = tmp_path / "wavs"
    with pytest.raises(KeyboardInterrupt):
        batch.run(_FakeTTS(), _reqs(8), str(out), batch_size=2, progress=False,
                  continuous=False)
    assert sorted(os.listdir(out)) == ["r0.wav", "r1.wav", "r2.wav", "r3.wav"]
    assert all(batch.unfinished(str(out / f)) is None for f in os.listdir(out))
    calls.clear()
    monkeypatch.setattr(batch, "_generate", _fake_generate(calls))
    s = batch.run(_FakeTTS(), _reqs(8), str(out), batch_size=2, progress=False,
                  continuous=False)
    assert s["done"] == 4 and s["skipped"] == 4 and not s["redone"], s
    assert calls == [["Text 04.", "Text 05."], ["Text 06.", "Text 07."]]


def _poison_continuous(monkeypatch, text):
    """Make the engine fail (a RuntimeError where the request starts: a new batch's prefill, or
    taking a free row of a running one) for the request with `text`; returns nothing."""
    from qwen3_tts_jax import batch, engine

    poisoned = []
    real_prompts, real_init, real_take = batch._prompts, engine.Cohort.__init__, engine.Cohort.take

    def prompts(tts, chunk, gen, voice_of):
        items, refs, seeds = real_prompts(tts, chunk, gen, voice_of)
        if chunk[0].text == text:
            poisoned.append(items[0])
        return items, refs, seeds

    def check(jobs):
        if any(j.prompt is p for j in jobs for p in poisoned):
            raise RuntimeError("device lost")

    def init(self, eng, jobs):
        check(jobs)
        real_init(self, eng, jobs)

    def take(self, job, row):
        check([job])
        real_take(self, job, row)

    monkeypatch.setattr(batch, "_prompts", prompts)
    monkeypatch.setattr(engine.Cohort, "__init__", init)
    monkeypatch.setattr(engine.Cohort, "take", take)


GEN3 = {"max_new_tokens": 3, "do_sample": False, "subtalker_dosample": False}


def test_continuous_batching_a_failing_request_fails_only_itself(tmp_path, monkeypatch,
                                                                 make_checkpoint):
    """Continuous batching (one row: every request starts alone): a request the engine fails
    is reported with its error, every other request is written."""
    from qwen3_tts_jax import Qwen3TTS, batch

    tts = Qwen3TTS.from_pretrained(make_checkpoint("cv_proj"))
    reqs = [batch.Request(line=i + 1, text=t, name=f"r{i}", speaker="ryan")
            for i, t in enumerate(["Hi.", "Hello there.", "Hello world.", "Good morning all."])]
    _poison_continuous(monkeypatch, "Hello there.")
    s = batch.run(tts, reqs, str(tmp_path), batch_size=1, progress=False, gen=GEN3)
    assert s["failed"] == ["line 2 (r1): RuntimeError: device lost"], s
    assert s["done"] == 3, s
    assert sorted(os.listdir(tmp_path)) == ["r0.wav", "r2.wav", "r3.wav"]


def test_continuous_batching_an_interrupt_keeps_every_finished_output(tmp_path, monkeypatch,
                                                                      make_checkpoint):
    """Ctrl-C (KeyboardInterrupt in the main thread, which waits while the engine's thread
    writes) after two requests were written: the run ends, the written files stay whole, no
    temp file is left, and a restart generates only the rest."""
    import threading

    from qwen3_tts_jax import Qwen3TTS, batch

    tts = Qwen3TTS.from_pretrained(make_checkpoint("cv_proj"))
    reqs = [batch.Request(line=i + 1, text=f"Sentence number {i}.", name=f"r{i}",
                          speaker="ryan") for i in range(12)]
    wavs = lambda: sorted(f for f in os.listdir(tmp_path) if f.endswith(".wav"))  # noqa: E731
    at_interrupt = []

    class Interrupting(threading.Event):
        def wait(self, timeout=None):
            if timeout is not None or threading.current_thread() is not threading.main_thread():
                return super().wait(timeout)
            while not super().wait(0.01):
                if len(wavs()) >= 2:
                    at_interrupt.extend(wavs())
                    raise KeyboardInterrupt
            return True

    monkeypatch.setattr(threading, "Event", Interrupting)
    with pytest.raises(KeyboardInterrupt):
        batch.run(tts, reqs, str(tmp_path), batch_size=1, progress=False, gen=GEN3)
    monkeypatch.undo()
    finished = wavs()
    assert 2 <= len(at_interrupt) and set(at_interrupt) <= set(finished), finished
    assert len(finished) < 12, "the run was not interrupted"
    assert all(f.endswith(".wav") for f in os.listdir(tmp_path)), os.listdir(tmp_path)
    assert all(batch.unfinished(str(tmp_path / f)) is None for f in finished)
    mtimes = {f: os.stat(tmp_path / f).st_mtime_ns for f in finished}
    s = batch.run(tts, reqs, str(tmp_path), batch_size=1, progress=False, gen=GEN3)
    assert s["done"] == 12 - len(finished) and s["skipped"] == len(finished), s
    assert not s["failed"] and not s["redone"], s
    assert wavs() == sorted(f"r{i}.wav" for i in range(12))
    assert {f: os.stat(tmp_path / f).st_mtime_ns for f in finished} == mtimes


def test_read_requests_bom_and_encoding(tmp_path):
    from qwen3_tts_jax import batch

    inp = tmp_path / "bom.jsonl"                     # Windows editors start UTF-8 with a BOM
    inp.write_bytes(b"\xef\xbb\xbf" + "\n".join(json.dumps({"text": f"T{i}", "name": f"n{i}"})
                                                 for i in range(2)).encode())
    reqs, problems = batch.read_requests(str(inp), {})
    assert [(r.name, r.text) for r in reqs] == [("n0", "T0"), ("n1", "T1")] and not problems
    inp.write_bytes(b"\xef\xbb\xbfline one\nline \xff two\n")
    try:
        batch.read_requests(str(inp), {})
        raise AssertionError("no error")
    except ValueError as e:
        assert str(inp) in str(e) and "offset 17" in str(e), e


@pytest.mark.parametrize("args,needle,rc", [
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0", 2),
    (["--batch-size", "0", "--no-continuous-batching"], "--batch-size must be >= 1", 2),
    (["--out-dir", "{tmp}/afile"], "exists and is not a folder", 2),
    (["{tmp}"], "is a folder, not a file", 2),
    (["{tmp}/empty.txt"], "no requests in", 1),
    (["{tmp}/latin1.txt"], "latin1.txt is not UTF-8 text: byte 0xe9 at offset 3", 2),
    # needs the checkpoint's defaults: after loading, but once, not once per line
    (["--top-p", "2"], "error: --top-p must be in (0, 1]", 2),
])
def test_bad_batch_arguments_fail_before_loading(tmp_path, args, needle, rc):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "lines.txt").write_text("Hello.\n")
    (tmp_path / "empty.txt").write_text("\n\n")
    (tmp_path / "latin1.txt").write_bytes("café\n".encode("latin-1"))
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    inp = [] if args[0].startswith("-") else [args.pop(0)]
    r = subprocess.run([EXE, "batch", *(inp or [str(tmp_path / "lines.txt")]), "--random-weights",
                        "--quiet", *args, *([] if "--out-dir" in args
                                            else ["--out-dir", str(tmp_path / "wavs")])],
                       capture_output=True, text=True, env=_env(), timeout=300)
    assert r.returncode == rc and needle in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert ("NOISE" in r.stderr) == ("--top-p" in args)     # the others fail before the model


def test_restart_after_kill_loses_and_redoes_nothing(tmp_path, make_checkpoint):
    inp = tmp_path / "lines.txt"
    inp.write_text("\n".join(f"Sentence number {i}." for i in range(40)) + "\n")
    out = tmp_path / "wavs"
    cmd = [EXE, "batch", str(inp), "--out-dir", str(out), "--model", make_checkpoint("cv_proj"),
           "--speaker", "ryan", "--greedy", "--max-new-tokens", "6", "--batch-size", "1",
           "--quiet"]
    p = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 600
    while time.time() < deadline and p.poll() is None:
        if out.exists() and len([f for f in os.listdir(out) if f.endswith(".wav")]) >= 2:
            break
        time.sleep(0.02)
    p.kill()
    p.wait()
    finished = {f: os.stat(out / f).st_mtime_ns for f in os.listdir(out) if f.endswith(".wav")}
    assert 2 <= len(finished) < 40, "the job was not interrupted mid-way"
    # a WAV being written when the kill came stays a hidden .part file, never a *.wav
    assert all(f.startswith(".line-") and f.endswith(".part")
               for f in os.listdir(out) if not f.endswith(".wav"))
    assert all(f.startswith("line-") for f in os.listdir(out) if f.endswith(".wav"))
    # a finished file cut short since (a copy that stopped, a disk that lost its tail) and a temp
    # file of ours: the restart generates the first again, saying so, and removes the second
    cut = min(finished)
    data = (out / cut).read_bytes()
    (out / cut).write_bytes(data[:len(data) // 2])
    del finished[cut]
    (out / ".line-00040.wav.abcd_123.part").write_bytes(b"partial")
    r = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=900)
    assert r.returncode == 0, r.stderr
    assert f"{40 - len(finished)} written, {len(finished)} already there" in r.stdout
    assert f"{out / cut} again: it is cut short" in r.stderr, r.stderr
    assert not [f for f in os.listdir(out) if not f.endswith(".wav")]
    wavs = sorted(f for f in os.listdir(out) if f.endswith(".wav"))
    assert wavs == [f"line-{i:05d}.wav" for i in range(1, 41)]
    for f, mtime in finished.items():                  # finished files were not redone
        assert os.stat(out / f).st_mtime_ns == mtime


SHARDED = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    from qwen3_tts_jax import Qwen3TTS, sampling
    from qwen3_tts_jax.options import Options
    assert len(jax.local_devices()) == 8, jax.local_devices()
    OPTS = Options.for_backend(specialize_sampler=True)   # the sampler kinds on
    assert not OPTS.cpu_kernels                           # several devices: XLA's ops
    assert sampling.SamplingParams.create(2, do_sample=False, options=OPTS).kind == "greedy"
    tts = Qwen3TTS.from_pretrained(sys.argv[1], options=OPTS)
    texts = ["Hello world.", "Hi.", "The quick brown fox.", "A", "Speak slowly.",
             "Numbers 0123.", "The lazy dog.", "Hello again.", "One more."]
    speakers = ["ryan", "vivian", "eric", "dylan", "serena", "aiden", "sohee", "uncle_fu", "ryan"]
    items = tts.custom_voice_prompts(texts, speakers, "auto", None, True)
    out = {}
    for name, kw in [("greedy", dict(do_sample=False, subtalker_dosample=False)),
                     ("sampled", dict(seed=list(range(9))))]:
        one = tts.generate_prompts_codes(items, max_new_tokens=12, **kw)
        eight = tts.generate_prompts_codes(items, pad_batch_to=8, max_new_tokens=12, **kw)
        out[name] = all(a.shape == b.shape and (a == b).all() for a, b in zip(one, eight))
        if name == "greedy":
            # Tensor parallel: weights split over 2 (x 4 data rows) and over all 8 devices.
            for m in (2, 8):
                tp = Qwen3TTS.from_pretrained(sys.argv[1], model_parallel=m, options=OPTS)
                qkv = tp.params["talker"]["layers"][0]["attn"].qkv
                assert len(qkv.sharding.device_set) == 8, qkv.sharding
                assert qkv.addressable_shards[0].data.shape[1] == qkv.shape[1] // m
                got = tp.generate_prompts_codes(items, max_new_tokens=12, **kw)
                out[f"tp{m}"] = all(a.shape == b.shape and (a == b).all()
                                    for a, b in zip(one, got))
            # int8 weights (quantize.py) split the same way: values and the widening products'
            # scales over "model", the same codes as the int8 model on one device
            q8 = Qwen3TTS.from_pretrained(sys.argv[1], quantize="int8", options=OPTS)
            want = q8.generate_prompts_codes(items, max_new_tokens=12, **kw)
            tp = Qwen3TTS.from_pretrained(sys.argv[1], model_parallel=2, quantize="int8",
                                          options=OPTS)
            qkv = tp.params["talker"]["layers"][0]["attn"].qkv
            assert qkv.values.addressable_shards[0].data.shape[1] == qkv.shape[1] // 2
            assert qkv.scale.addressable_shards[0].data.shape[0] == qkv.shape[1] // 2
            got = tp.generate_prompts_codes(items, max_new_tokens=12, **kw)
            out["tp2_int8"] = all(a.shape == b.shape and (a == b).all()
                                  for a, b in zip(want, got))
    print(json.dumps(out))
""")


def test_sharded_batch_equals_single_device(tmp_path, make_checkpoint):
    """With the sampler kinds of accelerators on (`Options.specialize_sampler`: greedy and
    top-k programs, their static kind carried through the sharded settings)."""
    script = tmp_path / "sharded.py"
    script.write_text(SHARDED)
    r = subprocess.run([sys.executable, str(script), make_checkpoint("cv_proj")],
                       capture_output=True, text=True, timeout=900,
                       env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=8"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout.strip().splitlines()[-1]) == {
        "greedy": True, "sampled": True, "tp2": True, "tp8": True, "tp2_int8": True}


def test_one_device_batch_refills_rows_and_equals_offline(tmp_path, make_checkpoint):
    """On one device the batch tool runs continuous batching (the server's engine): with EOS at
    different frames (a checkpoint whose EOS is likely), rows that ended take the next requests,
    and every WAV is the offline API's audio for the request's seed (16-bit rounding)."""
    import numpy as np
    import soundfile as sf

    from qwen3_tts_jax import Qwen3TTS, batch

    tts = Qwen3TTS.from_pretrained(make_checkpoint("cv_eos"))
    speakers = ["ryan", "vivian", "eric", "serena", "aiden"]
    reqs = [batch.Request(line=i + 1, text=f"Sentence number {i}, said once.", name=f"r{i}",
                          speaker=speakers[i % 5], language="english") for i in range(10)]
    summary = batch.run(tts, reqs, str(tmp_path), batch_size=4, gen={"max_new_tokens": 30},
                        progress=False)
    assert summary["done"] == 10 and not summary["failed"], summary
    assert summary["refilled"] >= 1, summary          # 10 requests through 4 rows
    lengths = set()
    for r in reqs:
        wave, sr = sf.read(str(tmp_path / f"{r.name}.wav"), dtype="float32")
        codes = tts.generate_custom_voice_codes(r.text, speaker=r.speaker, language="english",
                                                seed=[r.line], max_new_tokens=30)
        ref = tts.decode(codes)[0][0]
        lengths.add(len(ref))
        assert sr == 24000 and wave.shape == ref.shape, (r.name, wave.shape, ref.shape)
        np.testing.assert_allclose(wave, np.clip(ref, -1, 1), atol=2e-4 + 1e-4 * np.abs(ref).max(),
                                   err_msg=r.name)
    assert len(lengths) > 1, "every request had the same length: nothing to refill"


POOL = textwrap.dedent("""
    import json, sys
    import jax
    jax.config.update("jax_default_matmul_precision", "float32")
    import numpy as np
    import soundfile as sf
    from qwen3_tts_jax import Qwen3TTS, batch
    from qwen3_tts_jax.engine import EnginePool

    assert len(jax.local_devices()) == 8
    tts = Qwen3TTS.from_pretrained(sys.argv[1])
    speakers = ["ryan", "vivian", "eric", "serena", "aiden"]
    reqs = [batch.Request(line=i + 1, text=f"Sentence number {i}, said once.", name=f"r{i}",
                          speaker=speakers[i % 5], language="english") for i in range(24)]
    used = set()
    real_init = EnginePool.__init__

    def spy(self, *a, **k):
        real_init(self, *a, **k)
        for e in self.engines:
            run = e.submit
            e.submit = lambda job, run=run, e=e: (used.add(id(e)), run(job))[1]
    EnginePool.__init__ = spy
    summary = batch.run(tts, reqs, sys.argv[2], batch_size=2, gen={"max_new_tokens": 30},
                        progress=False)
    # padded batches split over a jax.sharding mesh of the 8 devices
    static = batch.run(tts, reqs, sys.argv[2] + "-static", batch_size=8,
                       gen={"max_new_tokens": 30}, progress=False, continuous=False)
    worst, lengths = 0.0, set()
    for r in reqs:
        codes = tts.generate_custom_voice_codes(r.text, speaker=r.speaker, language="english",
                                                seed=[r.line], max_new_tokens=30)
        ref = np.clip(tts.decode(codes)[0][0], -1, 1)
        lengths.add(len(ref))
        for out in (sys.argv[2], sys.argv[2] + "-static"):
            wave, sr = sf.read(f"{out}/{r.name}.wav", dtype="float32")
            assert wave.shape == ref.shape, (out, r.name, wave.shape, ref.shape)
            worst = max(worst, float(np.abs(wave - ref).max()
                                     / (2e-4 + 1e-4 * np.abs(ref).max())))
    print(json.dumps({"done": summary["done"], "failed": summary["failed"],
                      "refilled": summary["refilled"], "devices": len(used),
                      "static": [static["done"], static["failed"], static["refilled"]],
                      "lengths": len(lengths), "worst": worst}))
""")


def test_pool_over_8_devices_equals_offline(tmp_path, make_checkpoint):
    """On several devices the batch tool runs one continuous-batching engine per device
    (`EnginePool`): every device takes requests, rows refill, and every WAV is the one-device
    offline API's audio for the request's seed (16-bit rounding), whichever device made it; and
    so is every WAV of `continuous=False` (padded batches split over the 8-device mesh)."""
    script = tmp_path / "pool.py"
    script.write_text(POOL)
    r = subprocess.run([sys.executable, str(script), make_checkpoint("cv_eos"),
                        str(tmp_path / "wavs")], capture_output=True, text=True, timeout=900,
                       env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=8"))
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["done"] == 24 and not got["failed"], got
    assert got["devices"] == 8, got                   # every device generated some requests
    assert got["refilled"] >= 1, got                  # 24 requests through 8 x 2 rows
    assert got["lengths"] > 1, got                    # EOS at different frames
    assert got["static"] == [24, [], None], got
    assert got["worst"] <= 1.0, got                   # within 2e-4 + 1e-4 * peak of offline


def test_two_hosts_with_jax_distributed(tmp_path, make_checkpoint):
    """`--distributed` on two processes (two "hosts" on localhost, a coordinator given): each
    takes its share of the input from JAX's process index and count, and together they write
    every file once. Bad host settings fail before any work, naming the flag."""
    import socket

    inp = tmp_path / "lines.txt"
    inp.write_text("".join(f"Line number {i}.\n" for i in range(5)))
    out = tmp_path / "wavs"
    base = [EXE, "batch", str(inp), "--out-dir", str(out), "--model", make_checkpoint("cv_proj"),
            "--speaker", "ryan", "--greedy", "--max-new-tokens", "5", "--quiet"]
    for extra, needle in [(["--coordinator", "127.0.0.1:1"], "--coordinator needs --distributed"),
                          (["--num-hosts", "2", "--host-index", "2"], "--host-index must be"),
                          (["--distributed", "--coordinator", "127.0.0.1:1"],
                           "needs --num-hosts and --host-index")]:
        r = subprocess.run(base + extra, capture_output=True, text=True, env=_env(), timeout=300)
        assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr, r.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen(base + ["--distributed", "--coordinator", f"127.0.0.1:{port}",
                                      "--num-hosts", "2", "--host-index", str(i)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=_env()) for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert "3 written" in outs[0][0] and "2 written" in outs[1][0], outs   # lines 1,3,5 | 2,4
    assert sorted(os.listdir(out)) == [f"line-0000{i}.wav" for i in range(1, 6)]


@pytest.mark.parametrize("continuous", [True, False])
def test_base_lines_give_a_voice_file_or_a_reference(tmp_path, make_checkpoint, continuous):
    """A Base checkpoint's lines: a voice file, or `ref_audio` with `ref_text` (ICL) or
    `x_vector_only_mode` (each distinct reference encoded once); every WAV is the offline
    `generate_voice_clone` audio of the same voice and seed. Bad combinations are refused with
    their line number, and the other lines run."""
    import numpy as np
    import soundfile as sf

    from qwen3_tts_jax import Qwen3TTS, batch, save_voice
    from test_audio import write_speech

    tts = Qwen3TTS.from_pretrained(make_checkpoint("base"))
    ref = write_speech(tmp_path / "ref.wav", 16000)
    icl = tts.create_voice_clone_prompt(ref, ref_text="Hello world.")
    save_voice(icl, str(tmp_path / "me.voice"))
    lines = [{"text": "From the voice file.", "name": "file", "voice": str(tmp_path / "me.voice")},
             {"text": "From the reference.", "name": "icl", "ref_audio": ref,
              "ref_text": "Hello world."},
             {"text": "From its embedding.", "name": "xvec", "ref_audio": ref,
              "x_vector_only_mode": True},
             {"text": "The same reference again.", "name": "icl2", "ref_audio": ref,
              "ref_text": "Hello world."},
             {"text": "With silence after it.", "name": "tail", "ref_audio": ref,
              "ref_text": "Hello world.", "ref_tail_silence": 0.5},
             {"text": "Both.", "voice": str(tmp_path / "me.voice"), "ref_audio": ref},
             {"text": "No transcript.", "ref_audio": ref},
             {"text": "A stray transcript.", "ref_text": "Hello."},
             {"text": "Not a bool.", "ref_audio": ref, "x_vector_only_mode": "yes"},
             {"text": "Too much.", "ref_audio": ref, "ref_text": "Hi.", "ref_tail_silence": 9}]
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    reqs, problems = batch.read_requests(str(path), {})
    assert [r.name for r in reqs] == ["file", "icl", "xvec", "icl2", "tail"]
    assert [p.split(":")[0] for p in problems] == ["line 6", "line 7", "line 8", "line 9",
                                                   "line 10"]
    for words, p in zip(("not both", "needs its transcript", "ref_text goes with ref_audio",
                         "true or false", "ref_tail_silence must be seconds in [0, 5]"),
                        problems):
        assert words in p, p
    encoded = []
    original = tts.create_voice_clone_prompt

    def counting(*a, **kw):
        encoded.append(kw.get("x_vector_only_mode"))
        return original(*a, **kw)

    tts.create_voice_clone_prompt = counting
    out = tmp_path / "out"
    summary = batch.run(tts, reqs, str(out), batch_size=4, progress=False, continuous=continuous,
                        gen={"max_new_tokens": 12, "do_sample": False,
                             "subtalker_dosample": False})
    assert summary["done"] == 5 and not summary["failed"], summary
    assert sorted(encoded) == [False, False, True]   # icl and icl2 share one encoding
    voices = {"file": icl, "icl": icl, "icl2": icl,
              "xvec": original(ref, x_vector_only_mode=True),
              "tail": original(ref, ref_text="Hello world.", ref_tail_silence=0.5)}
    for r in reqs:
        wave, _ = sf.read(str(out / f"{r.name}.wav"), dtype="float32")
        want = tts.generate_voice_clone(r.text, voice_clone_prompt=voices[r.name], seed=[r.line],
                                        max_new_tokens=12, do_sample=False,
                                        subtalker_dosample=False)[0][0]
        assert wave.shape == want.shape, r.name
        np.testing.assert_allclose(wave, np.clip(want, -1, 1), atol=2e-4 + 1e-4 *
                                   np.abs(want).max(), err_msg=r.name)
    # a CustomVoice checkpoint refuses a reference, line by line
    cv = Qwen3TTS.from_pretrained(make_checkpoint("cv_proj"))
    bad = batch.run(cv, [batch.Request(line=1, text="Hi.", name="x", speaker="ryan",
                                       ref_audio=ref, ref_text="Hello.")],
                    str(tmp_path / "cv"), progress=False, continuous=continuous,
                    gen={"max_new_tokens": 4})
    assert bad["done"] == 0 and "needs a Base checkpoint" in bad["failed"][0], bad


SEGMENTED = "One sentence here. Another one there. And a third."


@pytest.mark.parametrize("continuous", [True, False])
def test_long_lines_in_segments(tmp_path, make_checkpoint, continuous):
    """`segment_chars`: a long line's segments run as requests of their own, and its file is the
    API's `segment_chars` audio for its seed (sampled: each segment's seed as the API's); a
    short line is as without segments."""
    import numpy as np
    import soundfile as sf

    from qwen3_tts_jax import Qwen3TTS, batch

    tts = Qwen3TTS.from_pretrained(make_checkpoint("cv_proj"))
    reqs = [batch.Request(line=1, text=SEGMENTED, name="long", speaker="ryan"),
            batch.Request(line=2, text="Short.", name="short", speaker="vivian", seed=5)]
    gen = {"max_new_tokens": 8, "do_sample": True, "subtalker_dosample": True}
    summary = batch.run(tts, reqs, str(tmp_path), batch_size=4, progress=False, gen=gen,
                        continuous=continuous, segment_chars=20, segment_pause=0.1)
    assert summary["done"] == 2 and not summary["failed"], summary
    for r, seed in zip(reqs, (1, 5)):
        wave, _ = sf.read(str(tmp_path / f"{r.name}.wav"), dtype="float32")
        want = tts.generate_custom_voice(r.text, r.speaker, segment_chars=20, segment_pause=0.1,
                                         seed=[seed], **gen)[0][0]
        assert wave.shape == want.shape, r.name
        np.testing.assert_allclose(wave, np.clip(want, -1, 1), atol=2e-4 + 1e-4 *
                                   np.abs(want).max(), err_msg=r.name)


def test_a_failing_segment_fails_its_line_once(tmp_path, monkeypatch, make_checkpoint):
    from qwen3_tts_jax import Qwen3TTS, batch

    tts = Qwen3TTS.from_pretrained(make_checkpoint("cv_proj"))
    reqs = [batch.Request(line=1, text=SEGMENTED, name="long", speaker="ryan"),
            batch.Request(line=2, text="Short.", name="short", speaker="vivian")]
    _poison_continuous(monkeypatch, "Another one there.")
    s = batch.run(tts, reqs, str(tmp_path), batch_size=2, progress=False, gen=GEN3,
                  segment_chars=20)
    assert s["failed"] == ["line 1 (long): segment 2 ('Another one there.'): RuntimeError: "
                           "device lost"], s
    assert s["done"] == 1 and sorted(os.listdir(tmp_path)) == ["short.wav"]
