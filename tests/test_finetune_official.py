"""Parity of the fine-tuning computation (qwen3_tts_jax.finetune) with the official recipe, float32 on
CPU, on the tiny random Base checkpoint.

The official training computation lives in QwenLM/Qwen3-TTS `finetuning/` (dataset.py, sft_12hz.py),
which is not part of the qwen-tts wheel. `OfficialSFT` below reproduces it on top of the official
model classes of qwen-tts 0.1.1 (places reproduced, each marked "official:" below):
  - `TTSDataset.__getitem__`: librosa.load(ref_audio, sr=None), the official `mel_spectrogram`,
    the official processor on the assistant prompt, [:, :-5];
  - `TTSDataset.collate_fn`: the dual-stream layout, written here token by token;
  - the loop body of sft_12hz.py: speaker_encoder(ref_mels).detach() at position 6, the summed
    codebook embeddings, `model.talker(...)`, `forward_sub_talker_finetune`, loss + 0.3 x sub loss,
    accelerate's gradient accumulation, clip_grad_norm_(1.0) and torch AdamW(lr, wd 0.01).
With the four fixes of docs/finetuning.md applied at the marked lines ("FIX n"), because without
them the official computation either crashes on this checkpoint (FIX 1: 48-wide text embedding vs
32-wide talker) or trains against the generation contract (FIX 2-4). Everything else is the
official code path (HF loss functions, official modules).
"""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from test_audio import write_speech

from official import Spec
from qwen3_tts_jax.finetune import data, export, train

TEXTS = ["Hello world. This is a tiny test.", "The quick brown fox jumps over the lazy dog.",
         "Hi.", "Speak slowly and calmly.", "Numbers 0123, 你好世界!", "The lazy dog."]


# ----------------------------------------------------------------------------- the official side

