"""speaker_encoder.py against the official code (float32, CPU):
  - `mel_filterbank` vs `librosa.filters.mel` (bit for bit);
  - `mel_spectrogram` vs the official `mel_spectrogram` (M:396-464);
  - each ECAPA-TDNN block vs the official `Qwen3TTSSpeakerEncoder` submodules;
  - `extract_xvector` vs the official `extract_speaker_embedding` (M:1940-1954) and vs the x-vector
    in the official `create_voice_clone_prompt` items (W:355-458: loading, librosa resampling, mel,
    encoder), on the tiny Base checkpoint and on encoders of other sizes, from espeak-ng speech
    recorded at 16, 22.05, 24 and 44.1 kHz (see test_audio.py);
  - the frame buckets: padded programs give the official numbers at every length, one compile each.
"""
import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen3_tts_jax import audio, speaker_encoder as se
from qwen3_tts_jax.config import SpeakerEncoderConfig, load_config
from qwen3_tts_jax.weights import CheckpointError
from test_audio import RATES, speech, write_speech

TOL = 1e-4

# Encoders besides the Base checkpoint's (channels 32/96, attention 16, SE 16, scale 8, enc_dim 32).
# "deep" has five SE-Res2Net blocks, an even kernel (asymmetric "same" padding: 1 left, 2 right)
# and a k3 dilated MFA.
SIZES = {
    "wide": dict(enc_dim=40, enc_channels=[48, 48, 48, 48, 144], enc_kernel_sizes=[5, 3, 3, 3, 1],
                 enc_dilations=[1, 2, 3, 4, 1], enc_attention_channels=24, enc_se_channels=12,
                 enc_res2net_scale=4),
    "deep": dict(enc_dim=24, enc_channels=[24] * 6 + [120], enc_kernel_sizes=[3, 4, 3, 5, 3, 3, 3],
                 enc_dilations=[1, 1, 3, 2, 2, 4, 2], enc_attention_channels=8, enc_se_channels=8,
                 enc_res2net_scale=2),
}


def official_mel(wave_24k):
    """The official mel as `extract_speaker_embedding` calls it -> (T, 128) numpy."""
    import torch
    from qwen_tts.core.models.modeling_qwen3_tts import mel_spectrogram

    return mel_spectrogram(torch.from_numpy(wave_24k).unsqueeze(0), n_fft=1024, num_mels=128,
                           sampling_rate=24000, hop_size=256, win_size=1024, fmin=0,
                           fmax=12000)[0].T.numpy()


def exact_mel(wave_24k):
    """The same mel in float64 numpy: what both float32 versions approximate."""
    x = np.pad(wave_24k.astype(np.float64), 384, mode="reflect")
    idx = np.arange(len(wave_24k) // 256)[:, None] * 256 + np.arange(1024)
    spec = np.fft.rfft(x[idx] * np.hanning(1025)[:-1])
    mag = np.sqrt(spec.real ** 2 + spec.imag ** 2 + 1e-9)
    return np.log(np.maximum(mag @ se.mel_filterbank().T.astype(np.float64), 1e-5))


def wave_24k(sr):
    """Speech recorded at `sr`, brought to 24 kHz by our resampler; asserted equal to librosa's, so
    the official and our pipelines see the same samples."""
    import librosa

    ours = audio.resample(speech(sr), sr, 24000)
    np.testing.assert_array_equal(ours, librosa.resample(speech(sr), orig_sr=sr, target_sr=24000))
    return ours


def build_official_encoder(folder, seed=0, **kw):
    """An official `Qwen3TTSSpeakerEncoder` with torch's default init and random biases, saved as
    `speaker_encoder.*` in folder/model.safetensors -> (module, our config)."""
    import torch
    from safetensors.torch import save_file
    from qwen_tts.core.models.configuration_qwen3_tts import Qwen3TTSSpeakerEncoderConfig
    from qwen_tts.core.models.modeling_qwen3_tts import Qwen3TTSSpeakerEncoder

    torch.manual_seed(seed)
    module = Qwen3TTSSpeakerEncoder(Qwen3TTSSpeakerEncoderConfig(**kw)).eval()
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape))
    os.makedirs(folder, exist_ok=True)
    save_file({f"speaker_encoder.{k}": v.contiguous() for k, v in module.state_dict().items()},
              os.path.join(folder, "model.safetensors"))
    cfg = SpeakerEncoderConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in kw.items()})
    return module, cfg


def official_xvector(module, wave):
    import torch

    with torch.no_grad():
        return module(torch.from_numpy(official_mel(wave))[None])[0].numpy()


