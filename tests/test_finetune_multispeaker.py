"""Multi-speaker fine-tuning and evaluation during training, on the tiny Base checkpoint: two
speakers (different espeak-ng voices as references) in one run, the official qwen-tts loads the
output and both speakers give the same greedy codes in ours and in the official; the x-vector
rule (float32 mean over a speaker's distinct references); balanced sampling; a CustomVoice start
keeps its speakers; the held-out loss, --best and the metrics log."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from official import GREEDY, official_codes
from test_finetune import say

from qwen3_tts_jax.finetune import data, export
from qwen3_tts_jax.finetune.train import balanced_order, epoch_order, finetune

TRAIN = dict(batch_size=2, lr=1e-3, epochs=2, accum_steps=1, seed=0, progress=False,
             log=lambda *a: None, fixed_shapes=True)


def _say(text, path, voice):
    import io
    import subprocess

    import soundfile as sf
    import soxr

    out = subprocess.run(["espeak-ng", "-v", voice, "-s", "170", "--stdout", text], check=True,
                         capture_output=True).stdout
    wave, sr = sf.read(io.BytesIO(out), dtype="float32")
    sf.write(path, soxr.resample(wave, sr, 24000), 24000, subtype="PCM_16")
    return path


@pytest.fixture(scope="module")
def run(make_checkpoint, tmp_path_factory):
    """Speaker "anna" (3 lines, two references; lines without a "speaker" key) and "Bob" (one
    line, another voice), 2 epochs, a held-out JSONL, --best."""
    import shutil

    from qwen3_tts_jax.codec import SpeechTokenizer

    if not shutil.which("espeak-ng"):
        pytest.skip("needs espeak-ng for two distinct voices")
    tmp = tmp_path_factory.mktemp("ms")
    folder = make_checkpoint("base")
    a1 = _say("My voice sounds like this.", str(tmp / "a1.wav"), "en-us+f3")
    a2 = _say("And sometimes like this, a little lower.", str(tmp / "a2.wav"), "en-us+f2")
    b = _say("I am somebody else entirely.", str(tmp / "b.wav"), "en-us+m3")
    texts = ["Hello world.", "The quick brown fox.", "Speak slowly.", "This is Bob.",
             "A held out line."]
    refs = [a1, a1, a2, b, a1]
    raw = [{"audio": say(t, str(tmp / f"u{i}.wav")), "text": t, "ref_audio": r}
           for i, (t, r) in enumerate(zip(texts, refs))]
    raw[3]["speaker"] = "Bob"
    (tmp / "raw.jsonl").write_text("".join(json.dumps(d) + "\n" for d in raw))
    data.prepare_data(SpeechTokenizer.from_pretrained(folder), str(tmp / "raw.jsonl"),
                      str(tmp / "all.jsonl"), progress=False)
    lines = open(tmp / "all.jsonl").read().splitlines(keepends=True)
    (tmp / "train.jsonl").write_text("".join(lines[:4]))
    (tmp / "eval.jsonl").write_text(lines[4])
    out = str(tmp / "run")
    res = finetune(folder, str(tmp / "train.jsonl"), out, "anna", eval_jsonl=str(tmp / "eval.jsonl"),
                   best=True, **TRAIN)
    return dict(res, tmp=tmp, folder=folder, out=out, refs=dict(a1=a1, a2=a2, b=b))


def test_both_speakers_in_the_official_layout_with_the_mean_xvector(run):
    from safetensors.numpy import load_file

    from qwen3_tts_jax import checkpoint
    from qwen3_tts_jax.config import load_config

    last = run["checkpoints"][-1]
    conf = json.load(open(os.path.join(last, "config.json")))
    assert conf["tts_model_type"] == "custom_voice"
    assert conf["talker_config"]["spk_id"] == {"anna": 3000, "bob": 3001} == run["speakers"]
    assert conf["talker_config"]["spk_is_dialect"] == {"anna": False, "bob": False}
    # the rule: float32 mean over the DISTINCT references (a1 is on two lines, counted once)
    cfg = load_config(run["folder"])
    enc = checkpoint.load_params(run["folder"], cfg)["speaker_encoder"]
    x, _ = data.reference_xvectors(list(run["refs"].values()), enc, cfg.speaker_encoder)
    a1, a2, b = (x[run["refs"][k]] for k in ("a1", "a2", "b"))
    emb = load_file(os.path.join(last, "model.safetensors"))["talker.model.codec_embedding.weight"]
    np.testing.assert_array_equal(emb[3000], np.mean(np.stack([a1, a2]), 0, dtype=np.float32))
    np.testing.assert_array_equal(emb[3001], b)
    assert np.abs(emb[3000] - b).max() > 1e-3        # two different voices


def test_both_speakers_same_greedy_codes_official_and_ours(run):
    import torch

    from official import load_official
    from qwen3_tts_jax import Qwen3TTS

    path = run["checkpoints"][-1]
    off, ours = load_official(path), Qwen3TTS.from_pretrained(path)
    assert sorted(ours.get_supported_speakers()) == ["anna", "bob"]
    assert sorted(s.lower() for s in off.get_supported_speakers()) == ["anna", "bob"]
    kw = dict(text=["Hello world.", "Speak slowly."], speaker=["anna", "Bob"],
              language=["auto", "english"], max_new_tokens=12)
    with torch.no_grad():
        ref = official_codes(off, "custom_voice", **kw, **GREEDY)
    got = ours.generate_custom_voice_codes(**kw, **GREEDY)
    assert len(got) == len(ref) == 2
    for g, r in zip(got, ref):
        np.testing.assert_array_equal(g, r)
    assert not np.array_equal(got[0][:4], got[1][:4]) or len(got[0]) != len(got[1])


def test_balanced_sampling():
    spk = ["a"] * 6 + ["b"] * 2
    for epoch in range(3):
        order = balanced_order(spk, 0, epoch)
        assert len(order) == 8
        picked = [spk[i] for i in order]
        assert picked.count("a") == picked.count("b") == 4         # b's 2 lines twice each
        assert sorted(order[np.array(picked) == "b"].tolist()) == [6, 6, 7, 7]
    np.testing.assert_array_equal(balanced_order(spk, 3, 1), balanced_order(spk, 3, 1))
    np.testing.assert_array_equal(balanced_order(["a"] * 5, 2, 1), epoch_order(5, 2, 1))


def test_eval_loss_best_checkpoint_and_metrics_log(run):
    from qwen3_tts_jax.finetune.plot import plot_metrics

    assert set(run["eval_losses"]) == {0, 1} and all(np.isfinite(list(run["eval_losses"].values())))
    recs = [json.loads(x) for x in open(os.path.join(run["out"], "metrics.jsonl"))]
    steps = [r for r in recs if r["event"] == "step"]
    evals = [r for r in recs if r["event"] == "eval"]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]            # 2 batches x 2 epochs, accum 1
    assert all({"loss", "grad_norm", "lr", "tokens_per_s", "frames_per_s"} <= set(r) for r in steps)
    assert [r["eval_loss"] for r in evals] == [run["eval_losses"][0], run["eval_losses"][1]]
    best = json.load(open(os.path.join(run["out"], "checkpoint-best", "best.json")))
    want = min(run["eval_losses"], key=run["eval_losses"].get)
    assert best["epoch"] == want == run["best_epoch"]
    a = open(os.path.join(run["out"], "checkpoint-best", "model.safetensors"), "rb").read()
    b = open(os.path.join(run["out"], f"checkpoint-epoch-{want}", "model.safetensors"), "rb").read()
    assert a == b
    png = plot_metrics(os.path.join(run["out"], "metrics.jsonl"), str(run["tmp"] / "loss.png"))
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_eval_loss_is_the_training_loss_on_the_same_data(run):
    """The held-out loss is the training objective: evaluating the training lines at the
    starting weights gives the first step's loss (batch of those same lines)."""
    from qwen3_tts_jax import checkpoint
    from qwen3_tts_jax.config import load_config
    from qwen3_tts_jax.finetune import train
    from qwen3_tts_jax.text import TextTokenizer

    folder = run["folder"]
    cfg = load_config(folder)
    ex = data.load_examples(str(run["tmp"] / "eval.jsonl"), TextTokenizer.from_dir(folder))
    params = checkpoint.load_params(folder, cfg)
    x, _ = data.reference_xvectors([e.ref_audio for e in ex], params["speaker_encoder"],
                                   cfg.speaker_encoder)
    batch = data.collate(ex, cfg, x)
    want, _ = train.loss_fn(train.trainable(params), batch, cfg)
    m = train._jitted_eval(cfg, np.dtype("float32"))(train.trainable(params), data.pad_to(batch))
    got = float(m["talker_sum"] / m["talker_count"]
                + 0.3 * m["sub_talker_sum"] / m["sub_talker_count"])
    np.testing.assert_allclose(got, float(want), rtol=1e-5)