class OfficialSFT:
    """The official sft_12hz.py computation (with FIX 1-4) on an official Qwen3TTSModel."""

    def __init__(self, tts):
        self.tts = tts
        self.model = tts.model
        self.config = tts.model.config

    # official: TTSDataset.__getitem__
    def item(self, line: dict):
        import librosa
        from qwen_tts.core.models.modeling_qwen3_tts import mel_spectrogram

        prompt = f"<|im_start|>assistant\n{line['text']}<|im_end|>\n<|im_start|>assistant\n"
        ids = self.tts.processor(text=prompt, return_tensors="pt", padding=True)["input_ids"]
        ids = ids.unsqueeze(0) if ids.dim() == 1 else ids
        wav, sr = librosa.load(line["ref_audio"], sr=None, mono=True)
        assert sr == 24000
        mel = mel_spectrogram(torch.from_numpy(wav.astype(np.float32)).unsqueeze(0), n_fft=1024,
                              num_mels=128, sampling_rate=24000, hop_size=256, win_size=1024,
                              fmin=0, fmax=12000).transpose(1, 2)
        return {"text_ids": ids[:, :-5], "audio_codes": torch.tensor(line["audio_codes"]),
                "ref_mel": mel}

    # official: TTSDataset.collate_fn, one row as lists of (text id, codec id) pairs
    def collate(self, items):
        c, tc = self.config, self.config.talker_config
        rows = []
        for it in items:
            ids = it["text_ids"][0].tolist()
            codes = it["audio_codes"]
            F = codes.shape[0]
            text = ids[:3] + [c.tts_pad_token_id] * 4 + [c.tts_bos_token_id] + ids[3:] + \
                [c.tts_eos_token_id] + [c.tts_pad_token_id] * (F + 2)
            codec = [0, 0, 0, tc.codec_nothink_id, tc.codec_think_bos_id, tc.codec_think_eos_id,
                     0, tc.codec_pad_id] + [tc.codec_pad_id] * (len(ids) - 2) + \
                [tc.codec_bos_id] + codes[:, 0].tolist() + [tc.codec_eos_token_id]
            assert len(text) == len(codec) == len(ids) + F + 8
            rows.append((text, codec, codes))
        B, T = len(rows), max(len(r[0]) for r in rows)        # official: max(L + F) + 8
        out = {k: torch.zeros((B, T), dtype=torch.bool) for k in
               ("text_embedding_mask", "codec_embedding_mask", "codec_mask")}
        out["input_ids"] = torch.zeros((B, T, 2), dtype=torch.long)
        out["codec_ids"] = torch.zeros((B, T, 16), dtype=torch.long)
        out["attention_mask"] = torch.zeros((B, T), dtype=torch.long)
        out["codec_0_labels"] = torch.full((B, T), -100, dtype=torch.long)
        for i, (text, codec, codes) in enumerate(rows):
            n, F = len(text), codes.shape[0]
            s = n - F - 1                                     # first frame position
            out["input_ids"][i, :n, 0] = torch.tensor(text)
            out["input_ids"][i, :n, 1] = torch.tensor(codec)
            out["text_embedding_mask"][i, :n] = True
            out["codec_embedding_mask"][i, 3:n] = True
            out["codec_embedding_mask"][i, 6] = False
            out["codec_mask"][i, s:s + F] = True
            out["attention_mask"][i, :n] = 1
            out["codec_ids"][i, s:s + F] = codes
            out["codec_0_labels"][i, s:s + F] = codes[:, 0]
            out["codec_0_labels"][i, s + F] = tc.codec_eos_token_id
        out["ref_mels"] = torch.cat([it["ref_mel"] for it in items], dim=0)
        return out

    # official: the loop body of sft_12hz.py up to the loss
    def loss(self, batch):
        model = self.model
        input_ids, codec_ids = batch["input_ids"], batch["codec_ids"]
        text_mask = batch["text_embedding_mask"].unsqueeze(-1)
        codec_emb_mask = batch["codec_embedding_mask"].unsqueeze(-1)
        codec_mask = batch["codec_mask"]
        speaker = model.speaker_encoder(batch["ref_mels"].to(model.dtype)).detach()
        text_emb = model.talker.model.text_embedding(input_ids[:, :, 0])
        text_emb = model.talker.text_projection(text_emb) * text_mask          # FIX 1
        codec_emb = model.talker.model.codec_embedding(input_ids[:, :, 1]) * codec_emb_mask
        codec_emb[:, 6, :] = speaker
        x = text_emb + codec_emb
        for i in range(1, 16):
            emb = model.talker.code_predictor.get_input_embeddings()[i - 1](codec_ids[:, :, i])
            x = x + emb * codec_mask.unsqueeze(-1)
        out = model.talker(inputs_embeds=x, attention_mask=batch["attention_mask"],   # FIX 2
                           labels=batch["codec_0_labels"], output_hidden_states=True)
        hidden = out.hidden_states[0][-1]
        before_frame = torch.zeros_like(codec_mask)
        before_frame[:, :-1] = codec_mask[:, 1:]
        talker_hidden = hidden[before_frame]                                     # FIX 3
        frame_codes = codec_ids[codec_mask]
        logits, _ = model.talker.forward_sub_talker_finetune(frame_codes, talker_hidden)
        sub_loss = torch.nn.functional.cross_entropy(                            # FIX 4
            logits.reshape(-1, logits.shape[-1]).float(), frame_codes[:, 1:].reshape(-1))
        return out.loss + 0.3 * sub_loss, out.loss, sub_loss, speaker

    # official: the optimisation of sft_12hz.py (accelerate accumulation, clipping, AdamW)
    def train(self, batches, lr=2e-5, accum=4, epochs=1):
        from accelerate import Accelerator

        acc = Accelerator(gradient_accumulation_steps=accum, cpu=True)
        opt = torch.optim.AdamW(self.model.parameters(), lr=lr, weight_decay=0.01)
        loader = torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False)
        model, opt, loader = acc.prepare(self.model, opt, loader)
        model.train()
        losses = []
        for _ in range(epochs):
            for batch in loader:
                with acc.accumulate(model):
                    loss = self.loss(batch)[0]
                    acc.backward(loss)
                    if acc.sync_gradients:
                        acc.clip_grad_norm_(model.parameters(), 1.0)
                    opt.step()
                    opt.zero_grad()
                losses.append(float(loss))
        return losses


