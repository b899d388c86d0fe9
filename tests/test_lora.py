"""LoRA fine-tuning on the tiny Base checkpoint: the loss falls with only the adapters and the
speaker rows trained; each line feeds its speaker's row; the rows move (no weight decay) and the
saved rows are the trained ones; the merge is exact in float32 and writes the trained rows; the
merged checkpoint (merge-adapter, official layout) gives the same greedy codes as the base with
the adapter merged at load, in ours and in the official; unusable adapters are refused; a resumed
LoRA run equals an uninterrupted one; --freeze-speaker-rows keeps the mean x-vectors."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from official import GREEDY, official_codes
from test_finetune import say

from qwen3_tts_jax import lora
from qwen3_tts_jax.cli import main
from qwen3_tts_jax.finetune.train import finetune

NAME = "lora_voice"
TRAIN = dict(batch_size=2, lr=5e-3, epochs=3, accum_steps=1, seed=0, progress=False,
             log=lambda *a: None, fixed_shapes=True, lora_rank=4, lora_alpha=8.0)


@pytest.fixture(scope="module")
def run(make_checkpoint, tmp_path_factory):
    from qwen3_tts_jax.codec import SpeechTokenizer
    from qwen3_tts_jax.finetune import data

    tmp = tmp_path_factory.mktemp("lora")
    folder = make_checkpoint("base")
    ref = say("My voice sounds like this.", str(tmp / "ref.wav"))
    texts = ["Hello world.", "The quick brown fox.", "Speak slowly and calmly.", "A tiny test."]
    raw = [{"audio": say(t, str(tmp / f"u{i}.wav")), "text": t, "ref_audio": ref}
           for i, t in enumerate(texts)]
    (tmp / "raw.jsonl").write_text("".join(json.dumps(d) + "\n" for d in raw))
    jsonl = str(tmp / "train.jsonl")
    data.prepare_data(SpeechTokenizer.from_pretrained(folder), str(tmp / "raw.jsonl"), jsonl,
                      progress=False)
    out = str(tmp / "run")
    res = finetune(folder, jsonl, out, NAME, **TRAIN)
    return dict(res, tmp=tmp, folder=folder, jsonl=jsonl, out=out,
                adapter=res["checkpoints"][-1], xvector=_mean_xvector(folder, jsonl))


def _mean_xvector(folder, jsonl):
    """The speaker's mean x-vector (data.speaker_xvectors): where its row starts."""
    from qwen3_tts_jax import checkpoint
    from qwen3_tts_jax.config import load_config
    from qwen3_tts_jax.finetune import data
    from qwen3_tts_jax.text import TextTokenizer

    cfg = load_config(folder)
    ex = data.load_examples(jsonl, TextTokenizer.from_dir(folder))
    enc = checkpoint.load_params(folder, cfg)["speaker_encoder"]
    xv, problems = data.reference_xvectors([e.ref_audio for e in ex], enc, cfg.speaker_encoder)
    assert not problems
    return data.speaker_xvectors(ex, xv, NAME)[NAME]


def test_lora_loss_falls_and_only_adapters_are_saved(run):
    from safetensors.numpy import load_file

    losses = run["losses"]
    assert len(losses) == 6 and np.mean(losses[-2:]) < np.mean(losses[:2]) - 0.3, losses
    conf = json.load(open(os.path.join(run["adapter"], lora.CONFIG_FILE)))
    assert conf["rank"] == 4 and conf["alpha"] == 8.0 and conf["speakers"] == {NAME: 3000}
    assert conf["targets"] == list(lora.TARGETS)
    assert conf["base_sha256"] == lora.base_hash(run["folder"])
    t = load_file(os.path.join(run["adapter"], lora.ADAPTER_FILE))
    # 2 talker + 2 predictor layers x 7 products x (A, B), and the speaker row
    assert len(t) == 4 * 7 * 2 + 1 and t["speaker_rows"].shape == (1, 32)
    assert all(k.endswith((".A", ".B")) for k in t if k != "speaker_rows")
    assert np.abs(t["talker.layers.0.q.B"]).max() > 0        # B starts at zero: it trained
    # the speaker row trained (it starts at the mean x-vector) and is saved as trained
    np.testing.assert_array_equal(t["speaker_rows"], np.asarray(run["params"]["speaker_rows"]))
    assert np.abs(t["speaker_rows"][0] - run["xvector"]).max() > 1e-3
    assert os.listdir(run["adapter"]) and not any(
        f.startswith("model") for f in os.listdir(run["adapter"]))


