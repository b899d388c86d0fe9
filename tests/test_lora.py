"""LoRA fine-tuning on the tiny Base checkpoint: the loss falls with only the adapters trained;
the merge is exact in float32; the merged checkpoint (merge-adapter, official layout) gives the
same greedy codes as the base with the adapter merged at load, in ours and in the official;
unusable adapters are refused; a resumed LoRA run equals an uninterrupted one."""
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
                adapter=res["checkpoints"][-1])


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