# ----------------------------------------------------------------------------- fixtures

# A 1.7B-like Base: the predictor narrower than the talker, so small_to_mtp_projection is a Linear
# (the shared "base" spec is 0.6B-like, where it is the identity).
BASE_PROJ = Spec(kind="base", size="1b7", hidden=32, cp_hidden=24, seed=5)


@pytest.fixture(scope="module")
def setup_for(make_checkpoint, tmp_path_factory, ckpt_root, codec_dir, text_tokenizer):
    """setup_for(name) -> (folder, official tts, ours (cfg, examples, params f32, x-vectors),
    the JSONL lines) for "base" or "base_proj"."""
    from official import build_checkpoint, load_official
    from qwen3_tts_jax import checkpoint
    from qwen3_tts_jax.config import load_config
    from qwen3_tts_jax.text import TextTokenizer

    tmp = tmp_path_factory.mktemp("ft_parity")
    refs = [write_speech(tmp / "ref0.wav", 24000), write_speech(tmp / "ref1.wav", 24000)]
    rng = np.random.default_rng(0)
    lines = [{"audio": "unused.wav", "text": t, "ref_audio": refs[0],
              "audio_codes": rng.integers(0, 2048, (int(rng.integers(3, 12)), 16)).tolist()}
             for t in TEXTS]
    path = tmp / "train.jsonl"
    path.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in lines))
    built = {}

    def get(name):
        if name not in built:
            folder = (make_checkpoint("base") if name == "base" else
                      build_checkpoint(str(ckpt_root / "ft_base_proj"), BASE_PROJ,
                                       codec_dir=codec_dir, tokenizer=text_tokenizer))
            cfg = load_config(folder)
            examples = data.load_examples(str(path), TextTokenizer.from_dir(folder))
            full = checkpoint.load_params(folder, cfg, jnp.float32)
            xv, problems = data.reference_xvectors(refs, full["speaker_encoder"],
                                                   cfg.speaker_encoder)
            assert not problems
            built[name] = dict(folder=folder, off=load_official(folder), cfg=cfg,
                               examples=examples, lines=lines, params=train.trainable(full), xv=xv)
        return built[name]

    return get


@pytest.fixture(scope="module")
def setup(setup_for):
    return setup_for("base")


_loss_grad = jax.jit(jax.value_and_grad(train.loss_fn, has_aux=True), static_argnames=("cfg",))


def ours_batch(s, idx, **shape):
    b = data.collate([s["examples"][i] for i in idx], s["cfg"], s["xv"])
    return {k: jnp.asarray(v) for k, v in data.pad_to(b, **shape).items()}


def as_official_tree(s, tree) -> dict[str, np.ndarray]:
    """A params-shaped tree (params or gradients) under the official keys, float32."""
    return export.official_tensors(s["folder"], tree)


# ----------------------------------------------------------------------------- tests

def test_batch_tensors_equal_official(setup):
    s = setup
    sft = OfficialSFT(s["off"])
    idx = [0, 1, 2]
    ref = sft.collate([sft.item(s["lines"][i]) for i in idx])
    ours = data.collate([s["examples"][i] for i in idx], s["cfg"], s["xv"])
    for k in data.OFFICIAL_KEYS:
        np.testing.assert_array_equal(ours[k], ref[k].numpy(), err_msg=k)
    # the x-vector the step puts at the speaker slot: ours from our mel + encoder
    with torch.no_grad():
        spk = s["off"].model.speaker_encoder(ref["ref_mels"]).numpy()
    np.testing.assert_allclose(ours["x_vectors"], spk, rtol=0, atol=1e-5 * np.abs(spk).max())


