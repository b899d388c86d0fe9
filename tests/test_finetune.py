"""Fine-tuning end to end on the tiny Base checkpoint: prepare-data on espeak-ng speech, a few
training steps (the loss goes down), the exported CustomVoice checkpoint loads in the official
qwen-tts and in ours with identical greedy codes for the new speaker, resume after a stop, and
every bad input fails before training. (The computation itself: test_finetune_official.py.)"""
from __future__ import annotations

import io
import json
import re
import os
import shutil
import subprocess

import numpy as np
import pytest
import soundfile as sf
import soxr

from official import GREEDY, official_codes
from test_audio import speech

from qwen3_tts_jax.cli import main
from qwen3_tts_jax.finetune import data, export
from qwen3_tts_jax.finetune.train import finetune

TEXTS = ["Hello world.", "The quick brown fox.", "Speak slowly and calmly.", "This is a tiny test."]
NAME = "tiny_voice"
TRAIN = dict(batch_size=2, lr=1e-3, epochs=3, accum_steps=1, seed=0, progress=False,
             log=lambda *a: None, fixed_shapes=True)


def say(text: str, path: str) -> str:
    """espeak-ng speech at 24 kHz (the fixed test_audio sentence without espeak-ng)."""
    if shutil.which("espeak-ng"):
        out = subprocess.run(["espeak-ng", "-v", "en-us+f3", "-s", "200", "--stdout", text],
                             check=True, capture_output=True).stdout
        wave, sr = sf.read(io.BytesIO(out), dtype="float32")
        wave = soxr.resample(wave, sr, 24000)
    else:
        wave = speech(24000)
    sf.write(path, wave, 24000, subtype="PCM_16")
    return path


@pytest.fixture(scope="module")
def prepared(make_checkpoint, tmp_path_factory):
    """A train_raw.jsonl (4 good lines + 2 bad), prepare-data's output and its exit code."""
    tmp = tmp_path_factory.mktemp("ft")
    folder = make_checkpoint("base")
    ref = say("My voice sounds like this.", str(tmp / "ref.wav"))
    lines = [{"audio": say(t, str(tmp / f"utt{i}.wav")), "text": t, "ref_audio": ref,
              "language": "English"} for i, t in enumerate(TEXTS)]
    raw = [json.dumps(d, ensure_ascii=False) for d in lines[:2]]
    raw += ['{"audio": "utt9.wav", "text": "no reference"}',                   # line 3
            json.dumps({"audio": str(tmp / "missing.wav"), "text": "x", "ref_audio": ref})]
    raw += [json.dumps(d, ensure_ascii=False) for d in lines[2:]]
    (tmp / "train_raw.jsonl").write_text("\n".join(raw) + "\n")
    out = tmp / "train_with_codes.jsonl"
    rc = main(["prepare-data", "--model", folder, "--input", str(tmp / "train_raw.jsonl"),
               "--output", str(out), "--batch-size", "3", "-q"])
    return dict(tmp=tmp, folder=folder, lines=lines, out=str(out), rc=rc, ref=ref)


@pytest.fixture(scope="module")
def trained(prepared):
    out = str(prepared["tmp"] / "run")
    res = finetune(prepared["folder"], prepared["out"], out, NAME, **TRAIN)
    return dict(res, output=out)


def test_prepare_data_official_format_and_codes(prepared, capsys):
    assert prepared["rc"] == 1                                   # two bad lines reported
    got = [json.loads(x) for x in open(prepared["out"], encoding="utf-8")]
    assert [g["text"] for g in got] == TEXTS
    for g, d in zip(got, prepared["lines"]):
        assert {k: g[k] for k in d} == d and set(g) == set(d) | {"audio_codes"}
    assert not os.path.exists(prepared["out"] + ".progress")
    # the official prepare_data.py: Qwen3TTSTokenizer.encode on the same batches of paths
    from qwen_tts import Qwen3TTSTokenizer

    tok = Qwen3TTSTokenizer.from_pretrained(os.path.join(prepared["folder"], "speech_tokenizer"))
    paths = [d["audio"] for d in prepared["lines"]]
    ref = [c.numpy() for batch in (paths[:2], paths[2:]) for c in tok.encode(batch).audio_codes]
    for g, r in zip(got, ref):
        np.testing.assert_array_equal(np.asarray(g["audio_codes"]), r)