def _scaled_adapter(src, dst, factor):
    """A copy of the adapter at `src` with every B multiplied by `factor` (same base, same
    speakers): 0 gives the base model with the speaker rows only; a large factor makes the
    adapter's effect on greedy codes certain on this tiny model."""
    from safetensors.numpy import load_file, save_file

    shutil.copytree(src, dst)
    t = load_file(os.path.join(src, lora.ADAPTER_FILE))
    t = {k: (v * np.float32(factor) if k.endswith(".B") else v) for k, v in t.items()}
    save_file(t, os.path.join(dst, lora.ADAPTER_FILE))
    return str(dst)


@pytest.fixture(scope="module")
def merged(run):
    """merge-adapter of the trained adapter with its B scaled x30 (the trained one moves the
    greedy codes of this tiny model too little to tell a merge from none)."""
    amp = _scaled_adapter(run["adapter"], run["tmp"] / "amp", 30.0)
    out = str(run["tmp"] / "merged")
    assert main(["merge-adapter", run["folder"], amp, out]) == 0
    return dict(path=out, adapter=amp)


def test_merge_is_exact_in_f32(run, merged):
    """merged W (torch layout) = W + (alpha / rank) B @ A computed in float64, to f32 rounding."""
    from safetensors.numpy import load_file

    base = load_file(os.path.join(run["folder"], "model.safetensors"))
    got = load_file(os.path.join(merged["path"], "model.safetensors"))
    ad = load_file(os.path.join(merged["adapter"], lora.ADAPTER_FILE))
    names = {"talker": "talker.model.layers.{i}.", "code_predictor":
             "talker.code_predictor.model.layers.{i}."}
    official = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
                "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
                "down": "mlp.down_proj"}
    checked = 0
    for stack, prefix in names.items():
        for i in range(2):
            for t, key in official.items():
                k = prefix.format(i=i) + key + ".weight"
                A = ad[f"{stack}.layers.{i}.{t}.A"].astype(np.float64).T    # (r, in)
                B = ad[f"{stack}.layers.{i}.{t}.B"].astype(np.float64).T    # (out, r)
                want = base[k].astype(np.float64) + (8.0 / 4) * (B @ A)
                ulp = np.spacing(np.abs(want).astype(np.float32)).astype(np.float64)
                assert np.all(np.abs(got[k].astype(np.float64) - want) <= 0.5 * ulp * (1 + 1e-9)), k
                assert not np.array_equal(got[k], base[k]), k
                checked += 1
    assert checked == 28
    same = [k for k in base if k.startswith("talker.") and "layers" not in k
            and "codec_embedding.weight" not in k]
    assert same and all(np.array_equal(got[k], base[k]) for k in same)
    conf = json.load(open(os.path.join(merged["path"], "config.json")))
    assert conf["tts_model_type"] == "custom_voice" and conf["talker_config"]["spk_id"] == {NAME: 3000}
    # the speaker's codec embedding row is the trained row, not the x-vector it started from
    emb = got["talker.model.codec_embedding.weight"]
    np.testing.assert_array_equal(emb[3000], ad["speaker_rows"][0].astype(emb.dtype))
    np.testing.assert_array_equal(np.asarray(run["params"]["speaker_rows"][0]), ad["speaker_rows"][0])
    assert not np.array_equal(emb[3000], run["xvector"].astype(emb.dtype))


