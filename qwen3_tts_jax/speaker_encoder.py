"""The speaker encoder of Base checkpoints (official `Qwen3TTSSpeakerEncoder`, an ECAPA-TDNN,
M:95-393, and `mel_spectrogram`, M:396-464): a 24 kHz reference wave -> one x-vector (enc_dim,), in
float32.

    wave (N,) --log mel (M:396)--> (T = N // 256, 128)
      --blocks.0: TDNN conv k5 + ReLU--> (T, C) --blocks.1..n: SE-Res2Net--> (T, C) each
      --mfa: TDNN k1 on cat(blocks.1..n outputs)--> (T, C_mfa)
      --asp: attentive statistics pooling--> (2 C_mfa,) --fc--> (enc_dim,)

Activations are channels-last (T, C), one utterance at a time; the official code is channels-first
(B, C, T). Every convolution is the official Conv1d(padding="same", padding_mode="reflect").

Shape buckets. jit compiles one program per input shape and every reference clip has its own length,
so `extract_xvector` pads the wave to a bucketed frame count (16, 24, 32, 48, 64, 96, ... frames:
powers of two and 1.5x powers of two, at most +50 % work) and passes the true length as a traced
number. Padding is exact, not approximate: the reflect padding of the wave and of every convolution
reflects about the TRUE last sample/frame (index arithmetic, `_reflect`), so valid frames never read
the padding, and the time means of the SE blocks and of the statistics pooling, and the attention
softmax, are masked to the valid frames. (Zero padding would not do: reflect padding at the end and
the global statistics would both change.) The price is a few gathers and up to 50 % padding
work; the gain is that a new clip length reuses one of ~17 programs up to 60 s instead of compiling
its own: at full size on 2 busy CPU cores a compile takes ~6 s, while running takes 0.24 s for a
3 s clip and 0.5 s for a 10 s one.

params (from `RULES`; conv weights keep the torch layout (out, in, k)):
  blocks/[0]: {weight, bias}                                   the TDNN on the mel
  blocks/[i>0]: {tdnn1, tdnn2, res2net/[scale-1], se/{conv1, conv2}}: each {weight, bias}
  mfa, asp/tdnn, asp/conv, fc: {weight, bias}
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from . import weights
from .buckets import ladder
from .config import SpeakerEncoderConfig, check_speaker_encoder
from .weights import Rule

# Hard-coded in the official `extract_speaker_embedding` (M:1941-1952), whatever the config says.
SAMPLE_RATE = 24000
N_FFT = 1024
HOP = 256
NUM_MELS = 128
FMIN, FMAX = 0.0, 12000.0
LOG_CLAMP = 1e-5          # `dynamic_range_compression_torch` clip_val
MAG_EPS = 1e-9            # inside the sqrt of the STFT magnitude
STD_EPS = 1e-12           # `AttentiveStatisticsPooling.eps`, clamps the variance
MIN_BUCKET = 16           # frames; a 1920-sample (one codec frame) clip has 7

_P = r"speaker_encoder\."
_W = r"(weight|bias)"
RULES = [
    Rule(_P + r"blocks\.0\.conv\." + _W, "blocks/0/{1}"),
    Rule(_P + r"blocks\.(\d+)\.(tdnn1|tdnn2)\.conv\." + _W, "blocks/{1}/{2}/{3}"),
    Rule(_P + r"blocks\.(\d+)\.res2net_block\.blocks\.(\d+)\.conv\." + _W,
         "blocks/{1}/res2net/{2}/{3}"),
    Rule(_P + r"blocks\.(\d+)\.se_block\.(conv1|conv2)\." + _W, "blocks/{1}/se/{2}/{3}"),
    Rule(_P + r"mfa\.conv\." + _W, "mfa/{1}"),
    Rule(_P + r"asp\.tdnn\.conv\." + _W, "asp/tdnn/{1}"),
    Rule(_P + r"asp\.conv\." + _W, "asp/conv/{1}"),
    Rule(_P + r"fc\." + _W, "fc/{1}"),
]


def check_config(cfg: SpeakerEncoderConfig) -> None:
    """ConfigError for configs the official module cannot run either (`config.check_speaker_encoder`,
    which `config.parse_config` runs on every Base config)."""
    check_speaker_encoder(cfg)


def expected_shapes(cfg: SpeakerEncoderConfig) -> dict:
    """{official key: shape} of every `speaker_encoder.*` tensor of the official module."""
    check_config(cfg)
    ch, ks, scale = cfg.enc_channels, cfg.enc_kernel_sizes, cfg.enc_res2net_scale
    out = {}

    def conv(name, c_out, c_in, k):
        out[f"speaker_encoder.{name}.weight"] = (c_out, c_in, k)
        out[f"speaker_encoder.{name}.bias"] = (c_out,)

    conv("blocks.0.conv", ch[0], cfg.mel_dim, ks[0])
    for i in range(1, len(ch) - 1):
        conv(f"blocks.{i}.tdnn1.conv", ch[i], ch[i - 1], 1)
        for j in range(scale - 1):
            conv(f"blocks.{i}.res2net_block.blocks.{j}.conv", ch[i] // scale, ch[i] // scale, ks[i])
        conv(f"blocks.{i}.tdnn2.conv", ch[i], ch[i], 1)
        conv(f"blocks.{i}.se_block.conv1", cfg.enc_se_channels, ch[i], 1)
        conv(f"blocks.{i}.se_block.conv2", ch[i], cfg.enc_se_channels, 1)
    conv("mfa.conv", ch[-1], ch[-1], ks[-1])
    conv("asp.tdnn.conv", cfg.enc_attention_channels, 3 * ch[-1], 1)
    conv("asp.conv", ch[-1], cfg.enc_attention_channels, 1)
    conv("fc", cfg.enc_dim, 2 * ch[-1], 1)
    return out


def load_params(folder: str, cfg: SpeakerEncoderConfig):
    """float32 params from the `speaker_encoder.*` tensors of a Base checkpoint's model.safetensors.
    Raises weights.CheckpointError listing every missing, unexpected or misshapen key."""
    files = weights.safetensors_files(folder)
    return weights.load_official(files, RULES, expected_shapes(cfg), jnp.float32,
                                 what=f"{folder}/model.safetensors (speaker encoder)",
                                 prefix="speaker_encoder.")


# ----------------------------------------------------------------------------- mel spectrogram

# librosa's slaney mel scale (hz_to_mel / mel_to_hz with htk=False), written with the same
# arithmetic so that the filterbank comes out bit for bit: linear below 1 kHz, logarithmic above.
_F_SP = 200.0 / 3
_MIN_LOG_HZ = 1000.0
_MIN_LOG_MEL = _MIN_LOG_HZ / _F_SP
_LOGSTEP = np.log(6.4) / 27.0


def _hz_to_mel(f: float) -> float:
    return _MIN_LOG_MEL + np.log(f / _MIN_LOG_HZ) / _LOGSTEP if f >= _MIN_LOG_HZ else f / _F_SP


def _mel_to_hz(m):
    return np.where(m >= _MIN_LOG_MEL, _MIN_LOG_HZ * np.exp(_LOGSTEP * (m - _MIN_LOG_MEL)),
                    _F_SP * m)


@functools.lru_cache(maxsize=None)
def mel_filterbank(sr: int = SAMPLE_RATE, n_fft: int = N_FFT, n_mels: int = NUM_MELS,
                   fmin: float = FMIN, fmax: float = FMAX) -> np.ndarray:
    """(n_mels, n_fft // 2 + 1) float32 slaney-normalised triangles: librosa.filters.mel(htk=False,
    norm="slaney") bit for bit, including its rounding (triangles stored as float32 BEFORE the
    float64 area normalisation is applied to them), which the official mel uses."""
    fft_hz = np.fft.rfftfreq(n_fft, 1.0 / sr)
    mel_hz = _mel_to_hz(np.linspace(_hz_to_mel(fmin), _hz_to_mel(fmax), n_mels + 2))
    fdiff = np.diff(mel_hz)
    ramps = mel_hz[:, None] - fft_hz[None, :]
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    tri = np.maximum(0, np.minimum(lower, upper)).astype(np.float32)
    enorm = 2.0 / (mel_hz[2:] - mel_hz[:-2])
    return (tri * enorm[:, None]).astype(np.float32)


def _reflect(i, n):
    """Index i of a sequence of length n reflect-padded on both sides (torch "reflect": the edge
    sample is not repeated). Valid for -n < i < 2n - 1; indices further out (only ever computed for
    padding frames, whose results are masked) are clipped into range."""
    i = jnp.abs(i)
    return jnp.clip(jnp.where(i > n - 1, 2 * (n - 1) - i, i), 0, n - 1)


def _log_mel(wave_N, num_samples, num_frames: int):
    """(num_frames, 128) log mel of wave_N[:num_samples] (num_samples may be traced); rows at or
    past num_samples // HOP are padding. Reflect-padding by (N_FFT - HOP) / 2 and an uncentred STFT
    put frame f's window at padded samples [f HOP, f HOP + N_FFT), i.e. wave[f HOP - 384 ...]."""
    pad = (N_FFT - HOP) // 2
    idx_FxK = jnp.arange(num_frames)[:, None] * HOP + jnp.arange(N_FFT)[None, :] - pad
    frames_FxK = wave_N[_reflect(idx_FxK, num_samples)]
    # torch.hann_window(N_FFT) is periodic.
    window_K = jnp.asarray(np.hanning(N_FFT + 1)[:-1], jnp.float32)
    spec_FxB = jnp.fft.rfft(frames_FxK * window_K, axis=-1)
    mag_FxB = jnp.sqrt(jnp.real(spec_FxB) ** 2 + jnp.imag(spec_FxB) ** 2 + MAG_EPS)
    mel_FxM = mag_FxB @ jnp.asarray(mel_filterbank().T)
    return jnp.log(jnp.maximum(mel_FxM, LOG_CLAMP))