def test_prepare_data_reports_bad_lines_and_resumes(prepared, tmp_path, capsys):
    from qwen3_tts_jax.codec import SpeechTokenizer

    tok = SpeechTokenizer.from_pretrained(prepared["folder"])
    src = prepared["tmp"] / "train_raw.jsonl"
    out = str(tmp_path / "codes.jsonl")
    # a run killed after its first batch: a partial file with one batch and the progress record
    first = data.prepare_data(tok, str(src), out, batch_size=2, progress=False)
    assert len(first["failed"]) == 2
    assert first["failed"][0] == ("line 3: missing field(s) ['ref_audio'] (each line needs "
                                  "['audio', 'text', 'ref_audio'])")
    assert first["failed"][1].startswith(f"line 4: audio {str(prepared['tmp'] / 'missing.wav')!r}")
    full = open(out, encoding="utf-8").read()
    head = full.splitlines(keepends=True)[0]
    os.replace(out, out + ".partial")
    with open(out + ".partial", "w", encoding="utf-8") as f:
        f.write(head + '{"half a line')
    data._write_json_atomic(out + ".progress", {"input_lines": 1, "bytes": len(head.encode())})
    again = data.prepare_data(tok, str(src), out, batch_size=2, progress=False)
    assert again["skipped_lines"] == 1 and again["written"] == 3
    assert open(out, encoding="utf-8").read() == full


def test_finetune_loss_goes_down(trained):
    losses = trained["losses"]
    assert len(losses) == 6 and all(np.isfinite(losses))
    assert np.mean(losses[-2:]) < np.mean(losses[:2]) - 0.3, losses    # measured: 9.97 -> 9.32


def test_exported_checkpoint_layout(trained, prepared):
    from safetensors.numpy import load_file

    ckpts = [os.path.join(trained["output"], f"checkpoint-epoch-{e}") for e in range(3)]
    assert trained["checkpoints"] == ckpts and all(os.path.isdir(c) for c in ckpts)
    last = ckpts[-1]
    conf = json.load(open(os.path.join(last, "config.json")))
    assert conf["tts_model_type"] == "custom_voice"
    assert conf["talker_config"]["spk_id"] == {NAME: 3000}
    assert conf["talker_config"]["spk_is_dialect"] == {NAME: False}
    w = load_file(os.path.join(last, "model.safetensors"))
    base = load_file(os.path.join(prepared["folder"], "model.safetensors"))
    assert set(w) == {k for k in base if k.startswith("talker.")}
    assert all(w[k].dtype == base[k].dtype and w[k].shape == base[k].shape for k in w)
    assert os.path.exists(os.path.join(last, "speech_tokenizer", "config.json"))
    assert os.path.exists(os.path.join(last, "generation_config.json"))


def test_export_keeps_a_bf16_base_in_bf16(trained, prepared, tmp_path):
    """Released Base checkpoints are bfloat16: the export writes each tensor in the Base file's
    dtype (f32 master weights rounded once), and both loaders' key checks accept it."""
    import ml_dtypes
    from safetensors.numpy import load_file, save_file

    from qwen3_tts_jax import checkpoint
    from qwen3_tts_jax.config import load_config

    base = tmp_path / "base_bf16"
    shutil.copytree(prepared["folder"], base)
    w = load_file(str(base / "model.safetensors"))
    save_file({k: v.astype(ml_dtypes.bfloat16) for k, v in w.items()},
              str(base / "model.safetensors"), metadata={"format": "pt"})
    out = export.export_checkpoint(str(base), str(tmp_path / "ckpt"), trained["params"],
                                   load_config(str(base)), NAME, np.ones(32, np.float32))
    got = load_file(os.path.join(out, "model.safetensors"))
    assert all(v.dtype == ml_dtypes.bfloat16 for v in got.values())
    assert np.all(got["talker.model.codec_embedding.weight"][3000].astype(np.float32) == 1.0)
    cfg = load_config(out)
    assert cfg.tts_model_type == "custom_voice" and cfg.speakers == {NAME: 3000}
    checkpoint.load_params(out, cfg)


