"""The `qwen3-tts-jax` console script, run in a subprocess like a user would."""
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

EXE = os.path.join(os.path.dirname(sys.executable), "qwen3-tts-jax")


def _sigint_as_in_a_terminal():
    """For a child that a test interrupts: SIGINT at its default action, as in a terminal, so
    that Python installs its KeyboardInterrupt handler even where this test process was started
    with SIGINT ignored (a shell's background job, `nohup ... &`), which a child inherits."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run(*args, cwd=None, stdin=None):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([EXE, *args], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=900, input=stdin)


def test_custom_voice_to_wav(tmp_path, make_checkpoint):
    out = tmp_path / "a.wav"
    r = run("custom-voice", "--model", make_checkpoint("cv_proj"), "--speaker", "ryan",
            "--language", "english", "--text", "Hello world.", "--greedy",
            "--max-new-tokens", "9", "--output", str(out), "--quiet")
    assert r.returncode == 0, r.stderr
    wave, sr = sf.read(str(out))
    assert sr == 24000 and wave.shape == (8 * 1920,) and np.isfinite(wave).all()
    assert "x real time" in r.stdout
    # the text from standard input: the same utterance
    r = run("custom-voice", "--model", make_checkpoint("cv_proj"), "--speaker", "ryan",
            "--language", "english", "--text-file", "-", "--greedy", "--max-new-tokens", "9",
            "--output", str(tmp_path / "b.wav"), "--quiet", stdin="\ufeffHello world.\n")
    assert r.returncode == 0, r.stderr
    assert np.array_equal(sf.read(str(tmp_path / "b.wav"))[0], wave)


def test_long_text_in_segments(tmp_path, make_checkpoint):
    """--segment-chars: the API's `segment_chars` audio (three sentences, three segments)."""
    from qwen3_tts_jax import Qwen3TTS

    text = "One sentence here. Another one there. And a third."
    out = tmp_path / "long.wav"
    r = run("custom-voice", "--model", make_checkpoint("cv_proj"), "--speaker", "ryan",
            "--text", text, "--greedy", "--max-new-tokens", "6", "--segment-chars", "20",
            "--segment-pause", "0.1", "--output", str(out), "--quiet")
    assert r.returncode == 0, r.stderr
    assert "(15 frames, 3 segments)" in r.stdout
    wave, sr = sf.read(str(out), dtype="float32")
    tts = Qwen3TTS.from_pretrained(make_checkpoint("cv_proj"))
    (want,), _ = tts.generate_custom_voice(text, "ryan", segment_chars=20, segment_pause=0.1,
                                           max_new_tokens=6, do_sample=False,
                                           subtalker_dosample=False)
    assert wave.shape == want.shape == (15 * 1920 + 2 * 2400,)
    np.testing.assert_allclose(wave, np.clip(want, -1, 1), atol=2 / 32768)


def test_random_weights_offline_demo(tmp_path):
    out = tmp_path / "demo.flac"                       # the extension picks the format
    r = run("custom-voice", "--random-weights", "--speaker", "vivian", "--text", "Hi.",
            "--seed", "0", "--max-new-tokens", "6", "--output", str(out), "--quiet")
    assert r.returncode == 0, r.stderr
    assert "NOISE" in r.stderr
    assert sf.info(str(out)).format == "FLAC"
    wave, sr = sf.read(str(out))
    assert sr == 24000 and len(wave) % 1920 == 0 and 0 < len(wave) <= 5 * 1920


