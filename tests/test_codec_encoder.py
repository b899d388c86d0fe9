"""Parity of qwen3_tts_jax.codec.encoder (the speech tokenizer's Mimi encoder) with the official
code (qwen-tts 0.1.1 on transformers 4.57.3): `MimiModel._encode_frame` stage by stage (SEANet
encoder, encoder transformer, downsample, split RVQ), `Qwen3TTSTokenizerV2Model.encode` on single
items and zero-padded batches, and `Qwen3TTSTokenizer.encode` (input loading and resampling, feature
extractor padding, per-item trimming), on tiny random codecs of two shapes and speech-like audio,
all run through the shape buckets; config, loading and input errors; a full-size check marked slow.

Weights: the official init leaves the encoder codebooks at zero (every code would be 0), LayerScale
at 0.01 and attention weights at std 0.02 (the transformer would be invisible at 1e-4 tolerance).
`randomize_encoder_` draws random codebooks (a few rows below the 1e-5 usage clamp), O(1) LayerScale
and fan-in-scaled attention/MLP weights; the convolutions keep their Kaiming init.

Codes are nearest-neighbour decisions: float32 rounding (~1e-6 relative) can flip a real near-tie.
`assert_same_codes` therefore accepts a differing code only where the official distances to both
candidates differ by < 1e-5 (relative) and reports the gaps; no such tie occurred on these inputs.
"""
from __future__ import annotations

import io
import os
import shutil
import subprocess
import time
import wave as wavelib

import numpy as np
import pytest
import torch
from official import CODEC_DECODER, CODEC_ENCODER, build_codec, codec_config
from safetensors.numpy import load_file, save_file

from qwen3_tts_jax.codec import encoder as E
from qwen3_tts_jax.codec import tokenizer as T
from qwen3_tts_jax.config import ConfigError
from qwen3_tts_jax.weights import CheckpointError, flatten, safetensors_files

SR = 24000
# shared/official/full_configs.py CODEC["encoder_config"]: the released speech tokenizer's values.
FULL_ENCODER = dict(
    sampling_rate=24000, frame_rate=12.5, audio_channels=1, hidden_size=512, num_filters=64,
    num_residual_layers=1, upsampling_ratios=[8, 6, 5, 4], kernel_size=7, last_kernel_size=3,
    residual_kernel_size=3, dilation_growth_rate=2, use_causal_conv=True, pad_mode="constant",
    compress=2, codebook_size=2048, codebook_dim=256, num_quantizers=32,
    vector_quantization_hidden_dimension=256, num_semantic_quantizers=1, upsample_groups=512,
    num_hidden_layers=8, intermediate_size=2048, num_attention_heads=8, num_key_value_heads=8,
    head_dim=64, sliding_window=250, max_position_embeddings=8000, hidden_act="gelu",
    norm_eps=1e-5, rope_theta=10000, layer_scale_initial_scale=0.01)

ENCODERS = {
    # tests/official.py's tiny encoder: MHA, no quantizer input projection (its width = hidden).
    "tiny": CODEC_ENCODER,
    # GQA 6/2 with head_dim 10 (6 * 10 != hidden 48), 3 layers, a sliding_window of 4 frames (which
    # the official encoder ignores), other ratios (same 960 hop), kernels, dilation growth, two
    # resnet blocks per stage, compress 3; quantizer input projection 48 -> 24, 1024-entry
    # codebooks, 2 semantic + 18 acoustic quantizers (16 kept codes = 2 + 14).
    "gqa_proj": dict(
        CODEC_ENCODER, hidden_size=48, num_filters=6, num_residual_layers=2,
        upsampling_ratios=[6, 5, 4, 8], kernel_size=5, last_kernel_size=5, residual_kernel_size=5,
        dilation_growth_rate=3, compress=3, codebook_size=1024, codebook_dim=24,
        vector_quantization_hidden_dimension=24, num_quantizers=20, num_semantic_quantizers=2,
        upsample_groups=48, num_hidden_layers=3, intermediate_size=80, num_attention_heads=6,
        num_key_value_heads=2, head_dim=10, sliding_window=4, rope_theta=1000000, norm_eps=1e-6),
}
SMALL_USAGE_ROWS = 4        # codebook rows whose cluster_usage is below the 1e-5 clamp
TIE_GAP = 1e-5              # relative distance gap under which a differing code is a near-tie