_jit_log_mel = jax.jit(_log_mel, static_argnames=("num_frames",))


def mel_spectrogram(wave_N):
    """(N // 256, 128) float32 log mel of a 24 kHz wave (N >= 385): the official `mel_spectrogram`
    as called by `extract_speaker_embedding`, frames first.

    >>> mel_spectrogram(np.zeros(24000, np.float32)).shape
    (93, 128)
    """
    wave_N = jnp.asarray(wave_N, jnp.float32)
    if wave_N.ndim != 1:
        raise ValueError(f"mel_spectrogram takes one mono wave (N,); got shape {wave_N.shape}")
    n = wave_N.shape[0]
    _check_length(n)
    return _jit_log_mel(wave_N, n, n // HOP)


# ----------------------------------------------------------------------------- ECAPA-TDNN

def conv(p, x_TxC, num_frames, dilation: int = 1):
    """Conv1d(padding="same", padding_mode="reflect") over the first `num_frames` (traced) frames of
    x_TxC; rows past them are padding in and out. torch "same" puts d (k - 1) // 2 on the left."""
    w_OxIxK = p["weight"]
    k = w_OxIxK.shape[-1]
    if k == 1:
        return x_TxC @ w_OxIxK[:, :, 0].T + p["bias"]
    total = dilation * (k - 1)
    xp_TxC = x_TxC[_reflect(jnp.arange(x_TxC.shape[0] + total) - total // 2, num_frames)]
    y = jax.lax.conv_general_dilated(xp_TxC[None], w_OxIxK, window_strides=(1,), padding="VALID",
                                     rhs_dilation=(dilation,),
                                     dimension_numbers=("NWC", "OIW", "NWC"))
    return y[0] + p["bias"]


def tdnn(p, x_TxC, num_frames, dilation: int = 1):
    """`TimeDelayNetBlock`: conv + ReLU."""
    return jax.nn.relu(conv(p, x_TxC, num_frames, dilation))


def _masked_mean(x_TxC, valid_T):
    return jnp.sum(jnp.where(valid_T[:, None], x_TxC, 0.0), axis=0) / jnp.sum(valid_T)


def res2net(p_list, x_TxC, num_frames, dilation: int):
    """`Res2NetBlock`: channel chunk 0 passes through, chunk 1 goes through its TDNN, chunk i > 1
    through its TDNN after adding chunk i - 1's output (a growing receptive field)."""
    chunks = jnp.split(x_TxC, len(p_list) + 1, axis=-1)
    outs = [chunks[0]]
    for i, (p, chunk) in enumerate(zip(p_list, chunks[1:])):
        outs.append(tdnn(p, chunk if i == 0 else chunk + outs[-1], num_frames, dilation))
    return jnp.concatenate(outs, axis=-1)


def squeeze_excitation(p, x_TxC, valid_T):
    """`SqueezeExcitationBlock`: scale channels by a gate computed from their mean over time."""
    s_C = jax.nn.relu(_masked_mean(x_TxC, valid_T) @ p["conv1"]["weight"][:, :, 0].T
                      + p["conv1"]["bias"])
    s_C = jax.nn.sigmoid(s_C @ p["conv2"]["weight"][:, :, 0].T + p["conv2"]["bias"])
    return x_TxC * s_C


def se_res2net_block(p, x_TxC, num_frames, valid_T, dilation: int):
    """`SqueezeExcitationRes2NetBlock`: tdnn1 (k1) -> Res2Net -> tdnn2 (k1) -> SE, + the input."""
    h = tdnn(p["tdnn1"], x_TxC, num_frames)
    h = res2net(p["res2net"], h, num_frames, dilation)
    h = tdnn(p["tdnn2"], h, num_frames)
    return squeeze_excitation(p["se"], h, valid_T) + x_TxC


def _stats(x_TxC, w_TxC):
    """Weighted mean and std over time; the weights sum to 1 over the valid frames, 0 elsewhere."""
    mean_C = jnp.sum(w_TxC * x_TxC, axis=0)
    var_C = jnp.sum(w_TxC * jnp.square(x_TxC - mean_C), axis=0)
    return mean_C, jnp.sqrt(jnp.maximum(var_C, STD_EPS))


def attentive_statistics_pooling(p, x_TxC, num_frames, valid_T):
    """`AttentiveStatisticsPooling`: per-channel attention over time, conditioned on the utterance's
    global mean and std, gives a weighted mean and std -> (2C,)."""
    T, C = x_TxC.shape
    x_TxC = jnp.where(valid_T[:, None], x_TxC, 0.0)   # keep padding rows finite for 0 * x below
    uniform_Tx1 = (valid_T / jnp.sum(valid_T))[:, None].astype(x_TxC.dtype)
    mean_C, std_C = _stats(x_TxC, uniform_Tx1)
    ctx_TxC3 = jnp.concatenate([x_TxC, jnp.broadcast_to(mean_C, (T, C)),
                                jnp.broadcast_to(std_C, (T, C))], axis=-1)
    att_TxC = conv(p["conv"], jnp.tanh(tdnn(p["tdnn"], ctx_TxC3, num_frames)), num_frames)
    att_TxC = jax.nn.softmax(jnp.where(valid_T[:, None], att_TxC, -jnp.inf), axis=0)
    mean_C, std_C = _stats(x_TxC, att_TxC)
    return jnp.concatenate([mean_C, std_C])


def encode(params, cfg: SpeakerEncoderConfig, mel_TxM, num_frames):
    """`Qwen3TTSSpeakerEncoder.forward` on the first `num_frames` (traced) rows of mel_TxM
    -> (enc_dim,)."""
    valid_T = jnp.arange(mel_TxM.shape[0]) < num_frames
    h = tdnn(params["blocks"][0], mel_TxM, num_frames, cfg.enc_dilations[0])
    outs = []
    for i, p in enumerate(params["blocks"][1:], start=1):
        h = se_res2net_block(p, h, num_frames, valid_T, cfg.enc_dilations[i])
        outs.append(h)
    # Multi-layer feature aggregation: blocks.0's output is not included (M:383).
    h = tdnn(params["mfa"], jnp.concatenate(outs, axis=-1), num_frames, cfg.enc_dilations[-1])
    pooled = attentive_statistics_pooling(params["asp"], h, num_frames, valid_T)
    return pooled @ params["fc"]["weight"][:, :, 0].T + params["fc"]["bias"]


@functools.partial(jax.jit, static_argnames=("cfg", "num_frames"))
def _xvector(params, cfg: SpeakerEncoderConfig, wave_N, num_samples, num_frames: int):
    mel_TxM = _log_mel(wave_N, num_samples, num_frames)
    return encode(params, cfg, mel_TxM, num_samples // HOP)


def frame_bucket(num_frames: int) -> int:
    """The padded frame count a clip of `num_frames` mel frames runs with: the next of 16, 24, 32,
    48, 64, ... (powers of two and 1.5x powers of two)."""
    return ladder(num_frames, MIN_BUCKET)


def _check_length(num_samples: int, cfg: SpeakerEncoderConfig | None = None) -> None:
    # torch's reflect padding needs more samples/frames than it pads: 384 samples for the STFT, and
    # ceil(d (k - 1) / 2) frames (the right side of "same") for each convolution.
    frames_needed = 1 + max((d * (k - 1) + 1) // 2 for k, d in
                            zip(cfg.enc_kernel_sizes, cfg.enc_dilations)) if cfg else 1
    min_samples = max((N_FFT - HOP) // 2 + 1, frames_needed * HOP)
    if num_samples < min_samples:
        raise ValueError(f"the speaker encoder needs at least {min_samples} samples at 24 kHz "
                         f"({min_samples / SAMPLE_RATE:.3f} s); got {num_samples}")


def extract_xvector(params, cfg: SpeakerEncoderConfig, wave_24k):
    """The speaker embedding (x-vector) of a mono 24 kHz float wave: (enc_dim,) float32, the
    official `Qwen3TTSForConditionalGeneration.extract_speaker_embedding(wave, 24000)` in float32.

    The wave is used as is: no resampling, normalisation or clipping (the official warns about
    |x| > 1 and goes on); see audio.load_audio / audio.resample for getting there. Compiled once
    per frame bucket (see the module docstring); cfg is static.

    >>> params = load_params(folder, cfg.speaker_encoder)
    >>> xvec = extract_xvector(params, cfg.speaker_encoder, wave_24k)   # (1024,) for 0.6B-Base
    """
    wave_N = np.asarray(wave_24k, np.float32)
    if wave_N.ndim != 1:
        raise ValueError(f"extract_xvector takes one mono wave (N,); got shape {wave_N.shape}")
    n = wave_N.shape[0]
    _check_length(n, cfg)
    bucket = frame_bucket(n // HOP)
    # Frames < n // HOP read samples < n only; the buffer just has to hold all n < (bucket + 1) HOP.
    buffer_N = np.zeros((bucket + 1) * HOP, np.float32)
    buffer_N[:n] = wave_N
    return _xvector(params, cfg, buffer_N, jnp.int32(n), bucket)