def test_random_weights_builds_the_checkpoint_each_command_needs(tmp_path):
    """voice-design builds a VoiceDesign checkpoint, clone a Base one with a speaker encoder and
    a codec encoder (ICL); errors name the commands and flags, not the API's methods."""
    from qwen3_tts_jax import demo

    ref = tmp_path / "ref.wav"
    sf.write(str(ref), 0.3 * np.sin(np.arange(48000) / 24000 * 2 * np.pi * 220), 24000)
    for args in (["voice-design", "--instruct", "A calm voice."],
                 ["clone", "--ref-audio", str(ref), "--ref-text", "Hello there."]):
        out = tmp_path / f"{args[0]}.wav"
        r = run(*args, "--random-weights", "--text", "Hi.", "--seed", "0", "--max-new-tokens",
                "6", "--output", str(out), "--quiet")
        assert r.returncode == 0 and "NOISE" in r.stderr, r.stderr[-2000:]
        assert 0 < len(sf.read(str(out))[0]) <= 5 * 1920
    # the voice flags are checked before any model is built
    for args, needle in ((["voice-design"], 'voice-design needs --instruct "DESCRIPTION"'),
                         (["clone", "--ref-audio", str(ref)],
                          "--ref-audio needs --ref-text TRANSCRIPT (the words spoken in it), or "
                          "--x-vector-only")):
        r = run(*args, "--random-weights", "--text", "Hi.", "--output", str(out), "--quiet")
        assert r.returncode == 2 and needle in r.stderr and "NOISE" not in r.stderr, r.stderr
    # a checkpoint of another type: the command that fits it
    folder = demo.build(str(tmp_path / "vd"), kind="voice_design")
    r = run("custom-voice", "--model", folder, "--speaker", "ryan", "--text", "Hi.",
            "--output", str(out), "--quiet")
    assert r.returncode == 2 and (
        f"the custom-voice command needs a CustomVoice checkpoint, but --model {folder} is a "
        f"VoiceDesign checkpoint: use `qwen3-tts-jax voice-design --model {folder} --instruct"
        in r.stderr), r.stderr
    assert "generate_" not in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("args,needle", [
    (["--speaker", "bob", "--text", "Hi."], "unknown speaker"),
    (["--text", "Hi."], "custom-voice needs --speaker NAME; this checkpoint has: aiden, dylan"),
    (["--speaker", "ryan", "--language", "klingon", "--text", "Hi."], "unsupported language"),
    (["--speaker", "ryan", "--text", "   "], "empty"),
    (["--speaker", "ryan", "--text", "Hi.", "--output", "/nonexistent/dir/x.wav"], "does not exist"),
    # settings named as the flags that set them
    (["--speaker", "ryan", "--text", "Hi.", "--temperature", "0"],
     "--temperature must be > 0 when sampling (got 0.0); use --greedy"),
    (["--speaker", "ryan", "--text", "Hi.", "--max-new-tokens", "1"],
     "error: --max-new-tokens must be an integer in [2, "),
    (["--speaker", "ryan", "--text", "Hi.", "--subtalker-top-p", "1.5"],
     "error: --subtalker-top-p must be in (0, 1]"),
    (["--speaker", "ryan", "--text", "Hi.", "--output", "x.aiff"], "'.aiff' is not an audio"),
    (["--speaker", "ryan", "--text", "Hi.", "--output", "{tmp}"], "it is a folder"),
    # os.access says root may write to /proc: only a real try finds out before the model loads
    (["--speaker", "ryan", "--text", "Hi.", "--output", "/proc/x.wav"], "cannot write /proc/x"),
    (["--speaker", "ryan", "--text-file", "{tmp}/latin1.txt"], "not UTF-8 text: byte 0xe9 at "
                                                               "offset 3"),
    (["--speaker", "ryan", "--text-file", "{tmp}"], "it is a folder"),
    (["--speaker", "ryan", "--text", "Hi.", "--segment-chars", "0"],
     "error: --segment-chars must be an integer >= 1"),
    (["--speaker", "ryan", "--text", "Hi.", "--segment-pause", "0.5"],
     "--segment-pause needs --segment-chars N"),
    (["--speaker", "ryan", "--text", "Hi.", "--segment-chars", "9", "--segment-pause", "-1"],
     "error: --segment-pause must be a number of seconds in [0, 10]"),
])
def test_bad_input_is_a_clear_error(tmp_path, make_checkpoint, args, needle):
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if "--output" not in args:
        args = args + ["--output", str(tmp_path / "x.wav")]
    r = run("custom-voice", "--model", make_checkpoint("cv_proj"), "--quiet", *args)
    assert r.returncode == 2 and needle in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert not os.path.exists(tmp_path / "x.wav")