# ----------------------------------------------------------------------------- audio

FORMANTS = np.array([[730, 1090, 2440], [270, 2290, 3010], [300, 870, 2240], [530, 1840, 2480],
                     [570, 840, 2410], [660, 1720, 2410]], float)   # a i u e o ae (Hz)


def speech_like(seconds: float, seed: int, peak: float = 0.8) -> np.ndarray:
    """Voiced syllables (a gliding f0 with harmonics shaped by moving vowel formants, a 4-5 Hz
    syllable envelope, short pauses) and fricative noise bursts, peaking at `peak`."""
    rng = np.random.default_rng(seed)
    n = int(seconds * SR)
    t = np.arange(n) / SR
    f0 = 135 + 35 * np.sin(2 * np.pi * 0.6 * t + rng.uniform(0, 6)) + 10 * np.sin(2 * np.pi * 3 * t)
    phase = 2 * np.pi * np.cumsum(f0) / SR
    knots = np.arange(0, seconds + 0.12, 0.12)
    formants = np.stack([np.interp(t, knots, FORMANTS[rng.integers(0, 6, len(knots)), j])
                         for j in range(3)])                              # (3, n)
    voiced = np.zeros(n)
    for k in range(1, 40):
        fk = k * f0
        amp = sum(np.exp(-0.5 * ((fk - formants[j]) / (60 + 40 * j)) ** 2) / (j + 1)
                  for j in range(3)) + 0.02
        voiced += np.where(fk < 0.45 * SR, amp, 0) * np.sin(k * phase)
    syllables = np.abs(np.sin(np.pi * 4.3 * t + rng.uniform(0, 3))) ** 0.7
    syllables *= np.interp(t, knots, rng.uniform(size=len(knots)) > 0.15)   # pauses
    x = voiced * syllables
    for start in rng.uniform(0, seconds - 0.15, max(1, int(seconds * 2))):
        a, b = int(start * SR), int((start + rng.uniform(0.04, 0.12)) * SR)
        burst = np.diff(rng.standard_normal(b - a + 1)) * np.hanning(b - a)
        x[a:b] += burst * np.abs(voiced).max() * 0.4
    return (x * peak / np.abs(x).max()).astype(np.float32)