def assert_close(ours, ref, tol=TOL):
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.shape == ref.shape and ours.dtype == np.float32
    err = np.abs(ours - ref).max()
    # Absolute, and relative to the vector's scale (the Base checkpoint's 0.02-std init makes
    # x-vectors small enough that the absolute bound alone would say little).
    assert err <= tol and err <= tol * np.abs(ref).max(), (err, np.abs(ref).max())


@pytest.fixture(scope="module")
def base(make_checkpoint):
    """(official Qwen3TTSModel wrapper, our params, our config, folder): tiny Base checkpoint."""
    from official import load_official

    folder = make_checkpoint("base")
    cfg = load_config(folder).speaker_encoder
    return load_official(folder), se.load_params(folder, cfg), cfg, folder


@pytest.fixture(scope="module", params=sorted(SIZES))
def sized(request, tmp_path_factory):
    folder = str(tmp_path_factory.mktemp(request.param))
    module, cfg = build_official_encoder(folder, seed=len(request.param), **SIZES[request.param])
    return module, se.load_params(folder, cfg), cfg


# ----------------------------------------------------------------------------- mel

def test_mel_filterbank_equals_librosa():
    import librosa

    np.testing.assert_array_equal(se.mel_filterbank(), librosa.filters.mel(
        sr=24000, n_fft=1024, n_mels=128, fmin=0, fmax=12000))
    np.testing.assert_array_equal(se.mel_filterbank(16000, 512, 80, 50.0, 7000.0),
                                  librosa.filters.mel(sr=16000, n_fft=512, n_mels=80, fmin=50,
                                                      fmax=7000))