def test_version():
    r = run("--version")
    assert r.returncode == 0 and r.stdout.startswith("qwen3-tts-jax 0."), r.stdout


def test_list_speakers(make_checkpoint):
    r = run("custom-voice", "--model", make_checkpoint("cv_proj"), "--list-speakers")
    assert r.returncode == 0 and r.stdout.split() == sorted(
        ["serena", "vivian", "uncle_fu", "ryan", "aiden", "ono_anna", "sohee", "eric", "dylan"])


def test_weights_cache_flag(tmp_path, make_checkpoint):
    cache = tmp_path / "weights"
    for _ in range(2):      # writes the packed weights, then reads them
        r = run("custom-voice", "--model", make_checkpoint("cv_proj"), "--list-speakers",
                "--weights-cache", str(cache))
        assert r.returncode == 0 and "ryan" in r.stdout.split(), r.stderr
        assert len(os.listdir(cache)) == 1


def test_clone_saves_and_reuses_a_voice(tmp_path, make_checkpoint):
    from test_audio import write_speech

    ref = tmp_path / "ref.wav"
    write_speech(str(ref), 22050)
    voice, a, b = tmp_path / "me.voice", tmp_path / "a.wav", tmp_path / "b.wav"
    model = make_checkpoint("base")
    r = run("clone", "--model", model, "--ref-audio", str(ref), "--ref-text", "Hello world.",
            "--save-voice", str(voice), "--text", "Hi.", "--greedy", "--max-new-tokens", "6",
            "--output", str(a), "--quiet")
    assert r.returncode == 0, r.stderr
    r = run("clone", "--model", model, "--voice", str(voice), "--text", "Hi.", "--greedy",
            "--max-new-tokens", "6", "--output", str(b), "--quiet")
    assert r.returncode == 0, r.stderr
    wa, sr = sf.read(str(a))
    wb, _ = sf.read(str(b))
    assert sr == 24000 and len(wa) > 0 and np.array_equal(wa, wb)   # same voice, greedy
    r = run("clone", "--model", model, "--ref-audio", str(ref), "--text", "Hi.",
            "--output", str(tmp_path / "c.wav"), "--quiet")
    assert r.returncode == 2 and "--ref-text" in r.stderr and "Traceback" not in r.stderr
    padded = tmp_path / "padded.voice"
    r = run("clone", "--model", model, "--ref-audio", str(ref), "--ref-text", "Hello world.",
            "--ref-tail-silence", "0.5", "--save-voice", str(padded), "--text", "Hi.", "--greedy",
            "--max-new-tokens", "3", "--output", str(tmp_path / "d.wav"), "--quiet")
    assert r.returncode == 0, r.stderr
    from qwen3_tts_jax import load_voice

    assert len(load_voice(str(padded))[0].ref_code) > len(load_voice(str(voice))[0].ref_code) + 5
    r = run("clone", "--model", model, "--ref-audio", str(ref), "--ref-text", "Hello world.",
            "--ref-tail-silence", "9", "--text", "Hi.", "--output", str(tmp_path / "e.wav"),
            "--quiet")
    assert r.returncode == 2 and "ref_tail_silence" in r.stderr and "Traceback" not in r.stderr


def test_save_voice_to_a_missing_folder_fails_before_loading(tmp_path):
    r = run("clone", "--random-weights", "--ref-audio", "me.wav", "--ref-text", "Hi.",
            "--save-voice", str(tmp_path / "nodir" / "x.voice"), "--text", "Hi.",
            "--output", str(tmp_path / "x.wav"), "--quiet")
    assert r.returncode == 2 and "nodir does not exist" in r.stderr, r.stderr
    assert "NOISE" not in r.stderr                     # refused before building the demo model