def espeak(text: str, peak: float = 0.7) -> np.ndarray | None:
    """espeak-ng speech resampled from 22.05 to 24 kHz (soxr), or None without espeak-ng."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        return None
    import soxr
    out = subprocess.run([exe, "--stdout", "-s", "165", text], capture_output=True,
                         check=True).stdout
    with wavelib.open(io.BytesIO(out)) as w:
        sr = w.getframerate()
        x = np.frombuffer(w.readframes(w.getnframes()), np.int16).astype(np.float32) / 32768
    x = soxr.resample(x, sr, SR)
    return (x * peak / np.abs(x).max()).astype(np.float32)


# ----------------------------------------------------------------------------- official side

def randomize_encoder_(enc, seed: int):
    """Re-draw the official `Qwen3TTSTokenizerV2Encoder`'s codebooks, LayerScales, LayerNorms and
    transformer weights in place (see the module docstring); convolutions keep their init."""
    g = torch.Generator().manual_seed(seed)

    def randn(shape):
        return torch.randn(shape, generator=g)

    with torch.no_grad():
        for m in enc.encoder_transformer.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.copy_(randn(m.weight.shape) / m.in_features ** 0.5)
        for name, t in [*enc.named_parameters(), *enc.named_buffers()]:
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "cluster_usage":
                t.copy_(0.5 + torch.rand(t.shape, generator=g))
                t[:SMALL_USAGE_ROWS] = 1e-7
            elif leaf == "scale":
                t.copy_(0.5 + 0.1 * randn(t.shape))
            elif "layernorm" in name:
                t.copy_((1.0 if leaf == "weight" else 0.0) + 0.1 * randn(t.shape))
        # Codebook rows ~ N(0, s^2), s = the quantizer input's std on speech-like audio, so that
        # the nearest rows vary from frame to frame. The rows below the usage clamp are likely
        # picks (norm ~s/2) only when divided by the clamped 1e-5, not by their usage 1e-7.
        latents = official_stages(enc, speech_like(1.0, seed)[None])["downsample"]
        x = torch.from_numpy(latents).transpose(1, 2)
        for rvq in (enc.quantizer.semantic_residual_vector_quantizer,
                    enc.quantizer.acoustic_residual_vector_quantizer):
            s = float((rvq.input_proj(x) if rvq.input_proj is not None else x).std())
            for layer in rvq.layers:
                cb = layer.codebook
                D = cb.embed_sum.shape[1]
                cb.embed_sum.copy_(s * randn(cb.embed_sum.shape) * cb.cluster_usage[:, None])
                cb.embed_sum[:SMALL_USAGE_ROWS] = 0.5e-5 * s * randn((SMALL_USAGE_ROWS, D))
                cb._embed = None           # the cached codebook, computed from embed_sum


def official_stages(enc, wave_BxT) -> dict:
    """`MimiModel._encode_frame` (transformers 4.57.3) on a (B, T) array, each stage channels-last,
    under the names `encoder.encode_stages` uses; "codes" are the first 16 of the 32 codebooks."""
    x = torch.from_numpy(np.asarray(wave_BxT, np.float32))[:, None]
    with torch.no_grad():
        e = enc.encoder(x)
        t = enc.encoder_transformer(e.transpose(1, 2), return_dict=True).last_hidden_state
        d = enc.downsample(t.transpose(1, 2))
        codes = enc.quantizer.encode(d).permute(1, 2, 0)[..., :16]
    return {"encoder": e.transpose(1, 2).numpy(), "encoder_transformer": t.numpy(),
            "downsample": d.transpose(1, 2).numpy(), "codes": codes.numpy()}


def official_distances(enc, latents_TxD, codes_TxQ, t: int, q: int, candidates) -> np.ndarray:
    """Float64 distances of frame t's residual before codebook q (given the official codes before
    q) to the `candidates` rows of codebook q."""
    qz = enc.quantizer
    n_sem = qz.num_semantic_quantizers
    rvq, first = ((qz.semantic_residual_vector_quantizer, 0) if q < n_sem
                  else (qz.acoustic_residual_vector_quantizer, n_sem))
    x = torch.from_numpy(latents_TxD[t][None, :, None]).double()
    if rvq.input_proj is not None:
        x = torch.nn.functional.conv1d(x, rvq.input_proj.weight.double())
    r = x[0, :, 0]
    for i in range(first, q):
        r = r - rvq.layers[i - first].codebook.embed.double()[int(codes_TxQ[t, i])]
    embed = rvq.layers[q - first].codebook.embed.double()
    return torch.linalg.vector_norm(embed[list(candidates)] - r, dim=-1).numpy()


def assert_same_codes(ours_TxQ, ref_TxQ, enc, latents, what: str) -> None:
    """Identical codes, except near-ties: in a frame, the first differing codebook must be one whose
    two candidates are within TIE_GAP of each other (official distances from the official
    quantizer input `latents` (T, D), or a function returning it); later codebooks of that frame
    then legitimately differ (other residual). Fails with the gaps otherwise."""
    ours_TxQ, ref_TxQ = np.asarray(ours_TxQ), np.asarray(ref_TxQ)
    assert ours_TxQ.shape == ref_TxQ.shape, f"{what}: codes {ours_TxQ.shape} != {ref_TxQ.shape}"
    differ_T = (ours_TxQ != ref_TxQ).any(-1)
    if not differ_T.any():
        return
    latents_TxD = latents() if callable(latents) else latents
    gaps = []
    for t in np.flatnonzero(differ_T):
        q = int(np.flatnonzero(ours_TxQ[t] != ref_TxQ[t])[0])
        d_ref, d_ours = official_distances(enc, latents_TxD, ref_TxQ, t, q,
                                           (ref_TxQ[t, q], ours_TxQ[t, q]))
        gaps.append((int(t), q, float((d_ours - d_ref) / d_ref)))
    assert all(g < TIE_GAP for *_, g in gaps), (
        f"{what}: codes differ beyond near-ties (frame, codebook, relative distance gap): {gaps}")
    if gaps:
        print(f"{what}: near-ties (frame, codebook, relative gap): {gaps}")


def assert_close_to_peak(ours, ref, what, rel=1e-4):
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape} != official {ref.shape}"
    peak, err = np.abs(ref).max(), np.abs(ours - ref).max()
    assert err <= rel * peak, f"{what}: max|diff| {err:.3g} > {rel} * official peak {peak:.3g}"
    return err / peak


def build_parity_codec(path, encoder_config, seed=0):
    """The official codec (tiny decoder) saved at `path` with `randomize_encoder_` weights."""
    codec = build_codec(path, codec_config(encoder=encoder_config, decoder=CODEC_DECODER), seed)
    randomize_encoder_(codec.encoder, seed)
    codec.save_pretrained(path)
    return codec


@pytest.fixture(scope="module")
def parity_codec(tmp_path_factory):
    """parity_codec(name) -> (folder, official codec, our encoder params, EncoderConfig)."""
    built = {}

    def get(name):
        if name not in built:
            path = str(tmp_path_factory.mktemp(f"codec_{name}"))
            codec = build_parity_codec(path, ENCODERS[name], seed=list(ENCODERS).index(name) + 1)
            cfg = E.parse_encoder_config(ENCODERS[name])
            built[name] = (path, codec, E.load(safetensors_files(path), cfg), cfg)
        return built[name]

    return get


# ----------------------------------------------------------------------------- tests

# One padded batch for the parity tests: 31000 and 44900 samples are not whole 1920-sample frames
# and give an odd number of SEANet frames (33, 47: the downsample's replicate padding is used);
# 38400 is exactly 20 frames. All fit one shape bucket (24 frames), so the tests share two programs.
LENGTHS = (31000, 38400, 44900)


def parity_batch():
    """(waves, (B, W) zero-padded array, lengths, the (B, L) bucket buffer)."""
    waves = [speech_like(n / SR + 0.01, seed=20 + i)[:n] for i, n in enumerate(LENGTHS)]
    wave_BxW, lengths_B = E.pad_batch(waves)
    assert E.frame_bucket(-(-wave_BxW.shape[1] // 1920)) == 24    # what `encode` runs with
    buf = np.zeros((len(waves), 24 * 1920), np.float32)
    buf[:, :wave_BxW.shape[1]] = wave_BxW
    return waves, wave_BxW, lengths_B, buf


@pytest.mark.parametrize("name", list(ENCODERS))
def test_encode_stages_match_official_encode_frame(parity_codec, name):
    """`encode_stages` vs the official `MimiModel._encode_frame` stages (SEANet encoder, encoder
    transformer, downsample, split RVQ) on a zero-padded batch of width W = 44900, run inside a
    longer bucket buffer with widths W (the frames the official has must match exactly)."""
    _, codec, params, cfg = parity_codec(name)
    _, wave_BxW, _, buf = parity_batch()
    W = wave_BxW.shape[1]
    ref = official_stages(codec.encoder, wave_BxW)
    ours = E.jit_encode_stages(params, cfg, buf, np.full(len(buf), W, np.int32))
    for k in ("encoder", "encoder_transformer", "downsample"):
        n = ref[k].shape[1]
        err = assert_close_to_peak(ours[k][:, :n], ref[k], f"{name} {k}")
        print(f"{name} {k}: max|diff| / peak = {err:.2e} (peak {np.abs(ref[k]).max():.3g})")
    peak = np.abs(ref["encoder"]).max()
    change = np.abs(ref["encoder_transformer"] - ref["encoder"]).max() / peak
    assert change > 0.05, f"the transformer barely changes its input ({change:.3g}): weak test"
    for b in range(len(buf)):
        assert_same_codes(ours["codes"][b, :ref["codes"].shape[1]], ref["codes"][b], codec.encoder,
                          ref["downsample"][b], f"{name} item {b}")
    assert len(np.unique(ref["codes"][..., 0])) > 8, "degenerate codes: weak test"
    assert (ref["codes"] < SMALL_USAGE_ROWS).any(), "no clamped codebook row used: weak test"


@pytest.mark.parametrize("name", list(ENCODERS))
def test_encode_matches_official_model_encode(parity_codec, name):
    """`encoder.encode` (bucketed, jitted) vs the official `Qwen3TTSTokenizerV2Model.encode` on the
    zero-padded batch with its padding mask: identical codes, ceil(length / 1920) frames per item.
    And each item encoded alone by the official vs our jitted core at width = its own length, in
    the same bucket buffer: identical too. Only the last frame may depend on the batch."""
    _, codec, params, cfg = parity_codec(name)
    waves, wave_BxW, lengths_B, buf = parity_batch()
    mask = torch.from_numpy(np.arange(wave_BxW.shape[1])[None] < lengths_B[:, None]).long()
    with torch.no_grad():
        ref = codec.encode(torch.from_numpy(wave_BxW), mask, return_dict=True).audio_codes
        ref_alone = [codec.encode(torch.from_numpy(w)[None], torch.ones(1, len(w)).long(),
                                  return_dict=True).audio_codes[0] for w in waves]
    ours = E.encode(params, cfg, wave_BxW, lengths_B)
    alone = np.asarray(E.jit_encode_stages(params, cfg, buf, lengths_B.astype(np.int32))["codes"])
    for b, w in enumerate(waves):
        n = -(-len(w) // 1920)
        assert ours[b].dtype == np.int32 and ours[b].shape == (n, 16)
        assert_same_codes(ours[b], ref[b].numpy(), codec.encoder,
                          lambda b=b: official_stages(codec.encoder, wave_BxW)["downsample"][b],
                          f"{name} batch {b}")
        assert_same_codes(alone[b, :n], ref_alone[b].numpy(), codec.encoder,
                          lambda w=w: official_stages(codec.encoder, w[None])["downsample"][0],
                          f"{name} alone {b}")
        assert (alone[b, :n - 1] == ours[b][:-1]).all()
        print(f"{name} item {b} ({len(w)} samples): last frame the same alone and in the batch: "
              f"{(alone[b, n - 1] == ours[b][-1]).all()}")


def test_encode_audio_matches_official_tokenizer_encode(parity_codec, tmp_path):
    """`encode_audio` vs the official `Qwen3TTSTokenizer.encode(audios, sr)` (input loading, channel
    mean, librosa soxr_hq resampling, feature extractor padding and mask, model encode, per-item
    trimming), for numpy at 24 kHz (espeak-ng speech when installed), numpy at 16 kHz with a stereo
    item, and strings: a stereo 22.05 kHz wav path, a data:audio base64 URL, a 24 kHz flac path.
    Every batch lands in the parity batch's shape bucket, so no new program is compiled."""
    import base64

    import soundfile as sf
    from qwen_tts import Qwen3TTSTokenizer

    path, codec, params, cfg = parity_codec("tiny")
    said = espeak("Please call Stella.")          # ~1.4 s
    stereo_22k = np.stack([speech_like(1.6, 34), 0.5 * speech_like(1.6, 35)], -1)[:35000]
    sf.write(tmp_path / "a.wav", stereo_22k, 22050)
    buf = io.BytesIO()
    sf.write(buf, speech_like(1.4, 36), SR, format="WAV", subtype="FLOAT")
    sf.write(tmp_path / "c.flac", speech_like(1.7, 37), SR)
    cases = {
        "numpy 24 kHz": ([said[:45000] if said is not None else speech_like(1.5, 30),
                          speech_like(1.4, 31)[:33000],
                          speech_like(1.6, 32)[:37001]], SR),
        "numpy 16 kHz": ([speech_like(1.0, 33)[:16001],
                          np.stack([speech_like(1.2, 38), speech_like(1.2, 39)], -1)[:19000],
                          speech_like(1.0, 40)[:22000]], 16000),
        "strings": ([str(tmp_path / "a.wav"),
                     "data:audio/wav;base64," + base64.b64encode(buf.getvalue()).decode(),
                     str(tmp_path / "c.flac")], None),
    }
    tok = Qwen3TTSTokenizer.from_pretrained(path)
    for what, (audios, sr) in cases.items():
        ref = tok.encode(audios, sr=sr).audio_codes
        ours = T.encode_audio(params, cfg, audios, sr=sr)
        waves = T.prepare_audio(audios, sr, SR)
        wave_BxT, _ = E.pad_batch(waves)
        assert E.frame_bucket(-(-wave_BxT.shape[1] // 1920)) == 24
        for b in range(len(audios)):
            assert_same_codes(ours[b], ref[b].numpy(), codec.encoder,
                              lambda b=b: official_stages(codec.encoder, wave_BxT)["downsample"][b],
                              f"{what} item {b}")


SAVED_ENCODERS = {
    # frame_rate 12.5 over a 480-sample SEANet hop: a downsample kernel of 8, which a saved
    # config.json only gives through MimiConfig's "_frame_rate" key.
    "frame_rate_saved": dict(CODEC_ENCODER, upsampling_ratios=[10, 8, 6]),
    # a code frame every 3840 samples while encode_downsample_rate stays 1920: the official keeps
    # ceil(samples / 1920) frames of an array of ceil(samples / 3840).
    "frame_longer_than_rate": dict(CODEC_ENCODER, upsampling_ratios=[8, 8, 6, 5]),
    # an encoder at 16 kHz behind a 24 kHz feature extractor: audio is resampled to the latter;
    # and what no released codec changes but MimiModel reads: a tanh-GELU MLP, linear RoPE.
    "encoder_16k_act_rope": dict(CODEC_ENCODER, sampling_rate=16000, hidden_act="gelu_new",
                                 rope_scaling={"rope_type": "linear", "factor": 4.0}),
}


@pytest.mark.parametrize("name", list(SAVED_ENCODERS))
def test_saved_codec_folder_encodes_like_official(tmp_path, name):
    """Through the folder (config.json as save_pretrained writes it, preprocessor_config.json):
    `SpeechTokenizer.from_pretrained(path).encode` vs `Qwen3TTSTokenizer.encode`, a batch of
    three lengths (none a multiple of 1920) and one item alone."""
    from qwen_tts import Qwen3TTSTokenizer

    from qwen3_tts_jax.codec import SpeechTokenizer

    path = str(tmp_path)
    build_parity_codec(path, SAVED_ENCODERS[name], seed=11)
    tok, ours = Qwen3TTSTokenizer.from_pretrained(path), SpeechTokenizer.from_pretrained(path)
    waves = [speech_like(2.71, 41), speech_like(1.0, 42, peak=0.4)[:23000],
             speech_like(1.3, 43, peak=0.99)]
    for audios in (waves, waves[1:2]):
        ref = [c.numpy() for c in tok.encode(audios, sr=SR).audio_codes]
        got = ours.encode(audios, sr=SR)
        assert [c.shape for c in got] == [r.shape for r in ref], name
        for g, r in zip(got, ref):
            np.testing.assert_array_equal(g, r, err_msg=name)
        assert len({tuple(c[:, 1]) for c in got}) > 1 or len(got) == 1   # codes vary


def test_prepare_audio_errors():
    from qwen3_tts_jax.audio import AudioError

    with pytest.raises(ValueError, match="sampling rate"):
        T.prepare_audio(np.zeros(100, np.float32), None, SR)
    with pytest.raises(AudioError, match="does not exist"):
        T.prepare_audio("/no/such/file.wav", None, SR)
    with pytest.raises(ValueError, match="NaN"):
        T.prepare_audio(np.full(100, np.nan, np.float32), SR, SR)
    with pytest.raises(ValueError, match="empty"):
        T.prepare_audio([], SR, SR)
    x = np.random.default_rng(0).standard_normal(2001).astype(np.float32)
    assert [w.shape for w in T.prepare_audio([np.stack([x, x], -1), (x, 16000)], 24000, 24000)
            ] == [(2001,), (3002,)]


def test_parse_encoder_config():
    cfg = E.parse_encoder_config(FULL_ENCODER)
    assert cfg == E.parse_encoder_config({})   # the MimiConfig defaults are the released values
    assert (cfg.hop_length, cfg.frame_size, cfg.downsample_kernel) == (960, 1920, 4)
    assert cfg.head_dim == 64
    assert cfg.used_codebooks == (1, 15) and hash(cfg) == hash(E.parse_encoder_config(FULL_ENCODER))
    shapes = E.expected_shapes(cfg)
    assert len(shapes) == 225                       # shared/official/keys_codec.txt, encoder.*
    assert shapes["encoder.encoder.layers.14.conv.weight"] == (512, 1024, 3)
    assert shapes["encoder.encoder.layers.12.conv.weight"] == (1024, 512, 16)
    assert shapes["encoder.quantizer.acoustic_residual_vector_quantizer.layers.30.codebook."
                  "embed_sum"] == (2048, 256)
    assert E.parse_encoder_config(dict(hidden_size=64, num_attention_heads=4,
                                   num_key_value_heads=2)).head_dim == 16
    bad = [dict(use_conv_shortcut=True), dict(pad_mode="reflect"), dict(audio_channels=2),
           dict(frame_rate=25), dict(codebook_dim=128), dict(hidden_act="prelu"),
           dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
           dict(num_attention_heads=6), dict(num_semantic_quantizers=0)]
    for d in bad:
        with pytest.raises(ConfigError):
            E.parse_encoder_config(d)
    with pytest.raises(ConfigError, match="encoder_valid_num_quantizers"):
        E.parse_encoder_config({}, valid_num_quantizers=0)
    # More kept codes than codebooks: the official slice keeps all of them.
    assert E.parse_encoder_config({}, valid_num_quantizers=33).used_codebooks == (1, 31)


@pytest.mark.parametrize("over, match", [
    (dict(num_attention_heads=6, num_key_value_heads=6), "must divide hidden_size"),
    (dict(num_attention_heads=4, num_key_value_heads=3), "num_key_value_heads"),
    (dict(head_dim=7), "head_dim"),
    (dict(codebook_dim=16), "codebook_dim"),
    (dict(num_semantic_quantizers=0), "num_semantic_quantizers"),
    (dict(num_semantic_quantizers=32), "num_semantic_quantizers"),
])
def test_config_refuses_what_official_cannot_run(over, match):
    """Each of these makes the official encoder fail at construction or in `encode` (checked here
    too); we refuse it by field name when parsing the config."""
    from qwen_tts.core import Qwen3TTSTokenizerV2Config, Qwen3TTSTokenizerV2Model

    d = dict(CODEC_ENCODER, num_hidden_layers=1, **over)
    with pytest.raises((ValueError, RuntimeError)):
        codec = Qwen3TTSTokenizerV2Model(Qwen3TTSTokenizerV2Config(**codec_config(encoder=d)))
        with torch.no_grad():
            codec.eval().encode(torch.randn(1, 4000), torch.ones(1, 4000, dtype=torch.long))
    with pytest.raises(ConfigError, match=f"{match}.*official encoder cannot run it either"):
        E.parse_encoder_config(d)


def test_encoder_config_error_names_the_file(parity_codec, tmp_path):
    import json

    from qwen3_tts_jax.codec import SpeechTokenizer

    path, *_ = parity_codec("tiny")
    raw = json.load(open(os.path.join(path, "config.json")))
    raw["encoder_config"]["head_dim"] = 7
    (tmp_path / "config.json").write_text(json.dumps(raw))
    os.symlink(os.path.join(path, "model.safetensors"), tmp_path / "model.safetensors")
    with pytest.raises(ConfigError, match=f"{tmp_path / 'config.json'}: encoder_config head_dim"):
        SpeechTokenizer.from_pretrained(str(tmp_path))


def test_more_valid_quantizers_than_codebooks_encodes_like_official(tmp_path):
    """encoder_valid_num_quantizers (24) above the encoder's num_quantizers (20): the official
    keeps every code (its slice stops at 20); so do we, through the saved folder."""
    from qwen_tts import Qwen3TTSTokenizer

    from qwen3_tts_jax.codec import SpeechTokenizer

    path = str(tmp_path)
    enc = dict(CODEC_ENCODER, num_quantizers=20)
    codec = build_codec(path, dict(codec_config(encoder=enc, decoder=CODEC_DECODER),
                                   encoder_valid_num_quantizers=24), seed=12, audible=False)
    randomize_encoder_(codec.encoder, 12)
    codec.save_pretrained(path)
    wave = speech_like(1.3, 44)
    (ref,) = [c.numpy() for c in Qwen3TTSTokenizer.from_pretrained(path).encode(
        [wave], sr=SR).audio_codes]
    (got,) = SpeechTokenizer.from_pretrained(path).encode([wave], sr=SR)
    assert ref.shape == got.shape == (-(-len(wave) // 1920), 20)
    np.testing.assert_array_equal(got, ref)


def test_load_keeps_used_tensors_and_lists_bad_keys(parity_codec, tmp_path):
    path, _, params, cfg = parity_codec("gqa_proj")
    got = {k: tuple(v.shape) for k, v in flatten(params).items()}
    assert got == E.expected_params(cfg)
    assert len(params["quantizer"]["semantic"]["codebooks"]) == 2
    assert len(params["quantizer"]["acoustic"]["codebooks"]) == 14
    tensors = load_file(os.path.join(path, "model.safetensors"))
    del tensors["encoder.encoder_transformer.layers.1.mlp.fc2.weight"]
    tensors["encoder.downsample.conv.weight"] = tensors["encoder.downsample.conv.weight"][..., :3]
    tensors["encoder.extra.weight"] = np.zeros(2, np.float32)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError) as e:
        E.load([str(tmp_path / "model.safetensors")], cfg)
    msg = str(e.value)
    for key in ("layers.1.mlp.fc2.weight", "encoder.downsample.conv.weight", "encoder.extra"):
        assert key in msg


def test_encode_rejects_bad_arrays(parity_codec):
    _, _, params, cfg = parity_codec("tiny")
    with pytest.raises(ValueError, match="batch, samples"):
        E.encode(params, cfg, np.zeros(100, np.float32), [100])
    with pytest.raises(ValueError, match="valid samples"):
        E.encode(params, cfg, np.zeros((1, 100), np.float32), [101])


@pytest.mark.slow
def test_full_size_encoder_matches_official(tmp_path):
    """The released encoder shape (full_configs.CODEC, random weights) on 4 s of speech-like audio:
    stages within 1e-4 of the peak and identical codes to `Qwen3TTSTokenizerV2Model.encode`."""
    t0 = time.perf_counter()
    codec = build_parity_codec(str(tmp_path), FULL_ENCODER, seed=7)
    cfg = E.parse_encoder_config(FULL_ENCODER)
    params = E.load(safetensors_files(str(tmp_path)), cfg)
    t1 = time.perf_counter()
    wave = speech_like(4.0, 50)[None, :4 * SR - 333]
    ref = official_stages(codec.encoder, wave)
    with torch.no_grad():
        ref_codes = codec.encode(torch.from_numpy(wave), torch.ones(wave.shape).long(),
                                 return_dict=True).audio_codes[0].numpy()
    t2 = time.perf_counter()
    ours = E.jit_encode_stages(params, cfg, wave)
    for k in ("encoder", "encoder_transformer", "downsample"):
        err = assert_close_to_peak(ours[k], ref[k], f"full {k}")
        print(f"full {k}: max|diff| / peak = {err:.2e}")
    codes = E.encode(params, cfg, wave, [wave.shape[1]])[0]
    t3 = time.perf_counter()
    E.encode(params, cfg, wave, [wave.shape[1]])
    t4 = time.perf_counter()
    assert_same_codes(codes, ref_codes, codec.encoder, ref["downsample"][0], "full")
    assert_same_codes(ours["codes"][0], ref_codes, codec.encoder, ref["downsample"][0], "full")
    print(f"full size: build+load {t1 - t0:.1f} s, official {t2 - t1:.1f} s, ours stages+encode "
          f"(compiles) {t3 - t2:.1f} s, warm encode {t4 - t3:.2f} s")