def test_merged_checkpoint_same_codes_as_adapter_at_load_and_official(run, merged):
    import torch

    from official import load_official
    from qwen3_tts_jax import Qwen3TTS

    at_load = Qwen3TTS.from_pretrained(run["folder"], adapters=[merged["adapter"]])
    ours = Qwen3TTS.from_pretrained(merged["path"])
    assert at_load.get_supported_speakers() == ours.get_supported_speakers() == [NAME]
    kw = dict(text=["Hello world.", "Speak slowly."], speaker=[NAME, NAME],
              language=["auto", "english"], max_new_tokens=12)
    a = at_load.generate_custom_voice_codes(**kw, **GREEDY)
    b = ours.generate_custom_voice_codes(**kw, **GREEDY)
    with torch.no_grad():
        ref = official_codes(load_official(merged["path"]), "custom_voice", **kw, **GREEDY)
    assert len(a) == len(b) == len(ref) == 2
    for x, y, r in zip(a, b, ref):
        np.testing.assert_array_equal(x, y)
        np.testing.assert_array_equal(y, r)
    # the adapter matters: the same speaker rows without it (B = 0) give other codes
    none = _scaled_adapter(run["adapter"], run["tmp"] / "zero", 0.0)
    c = Qwen3TTS.from_pretrained(run["folder"], adapters=[none]).generate_custom_voice_codes(
        **kw, **GREEDY)
    assert any(x.shape != z.shape or not np.array_equal(x, z) for x, z in zip(a, c))


def test_bad_adapters_are_refused(run, make_checkpoint, tmp_path, capsys):
    from qwen3_tts_jax import Qwen3TTS

    zero = tmp_path / "rank0"
    shutil.copytree(run["adapter"], zero)
    conf = json.load(open(zero / lora.CONFIG_FILE))
    (zero / lora.CONFIG_FILE).write_text(json.dumps(dict(conf, rank=0)))
    with pytest.raises(lora.AdapterError, match="rank 0 is not usable"):
        Qwen3TTS.from_pretrained(run["folder"], adapters=[str(zero)])
    other = make_checkpoint("cv_identity_0b6")
    with pytest.raises(lora.AdapterError, match="trained on another base checkpoint"):
        Qwen3TTS.from_pretrained(other, adapters=[run["adapter"]])
    rc = main(["merge-adapter", other, run["adapter"], str(tmp_path / "x")])
    assert rc == 2 and "another base checkpoint" in capsys.readouterr().err
    with pytest.raises(ValueError, match="rank must be >= 1"):
        finetune(run["folder"], run["jsonl"], str(tmp_path / "o"), NAME, **dict(TRAIN, lora_rank=0))
    assert not os.path.exists(tmp_path / "o")


def test_resumed_lora_run_equals_uninterrupted(run):
    from safetensors.numpy import load_file

    out = str(run["tmp"] / "resumed")
    first = finetune(run["folder"], run["jsonl"], out, NAME, max_steps=3, save_every=1, **TRAIN)
    assert first["steps"] == 3
    rest = finetune(run["folder"], run["jsonl"], out, NAME, **TRAIN)
    assert rest["steps"] == 3 and len(rest["checkpoints"]) == 2
    a = load_file(os.path.join(out, "checkpoint-epoch-2", lora.ADAPTER_FILE))
    b = load_file(os.path.join(run["adapter"], lora.ADAPTER_FILE))
    assert a.keys() == b.keys()
    for k in b:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    with pytest.raises(ValueError, match="other settings"):
        finetune(run["folder"], run["jsonl"], out, NAME, **dict(TRAIN, lora_rank=2))


def test_cli_adapter_flag(run, make_checkpoint, capsys):
    assert main(["custom-voice", "--model", run["folder"], "--adapter", run["adapter"],
                 "--list-speakers"]) == 0
    assert capsys.readouterr().out.split() == [NAME]
    with pytest.raises(SystemExit) as e:
        main(["custom-voice", "--model", make_checkpoint("cv_identity_0b6"), "--adapter",
              run["adapter"], "--list-speakers"])
    assert e.value.code == 2 and "another base checkpoint" in capsys.readouterr().err