def test_ctrl_c_is_a_short_message(tmp_path, make_checkpoint):
    """SIGINT mid-batch: exit 130 with one line, no traceback; the finished files stay."""
    import signal
    import time

    inp, out = tmp_path / "lines.txt", tmp_path / "wavs"
    inp.write_text("\n".join(f"Sentence number {i}." for i in range(40)) + "\n")
    p = subprocess.Popen([EXE, "batch", str(inp), "--out-dir", str(out), "--model",
                          make_checkpoint("cv_proj"), "--speaker", "ryan", "--greedy",
                          "--max-new-tokens", "6", "--batch-size", "1", "--quiet"],
                         env=dict(os.environ, JAX_PLATFORMS="cpu"), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True,
                         preexec_fn=_sigint_as_in_a_terminal)
    deadline = time.time() + 600
    while time.time() < deadline and p.poll() is None and not (
            out.exists() and any(f.endswith(".wav") for f in os.listdir(out))):
        time.sleep(0.02)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130 and "qwen3-tts-jax: interrupted" in err, err
    assert "Traceback" not in err
    assert any(f.endswith(".wav") for f in os.listdir(out))


@pytest.mark.parametrize("command", ["custom-voice", "batch"])
def test_ctrl_c_stops_a_running_program(tmp_path, make_checkpoint, command):
    """SIGINT while one compiled program runs (a long utterance; a padded batch with
    --no-continuous-batching) ends the process then, not when the program would end: the
    checkpoint's EOS is never chosen, so the program would run its 200000 frames (minutes)."""
    import signal
    import time

    model = make_checkpoint("cv_noeos")
    if command == "batch":
        (tmp_path / "lines.txt").write_text("One sentence.\nAnother sentence.\n")
        args = ["batch", str(tmp_path / "lines.txt"), "--out-dir", str(tmp_path / "wavs"),
                "--no-continuous-batching"]
    else:
        args = ["custom-voice", "--text", "One sentence.", "--output", str(tmp_path / "a.wav")]
    p = subprocess.Popen([EXE, *args, "--model", model, "--speaker", "ryan", "--greedy",
                          "--max-new-tokens", "200000", "--no-compile-cache"],
                         env=dict(os.environ, JAX_PLATFORMS="cpu"), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True,
                         preexec_fn=_sigint_as_in_a_terminal)
    try:
        time.sleep(40)       # loaded, compiled, generating (200000 frames take far longer)
        assert p.poll() is None, p.communicate()
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=15)    # the segment running now would take longer
    finally:
        p.kill()
    assert p.returncode == 130 and "qwen3-tts-jax: interrupted" in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "a.wav").exists()


def test_broken_codec_fails_before_generating(tmp_path, make_checkpoint):
    """A truncated speech_tokenizer/model.safetensors is named when the model loads, not after
    the utterance was generated."""
    import shutil

    model = tmp_path / "ckpt"
    shutil.copytree(make_checkpoint("cv_proj"), model)
    weights = model / "speech_tokenizer" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    r = run("custom-voice", "--model", str(model), "--speaker", "ryan", "--text", "Hi.",
            "--output", str(tmp_path / "x.wav"))
    assert r.returncode == 2 and f"cannot read {weights}" in r.stderr, r.stderr
    assert "generating" not in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("delay", [0.5, 1.0])
def test_ctrl_c_at_the_start_is_a_short_message(tmp_path, delay):
    """SIGINT while the command still imports JAX or builds the demo model: exit 130 with one
    line, no traceback, no file."""
    import signal
    import time

    p = subprocess.Popen([EXE, "custom-voice", "--random-weights", "--speaker", "ryan", "--text",
                          "Hi.", "--output", str(tmp_path / "a.wav")],
                         env=dict(os.environ, JAX_PLATFORMS="cpu"), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True,
                         preexec_fn=_sigint_as_in_a_terminal)
    time.sleep(delay)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130 and "qwen3-tts-jax: interrupted" in err, (p.returncode, err)
    assert "Traceback" not in err and not (tmp_path / "a.wav").exists()