def test_new_speaker_same_greedy_codes_official_and_ours(trained):
    import torch

    from official import load_official
    from qwen3_tts_jax import Qwen3TTS

    path = trained["checkpoints"][-1]
    off, ours = load_official(path), Qwen3TTS.from_pretrained(path)
    assert NAME in ours.get_supported_speakers()
    assert NAME in [s.lower() for s in off.get_supported_speakers()]
    # the x-vector sits at codec id 3000, where generate_custom_voice reads the speaker
    row = off.model.talker.model.codec_embedding.weight[3000].detach().numpy()
    assert np.abs(row).max() > 0
    kw = dict(text=["Hello world.", "Speak slowly."], speaker=[NAME, NAME],
              language=["auto", "english"], max_new_tokens=12)
    with torch.no_grad():
        ref = official_codes(off, "custom_voice", **kw, **GREEDY)
    got = ours.generate_custom_voice_codes(**kw, **GREEDY)
    assert len(got) == len(ref)
    for g, r in zip(got, ref):
        np.testing.assert_array_equal(g, r)


def test_resume_after_stop_gives_the_same_checkpoint(trained, prepared):
    from safetensors.numpy import load_file

    out = str(prepared["tmp"] / "resumed")
    first = finetune(prepared["folder"], prepared["out"], out, NAME, max_steps=3, save_every=1,
                     **TRAIN)
    assert first["steps"] == 3 and first["checkpoints"] == [os.path.join(out,
                                                                        "checkpoint-epoch-0")]
    rest = finetune(prepared["folder"], prepared["out"], out, NAME, **TRAIN)
    assert rest["steps"] == 3 and len(rest["checkpoints"]) == 2
    a = load_file(os.path.join(out, "checkpoint-epoch-2", "model.safetensors"))
    b = load_file(os.path.join(trained["output"], "checkpoint-epoch-2", "model.safetensors"))
    for k in b:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    with pytest.raises(ValueError, match="other settings"):
        finetune(prepared["folder"], prepared["out"], out, NAME, **dict(TRAIN, batch_size=1))