def test_custom_voice_start_keeps_its_speakers(run, tmp_path):
    from safetensors.numpy import load_file

    cv = run["checkpoints"][-1]                      # anna + bob
    with pytest.raises(ValueError, match="is a custom_voice checkpoint.*--speaker-encoder"):
        export.check_init(cv, ["carl"])
    with pytest.raises(ValueError, match="already a speaker.*--replace-speaker"):
        export.check_init(cv, ["bob"], speaker_encoder=run["folder"])
    _, _, ids, enc = export.check_init(cv, ["Carl", "bob"], replace=True,
                                       speaker_encoder=run["folder"])
    assert ids == {"carl": 3002, "bob": 3001} and enc == run["folder"]
    # a run from the CustomVoice checkpoint adds "carl" (all lines), anna and bob stay
    jsonl = tmp_path / "carl.jsonl"
    lines = [dict(json.loads(x), speaker="carl") for x in open(run["tmp"] / "train.jsonl")]
    jsonl.write_text("".join(json.dumps(d) + "\n" for d in lines))
    res = finetune(cv, str(jsonl), str(tmp_path / "out"), None, speaker_encoder=run["folder"],
                   **dict(TRAIN, epochs=1))
    out = res["checkpoints"][-1]
    conf = json.load(open(os.path.join(out, "config.json")))
    assert conf["talker_config"]["spk_id"] == {"anna": 3000, "bob": 3001, "carl": 3002}
    before = load_file(os.path.join(cv, "model.safetensors"))["talker.model.codec_embedding.weight"]
    after = load_file(os.path.join(out, "model.safetensors"))["talker.model.codec_embedding.weight"]
    np.testing.assert_array_equal(after[3000:3002], before[3000:3002])
    assert not np.array_equal(after[3002], before[3002])


def test_eval_fraction_holds_out_lines_chosen_by_the_seed():
    from qwen3_tts_jax.finetune import train

    ex = list(range(10))
    tr, held = train._split(ex, 0.2, seed=0)
    assert len(held) == 2 and sorted(tr + held) == ex and not set(tr) & set(held)
    assert train._split(ex, 0.2, seed=0) == (tr, held) and train._split(ex, 0.2, seed=1) != (tr, held)
    with pytest.raises(ValueError, match="must leave examples on both sides"):
        train._split([1], 0.5, seed=0)