def test_text_file_from_a_closed_or_empty_stdin(tmp_path):
    args = [EXE, "custom-voice", "--random-weights", "--speaker", "ryan", "--text-file", "-",
            "--output", str(tmp_path / "a.wav")]
    r = subprocess.run(args, capture_output=False, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert r.returncode == 2 and "--text-file has no text" in r.stderr, r.stderr
    r = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                       timeout=300, preexec_fn=lambda: os.close(0))
    assert r.returncode == 2 and "standard input is closed" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and "NOISE" not in r.stderr


def test_convert_command(tmp_path, make_checkpoint):
    """`qwen3-tts-jax convert SRC DST`: the fast-loading form, which the CLI then speaks with;
    bad input is one line naming the problem, before anything is written."""
    src = make_checkpoint("cv_proj")
    dst = tmp_path / "fast"
    r = run("convert", src, str(dst), "--dtype", "float32")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"converted {src} -> {dst} (float32)"
    assert (dst / "jax_params.safetensors").is_file() and not (dst / "model.safetensors").exists()
    assert (dst / "speech_tokenizer" / "params.safetensors").is_file()
    out = tmp_path / "a.wav"
    r = run("custom-voice", "--model", str(dst), "--speaker", "ryan", "--text", "Hi.", "--greedy",
            "--max-new-tokens", "4", "--output", str(out), "--quiet")
    assert r.returncode == 0 and sf.info(str(out)).frames > 0, r.stderr
    (tmp_path / "afile").write_text("x")
    (tmp_path / "empty").mkdir()
    broken = tmp_path / "broken"
    (broken / "speech_tokenizer").mkdir(parents=True)
    for name in os.listdir(src):
        if os.path.isfile(os.path.join(src, name)):
            (broken / name).write_bytes(open(os.path.join(src, name), "rb").read())
    (broken / "speech_tokenizer" / "config.json").write_text("{")
    for args, needle in [
            ([src, src], "is the source checkpoint"),
            ([src, str(tmp_path / "afile")], "is an existing file, not a folder"),
            ([src, str(tmp_path / "afile" / "out")], "cannot write DST"),
            ([str(tmp_path / "nope"), str(tmp_path / "out")], "'" + str(tmp_path / "nope")
             + "' does not exist"),
            ([str(tmp_path / "empty"), str(tmp_path / "out")], "has no config.json"),
            ([str(broken), str(tmp_path / "out")], "speech_tokenizer/config.json is not valid "
                                                   "JSON")]:
        r = run("convert", *args)
        assert r.returncode == 2, r
        assert r.stderr.startswith("qwen3-tts-jax convert: error: ") and needle in r.stderr, \
            r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
        assert not (tmp_path / "out").exists()          # nothing written for bad input
    r = run("--help")
    assert r.returncode == 0 and "convert" in r.stdout


def test_convert_is_not_installed_as_a_top_level_package():
    """The wheel holds qwen3_tts_jax only: the checkout's convert/ (`python -m convert`) is not
    installed into site-packages, where any other `convert` would clash with it."""
    pyprojecttoml = pytest.importorskip("setuptools.config.pyprojecttoml")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = pyprojecttoml.read_configuration(os.path.join(root, "pyproject.toml"))
    packages = cfg["tool"]["setuptools"]["packages"]       # the `find` directive, expanded
    assert "qwen3_tts_jax" in packages and "qwen3_tts_jax.server" in packages
    assert {p.split(".")[0] for p in packages} == {"qwen3_tts_jax"}, packages
    assert os.path.isfile(os.path.join(root, "convert", "__main__.py"))   # still in the checkout