@pytest.mark.parametrize("name", ["base", "base_proj"])
def test_loss_and_gradients_match_official(setup_for, name):
    s = setup_for(name)
    sft = OfficialSFT(s["off"])
    idx = [0, 1, 2, 4]
    ref_batch = sft.collate([sft.item(s["lines"][i]) for i in idx])
    model = s["off"].model
    model.zero_grad()
    loss, t_loss, sub_loss, _ = sft.loss(ref_batch)
    loss.backward()
    ref_grads = {k: p.grad.detach().numpy() for k, p in model.named_parameters()
                 if p.grad is not None}
    model.zero_grad()

    batch = ours_batch(s, idx)
    (_, m), grads = _loss_grad(s["params"], batch, cfg=s["cfg"])
    for ours, ref in ((m["loss"], loss), (m["talker_loss"], t_loss),
                      (m["sub_talker_loss"], sub_loss)):
        assert abs(float(ours) - float(ref)) <= 1e-4 * abs(float(ref))
    g = as_official_tree(s, grads)
    assert set(g) == set(ref_grads)   # the same tensors get gradients (not the speaker encoder)
    worst = 0.0
    for k, ref in ref_grads.items():
        scale = np.abs(ref).max()
        if scale == 0:
            assert np.abs(g[k]).max() == 0, k
            continue
        worst = max(worst, np.abs(g[k] - ref).max() / scale)
    # Per tensor, max |ours - official| / max |official|. Measured ~1e-6 (float32 sums in another
    # order through 2 + 2 layers, 3072- and 2048-way softmaxes); 1e-4 leaves room for BLAS
    # differences and still catches any wrong index or mask (those give O(1) differences).
    assert worst < 1e-4, worst


def test_adamw_steps_match_official(setup):
    """6 micro-batches, accumulation 4 (one full group + the epoch's partial group, applied at the
    end like accelerate): the same losses and the same parameters after 2 AdamW steps; ours on
    batches padded in all three dimensions."""
    import copy

    from official import load_official

    s = setup
    off = load_official(s["folder"])
    sft = OfficialSFT(off)
    order = [[0, 1], [2, 3], [4, 5], [1, 2], [3, 4], [5, 0]]
    ref_batches = [sft.collate([sft.item(s["lines"][i]) for i in idx]) for idx in order]
    lr = 2e-5
    ref_losses = sft.train(ref_batches, lr=lr, accum=4)
    ref = {k: v.detach().numpy() for k, v in off.model.state_dict().items()
           if k.startswith("talker.")}

    params = copy.deepcopy(s["params"])
    start = as_official_tree(s, params)
    state = train.init_opt_state(train.make_optimizer(lr), params)
    step = train.make_train_step(s["cfg"], lr, accum_steps=4)
    losses, applied = [], []
    for n, idx in enumerate(order):
        # one compiled program; an empty padding row and padded positions and frames must
        # change nothing (the official batches are unpadded)
        batch = dict(ours_batch(s, idx, rows=3, length=48, frames=16),
                     flush=jnp.bool_(n == len(order) - 1))
        params, state, m = step(params, state, batch, jax.random.key(0))
        losses.append(float(m["loss"]))
        applied.append(bool(m["applied"]))
    assert applied == [False, False, False, True, False, True]
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-4)
    ours = as_official_tree(s, params)
    # Adam divides each update by sqrt(v), so where a gradient element is ~0 the float32 noise of
    # either side could decide its sign (up to 2 lr per step apart); measured, no element comes
    # near that: the worst is 0.3 % of lr x steps, the float32 rounding of weights near 1.0 (the
    # norms). Bound: every element within 5 % of lr x steps plus 2 float32 ulps of the weight.
    steps = 2
    for k, r in ref.items():
        diff = np.abs(ours[k] - r)
        assert np.all(diff <= 0.05 * lr * steps + 2.5e-7 * np.abs(r)), (k, diff.max())
    assert np.abs(ref["talker.codec_head.weight"] - start["talker.codec_head.weight"]).max() > lr