@pytest.mark.parametrize("sr", RATES)
def test_mel_equals_official(sr):
    """Every band within 60 dB of its frame's loudest agrees to 1e-4. Bands further down (up to
    ~100 dB: the empty 11-12 kHz band of 22 kHz recordings, pauses) sit at the level of float32 FFT
    rounding (~4e-7 of the frame's norm), which the log turns into up to ~5e-4: torch's MKL FFT is
    itself that far from the exact (float64) mel there, and ours is closer to it than torch's."""
    wave = wave_24k(sr)
    ours, ref, exact = np.asarray(se.mel_spectrogram(wave)), official_mel(wave), exact_mel(wave)
    assert ours.shape == ref.shape == (len(wave) // 256, 128) and ours.dtype == np.float32
    err = np.abs(ours - ref)
    loud = ref.max(axis=1, keepdims=True) - ref < np.log(1e3)
    assert err[loud].max() <= TOL
    assert err.max() <= 1e-3
    assert np.abs(ours - exact).max() <= max(np.abs(ref - exact).max(), TOL)


# ----------------------------------------------------------------------------- encoder blocks

@pytest.mark.parametrize("sized", ["deep"], indirect=True)
def test_blocks_equal_official(sized):
    """Each official submodule against our function on the same (official) input."""
    import torch

    tdnn = jax.jit(se.tdnn, static_argnames="dilation")
    block = jax.jit(se.se_res2net_block, static_argnames="dilation")
    pooling = jax.jit(se.attentive_statistics_pooling)
    module, params, cfg = sized
    mel = official_mel(wave_24k(22050))
    T = mel.shape[0]
    valid = jnp.ones(T, bool)
    with torch.no_grad():
        h = module.blocks[0](torch.from_numpy(mel.T.copy())[None])
    assert_close(tdnn(params["blocks"][0], mel, T, cfg.enc_dilations[0]), h[0].T.numpy())
    outs = []
    for i in range(1, len(cfg.enc_channels) - 1):
        with torch.no_grad():
            h_next = module.blocks[i](h)
        ours = block(params["blocks"][i], h[0].T.numpy(), T, valid, cfg.enc_dilations[i])
        assert_close(ours, h_next[0].T.numpy())
        h = h_next
        outs.append(h)
    with torch.no_grad():
        x = torch.cat(outs, dim=1)
        mfa = module.mfa(x)
        pooled = module.asp(mfa)
    assert_close(tdnn(params["mfa"], x[0].T.numpy(), T, cfg.enc_dilations[-1]), mfa[0].T.numpy())
    assert_close(pooling(params["asp"], mfa[0].T.numpy(), T, valid),
                 pooled[0, :, 0].numpy())


# ----------------------------------------------------------------------------- x-vectors

@pytest.mark.parametrize("sr", RATES)
def test_xvector_equals_official_base(base, sr):
    tts, params, cfg, _ = base
    wave = wave_24k(sr)
    ref = tts.model.extract_speaker_embedding(wave, 24000).numpy()
    assert_close(se.extract_xvector(params, cfg, wave), ref)


@pytest.mark.parametrize("sr,channels", [(16000, 1), (44100, 2)])
def test_xvector_equals_official_voice_clone_prompt(base, tmp_path, sr, channels):
    """The whole path from a file: the official create_voice_clone_prompt (librosa loading and
    resampling) vs load_audio -> resample -> extract_xvector."""
    tts, params, cfg, _ = base
    path = write_speech(tmp_path / "ref.wav", sr, channels)
    [item] = tts.create_voice_clone_prompt(ref_audio=path, x_vector_only_mode=True)
    wave, file_sr = audio.load_audio(path)
    ours = se.extract_xvector(params, cfg, audio.resample(wave, file_sr, cfg.sample_rate))
    assert_close(ours, item.ref_spk_embedding.numpy())


@pytest.mark.parametrize("sr", [16000, 44100])
def test_xvector_equals_official_other_sizes(sized, sr):
    module, params, cfg = sized
    wave = wave_24k(sr)
    assert_close(se.extract_xvector(params, cfg, wave), official_xvector(module, wave))


@pytest.mark.parametrize("sized", ["deep"], indirect=True)
def test_buckets_are_exact_and_compile_once(sized):
    """Lengths from the shortest accepted (1920 samples, 7 frames) to the end of the 16-frame
    bucket, with different trailing partial hops: all on one program, all equal to the official.
    ("deep" has the widest and the asymmetric reflect paddings.)"""
    module, params, cfg = sized
    wave = wave_24k(24000)[4000:]
    lengths = (1920, 2000, 2943, 3839, 4351)
    assert {se.frame_bucket(n // 256) for n in lengths} == {16}
    before = se._xvector._cache_size()
    for n in lengths:
        assert_close(se.extract_xvector(params, cfg, wave[:n]), official_xvector(module, wave[:n]))
    assert se._xvector._cache_size() - before <= 1
    assert [se.frame_bucket(t) for t in (1, 16, 17, 24, 25, 33, 100, 5625)] == \
        [16, 16, 24, 24, 32, 48, 128, 6144]


# ----------------------------------------------------------------------------- errors

def test_bad_waves_and_configs(base):
    _, params, cfg, _ = base
    with pytest.raises(ValueError, match="at least 1280 samples"):
        se.extract_xvector(params, cfg, np.ones(1279, np.float32))
    with pytest.raises(ValueError, match="one mono wave"):
        se.extract_xvector(params, cfg, np.ones((2, 24000), np.float32))
    with pytest.raises(ValueError, match="at least 385 samples"):
        se.mel_spectrogram(np.ones(384, np.float32))
    for bad, message in [(dict(enc_channels=(32, 32, 32, 32, 64)), "sum of enc_channels"),
                         (dict(enc_channels=(32, 48, 32, 32, 96)), "must be equal"),
                         (dict(enc_kernel_sizes=(5, 3, 3, 1)), "same length"),
                         (dict(enc_res2net_scale=5), "divisible"),
                         (dict(mel_dim=80), "mel_dim"), (dict(sample_rate=16000), "24000")]:
        with pytest.raises(ValueError, match=message):
            se.expected_shapes(dataclasses.replace(cfg, **bad))


def test_checkpoint_errors_list_every_bad_key(tmp_path):
    from safetensors.numpy import load_file, save_file

    _, cfg = build_official_encoder(str(tmp_path), **SIZES["wide"])
    tensors = load_file(str(tmp_path / "model.safetensors"))
    del tensors["speaker_encoder.fc.bias"]
    tensors["speaker_encoder.mfa.conv.weight"] = tensors["speaker_encoder.mfa.conv.weight"][:, :8]
    tensors["speaker_encoder.extra.weight"] = np.zeros(3, np.float32)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError) as e:
        se.load_params(str(tmp_path), cfg)
    for key in ("speaker_encoder.fc.bias", "speaker_encoder.mfa.conv.weight",
                "speaker_encoder.extra.weight"):
        assert key in str(e.value)


# ----------------------------------------------------------------------------- full size

@pytest.mark.slow
def test_xvector_equals_official_full_size(tmp_path):
    """The released encoder's size (official defaults: channels 512 x 4 + 1536, enc_dim 1024)."""
    import torch

    module, cfg = build_official_encoder(str(tmp_path))
    assert cfg == SpeakerEncoderConfig()
    params = se.load_params(str(tmp_path), cfg)
    for sr in (22050, 44100):
        wave = wave_24k(sr)
        t0 = time.perf_counter()
        ref = official_xvector(module, wave)
        t1 = time.perf_counter()
        ours = np.asarray(se.extract_xvector(params, cfg, wave))
        t2 = time.perf_counter()
        ours = np.asarray(se.extract_xvector(params, cfg, wave))
        t3 = time.perf_counter()
        print(f"full size, {len(wave) / 24000:.2f} s at {sr} Hz: official {t1 - t0:.2f} s, ours "
              f"first call {t2 - t1:.2f} s, then {t3 - t2:.3f} s (torch threads "
              f"{torch.get_num_threads()})")
        assert_close(ours, ref)