def test_each_line_feeds_its_speakers_row(run):
    """Under LoRA the speaker slot holds speaker_rows[speaker_index]: the loss equals the one with
    those rows given as the lines' x-vectors, and a row's gradient comes from its own lines only."""
    import dataclasses

    import jax

    from qwen3_tts_jax import checkpoint
    from qwen3_tts_jax.config import load_config
    from qwen3_tts_jax.finetune import data, train
    from qwen3_tts_jax.text import TextTokenizer

    folder = run["folder"]
    cfg = load_config(folder)
    ex = data.load_examples(run["jsonl"], TextTokenizer.from_dir(folder))
    ex = [dataclasses.replace(e, speaker="bob" if i == 2 else e.speaker) for i, e in enumerate(ex)]
    params = checkpoint.load_params(folder, cfg)
    base = train.trainable(params)
    xv = {e.ref_audio: run["xvector"] for e in ex}
    rows = np.random.default_rng(0).normal(size=(3, 32)).astype(np.float32)  # row 2: no lines
    batch = data.collate(ex, cfg, xv, {NAME: 0, "bob": 1, "carl": 2}, NAME)
    np.testing.assert_array_equal(batch["speaker_index"], [0, 0, 1, 0])
    ad = train.lora_params(lora.init_adapters(params, 2, tuple(lora.TARGETS)), rows)

    def loss(p):
        return train.loss_fn(base, batch, cfg, lora_p=p, lora_scale=1.0)[0]

    got, grads = jax.value_and_grad(loss)(ad)
    want, _ = train.loss_fn(base, dict(batch, x_vectors=rows[[0, 0, 1, 0]]), cfg)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
    g = np.asarray(grads["speaker_rows"])
    assert np.abs(g[0]).max() > 0 and np.abs(g[1]).max() > 0 and not g[2].any()
    # without bob's line, bob's row has no gradient
    solo = data.collate(ex[:2], cfg, xv, {NAME: 0, "bob": 1, "carl": 2}, NAME)
    g = np.asarray(jax.grad(lambda p: train.loss_fn(base, solo, cfg, lora_p=p)[0])(ad)["speaker_rows"])
    assert np.abs(g[0]).max() > 0 and not g[1].any()


def test_speaker_rows_get_no_weight_decay():
    """AdamW's decoupled decay applies to the adapters (and every full fine-tuning param) but not
    to the speaker rows: with zero gradients only the decayed params move."""
    import jax.numpy as jnp
    import optax

    from qwen3_tts_jax.finetune import train

    opt = train.make_optimizer(lr=0.1, weight_decay=0.5)
    p = {"talker": {"w": jnp.ones((2, 2))}, "speaker_rows": jnp.ones((1, 2))}
    zero = {"talker": {"w": jnp.zeros((2, 2))}, "speaker_rows": jnp.zeros((1, 2))}
    upd, _ = opt.update(zero, opt.init(p), p)
    new = optax.apply_updates(p, upd)
    np.testing.assert_allclose(np.asarray(new["talker"]["w"]), 1 - 0.1 * 0.5, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(new["speaker_rows"]), 1.0)


def test_freeze_speaker_rows_keeps_the_mean_xvector(run, tmp_path, capsys):
    from safetensors.numpy import load_file

    with pytest.raises(ValueError, match="--lora runs only"):
        finetune(run["folder"], run["jsonl"], str(tmp_path / "full"), NAME,
                 **dict(TRAIN, lora_rank=None, freeze_speaker_rows=True))
    assert main(["finetune", "--init-model", run["folder"], "--train-jsonl", run["jsonl"],
                 "--output", str(tmp_path / "cli"), "--speaker-name", NAME,
                 "--freeze-speaker-rows"]) == 2
    assert "--lora runs only" in capsys.readouterr().err
    res = finetune(run["folder"], run["jsonl"], str(tmp_path / "frozen"), NAME,
                   **dict(TRAIN, epochs=1, freeze_speaker_rows=True))
    assert "speaker_rows" not in res["params"]
    t = load_file(os.path.join(res["checkpoints"][-1], lora.ADAPTER_FILE))
    np.testing.assert_array_equal(t["speaker_rows"], run["xvector"][None])
    assert np.abs(t["talker.layers.0.q.B"]).max() > 0