def test_killed_finetune_resumes_to_the_same_checkpoint(prepared):
    """SIGKILL the finetune command mid-run (after its first epochs), run the same command again:
    it resumes from OUTPUT/resume and its last checkpoint is bit-identical to an uninterrupted
    run's."""
    import signal
    import sys
    import time

    from safetensors.numpy import load_file

    code = "import sys; from qwen3_tts_jax.cli import main; sys.exit(main(sys.argv[1:]))"
    args = ["finetune", "--init-model", prepared["folder"], "--train-jsonl", prepared["out"],
            "--speaker-name", NAME, "--batch-size", "2", "--lr", "1e-3", "--epochs", "12",
            "--grad-accum", "1", "--save-every", "1", "--fixed-shapes", "--no-compile-cache",
            "-q"]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    cmd = lambda out: [sys.executable, "-c", code, *args, "--output", out]
    whole, killed = str(prepared["tmp"] / "whole"), str(prepared["tmp"] / "killed")
    r = subprocess.run(cmd(whole), env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]

    p = subprocess.Popen(cmd(killed), env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not os.path.exists(os.path.join(killed, "checkpoint-epoch-1")):
        assert p.poll() is None, "the run ended before the test could kill it"
        assert time.time() < deadline
        time.sleep(0.002)
    p.send_signal(signal.SIGKILL)
    p.wait()
    last = os.path.join("checkpoint-epoch-11", "model.safetensors")
    assert not os.path.exists(os.path.join(killed, last)), "killed too late to test anything"
    assert os.path.exists(os.path.join(killed, "resume", "state.npz"))

    r = subprocess.run(cmd(killed), env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    resumed = re.search(r"resuming from .*: epoch (\d+), batch (\d+)", r.stdout)
    assert resumed and resumed.groups() != ("0", "0"), r.stdout[-2000:]   # not a fresh start
    a, b = load_file(os.path.join(killed, last)), load_file(os.path.join(whole, last))
    assert a.keys() == b.keys()
    for k in b:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.slow   # ~40 s: a subprocess that compiles the 2-device program
def test_cli_data_parallel_on_two_devices_matches_one(trained, prepared):
    """The finetune command on 2 simulated CPU devices (the batch split over a "data" mesh): the
    same epoch-0 checkpoint as the single-device run, up to float32 reduction order."""
    import sys

    from safetensors.numpy import load_file

    out = str(prepared["tmp"] / "two_devices")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
               JAX_PLATFORMS="cpu")
    code = ("import sys, jax; jax.config.update('jax_default_matmul_precision', 'float32'); "
            "assert len(jax.local_devices()) == 2; from qwen3_tts_jax.cli import main; "
            "sys.exit(main(sys.argv[1:]))")
    args = ["finetune", "--init-model", prepared["folder"], "--train-jsonl", prepared["out"],
            "--output", out, "--speaker-name", NAME, "--batch-size", "2", "--lr", "1e-3",
            "--epochs", "1", "--grad-accum", "1", "--fixed-shapes", "--no-compile-cache", "-q"]
    r = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "checkpoint-epoch-0" in r.stdout
    a = load_file(os.path.join(out, "checkpoint-epoch-0", "model.safetensors"))
    b = load_file(os.path.join(trained["output"], "checkpoint-epoch-0", "model.safetensors"))
    for k in b:
        np.testing.assert_allclose(a[k], b[k], rtol=0, atol=1e-5, err_msg=k)


# ----------------------------------------------------------------------------- bad input

def _jsonl(path, lines):
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return str(path)


def test_bad_inputs_fail_before_training(prepared, make_checkpoint, tmp_path, capsys):
    folder = prepared["folder"]
    good = json.loads(open(prepared["out"]).readline())
    out = str(tmp_path / "out")

    def fails(match, jsonl=prepared["out"], model=folder, name=NAME):
        with pytest.raises(ValueError, match=match):
            finetune(model, jsonl, out, name, **TRAIN)
        assert not os.path.exists(out)                      # nothing was trained or written

    fails("is a custom_voice checkpoint", model=make_checkpoint("cv_proj"))
    fails("missing field", _jsonl(tmp_path / "a.jsonl", [good, {"text": "hi", "audio": "a.wav"}]))
    fails("line 2: empty text", _jsonl(tmp_path / "b.jsonl", [good, dict(good, text="  ")]))
    fails("line 1: not valid JSON", _jsonl(tmp_path / "c.jsonl", ["{oops", good]))
    fails("audio_codes must be", _jsonl(tmp_path / "d.jsonl", [dict(good, audio_codes=[[1, 2]])]))
    fails("nope.wav", _jsonl(tmp_path / "e.jsonl", [dict(good, ref_audio=str(tmp_path / "nope.wav"))]))
    fails("is a language name", name="English")
    fails("without spaces", name="my voice")
    # a Base config that already has a speaker of that name
    other = tmp_path / "base_with_speaker"
    shutil.copytree(folder, other)
    conf = json.load(open(other / "config.json"))
    conf["talker_config"]["spk_id"] = {"Tiny_Voice": 3001}
    (other / "config.json").write_text(json.dumps(conf))
    fails("already a speaker", model=str(other))
    # the CLI prints one line, no traceback
    rc = main(["finetune", "--init-model", folder, "--train-jsonl", prepared["out"], "--output",
               out, "--speaker-name", "english", "-q"])
    assert rc == 2 and "is a language name" in capsys.readouterr().err
