"""The bf16 codec decoder (`codec_precision="bf16"`): the AVX-512 BF16 convolution kernel against
a numpy model of its arithmetic, the whole decode against float32 (SNR), streaming against offline,
and the refusals and flags. The kernel tests need a CPU with AVX512_BF16; elsewhere they skip and
only the refusal tests run."""
from __future__ import annotations

import os
import subprocess
import sys

import jax
import ml_dtypes
import numpy as np
import pytest
from test_codec_decoder import DECODERS, _push_in_pieces, build_parity_codec, random_codes

from qwen3_tts_jax import cpu_kernels
from qwen3_tts_jax.codec import SpeechTokenizer
from qwen3_tts_jax.codec import decoder as D
from qwen3_tts_jax.cpu_kernels import PackedBf16Conv

needs_bf16 = pytest.mark.skipif(cpu_kernels.bf16_conv_missing() is not None,
                                reason=f"bf16 kernel: {cpu_kernels.bf16_conv_missing()}")


def bf16(a) -> np.ndarray:
    """a rounded to bf16 (nearest even), as float64."""
    return np.asarray(a, np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)


def model_conv(x_BxTxC, w_KxCxN, dilation, pad):
    """The kernel's arithmetic in float64: bf16 inputs and weights, exact products, and the sum
    of |products| (the scale of float32 rounding in the kernel's sums)."""
    k = w_KxCxN.shape[0]
    xe = np.pad(bf16(x_BxTxC), ((0, 0), (pad, 0), (0, 0)))
    w = bf16(w_KxCxN)
    T = xe.shape[1] - (k - 1) * dilation
    y = sum(xe[:, j * dilation:j * dilation + T] @ w[j] for j in range(k))
    mag = sum(np.abs(xe[:, j * dilation:j * dilation + T]) @ np.abs(w[j]) for j in range(k))
    return y, mag


# (B, T, C, N, k, dilation, extended): odd in-channel counts, out channels 1, 17, 96 and the
# block widths 16..64 (N = 48, 64, 80, 200), k = 1, 2, 7, T = 1..37, B = 1..3; `extended`: the
# input already carries (k - 1) dilation samples of history (pad 0, as streaming passes).
CASES = [
    (1, 1, 1, 1, 1, 1, False), (1, 5, 3, 17, 2, 1, False), (2, 37, 17, 96, 7, 1, False),
    (3, 13, 33, 17, 7, 3, False), (1, 37, 96, 96, 7, 9, False), (2, 9, 8, 48, 1, 1, False),
    (1, 23, 31, 64, 2, 1, False), (3, 2, 5, 80, 7, 9, False), (1, 30, 64, 200, 7, 3, True),
    (2, 19, 7, 1, 2, 1, True), (1, 37, 130, 33, 7, 1, False), (2, 11, 2, 16, 7, 2, True),
    # large enough to split over the thread pool: the products, then the input's rounding too
    (2, 300, 64, 96, 7, 3, False), (1, 500, 601, 20, 2, 1, True),
]


@needs_bf16
@pytest.mark.parametrize("B,T,C,N,k,d,extended", CASES)
def test_kernel_equals_the_numpy_model(B, T, C, N, k, d, extended):
    rng = np.random.default_rng(B * 1000 + T * 10 + C)
    Te = T + (k - 1) * d if extended else T
    x = rng.standard_normal((B, Te, C)).astype(np.float32)
    w = (rng.standard_normal((k, C, N)) / np.sqrt(k * C)).astype(np.float32)
    pad = 0 if extended else (k - 1) * d
    packed = cpu_kernels.pack_conv_bf16(w)
    assert packed.shape == (k, C, N)
    np.testing.assert_array_equal(np.asarray(packed.unpack()), bf16(w).astype(np.float32))
    y = np.asarray(cpu_kernels.conv_bf16(x, packed, d, pad))
    ref, mag = model_conv(x, w, d, pad)
    assert y.shape == (B, T, N) and y.dtype == np.float32
    err = np.abs(y - ref)
    assert (err <= 1e-5 * mag + 1e-30).all(), f"max rel err {(err / mag).max():.3g}"
    # the rounding of x matters: a float32 model is further off than the kernel is
    xf = np.pad(x.astype(np.float64), ((0, 0), (pad, 0), (0, 0)))
    exact = sum(xf[:, j * d:j * d + T] @ w[j].astype(np.float64) for j in range(k))
    assert np.abs(exact - ref).max() > 10 * err.max()


@needs_bf16
def test_kernel_under_jit_and_in_causal_conv():
    """`decoder.causal_conv` / `causal_trans_conv` with a packed weight: the float32 convolutions
    of the bf16-rounded input and weights (within float32 rounding), under jit."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 21, 40)).astype(np.float32)
    w = (rng.standard_normal((7, 40, 24)) * 0.1).astype(np.float32)
    bias = rng.standard_normal(24).astype(np.float32)
    p, pb = {"weight": w, "bias": bias}, {"weight": cpu_kernels.pack_conv_bf16(w), "bias": bias}
    xr = bf16(x).astype(np.float32)
    ref = D.causal_conv({"weight": bf16(w).astype(np.float32), "bias": bias}, xr, 3)
    got = jax.jit(D.causal_conv, static_argnums=2)(pb, x, 3)
    np.testing.assert_allclose(got, ref, rtol=0, atol=2e-5 * np.abs(ref).max())
    assert np.abs(np.asarray(D.causal_conv(p, x, 3)) - ref).max() > 1e-3   # rounding is real
    wt = (rng.standard_normal((2, 40, 5 * 16)) * 0.1).astype(np.float32)
    bt = rng.standard_normal(16).astype(np.float32)
    ref = D.causal_trans_conv({"weight": bf16(wt).astype(np.float32), "bias": bt}, xr, 5)
    got = D.causal_trans_conv({"weight": cpu_kernels.pack_conv_bf16(wt), "bias": bt}, x, 5)
    assert got.shape == (2, 21 * 5, 16)
    np.testing.assert_allclose(got, ref, rtol=0, atol=2e-5 * np.abs(ref).max())


def snr_db(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return 10 * np.log10(np.sum(ref ** 2) / np.sum((ours - ref) ** 2))


# bf16 audio vs float32 on the parity codecs (measured: see test_decode_bf16_close_to_float32)
MIN_SNR_DB = 25.0


@pytest.fixture(scope="module")
def codecs(tmp_path_factory):
    """(float32 SpeechTokenizer, bf16 SpeechTokenizer) of a parity codec (tests/
    test_codec_decoder.py: audible random weights); a wider variant of the tiny decoder so that
    most convolutions are packed."""
    path = str(tmp_path_factory.mktemp("codec_bf16"))
    build_parity_codec(path, dict(DECODERS["tiny"], decoder_dim=128), seed=5)
    bf16_ok = cpu_kernels.bf16_conv_missing() is None
    return (SpeechTokenizer.from_pretrained(path),
            SpeechTokenizer.from_pretrained(path, precision="bf16") if bf16_ok else None)


@needs_bf16
def test_decode_bf16_close_to_float32(codecs):
    tok32, tok16 = codecs
    packed = [x for x in jax.tree_util.tree_leaves(
        tok16.params, is_leaf=lambda x: isinstance(x, PackedBf16Conv))
        if isinstance(x, PackedBf16Conv)]
    # pre_conv, decoder.0, 4 transposed convs and 4 x 3 x 2 residual convs (the last block's
    # 8 channels stay float32), 2 upsample transposed convs
    assert len(packed) == 1 + 1 + 4 + 3 * 3 * 2 + 2 and tok16.precision == "bf16"
    codes = random_codes(np.random.default_rng(1), 60, batch=2)
    (a32, b32), _ = tok32.decode(codes, chunk_size=None)
    (a16, b16), _ = tok16.decode(codes, chunk_size=None)
    snr = min(snr_db(a16, a32), snr_db(b16, b32))
    print(f"bf16 vs float32 SNR {snr:.1f} dB")
    assert MIN_SNR_DB < snr < 80, snr          # close, and not float32 itself


@needs_bf16
def test_stream_equals_offline_with_bf16(codecs):
    """The bf16 StreamDecoder pushed in uneven pieces (rows idle in some calls) = the bf16
    offline decode of the whole stream, at the float32 stream test's tolerance."""
    _, tok = codecs
    rng = np.random.default_rng(2)
    a, b = random_codes(rng, 80), random_codes(rng, 50)
    dec = tok.stream_decoder(batch=2, chunk_size=None)
    got_a, got_b = _push_in_pieces(dec, [a, b], [[1, 4, 0, 30, 45], [4, 4, 4, 30, 8]])
    for got, codes in ((got_a, a), (got_b, b)):
        ref = tok.decode(codes, chunk_size=None)[0][0]
        err = np.abs(got - ref).max()
        assert err <= 1e-4 * np.abs(ref).max(), (err, np.abs(ref).max())


def test_refused_without_avx512_bf16(codecs, monkeypatch, tmp_path):
    """A CPU without AVX512_BF16 (CPUID, monkeypatched): asking for the bf16 codec is a
    ValueError naming the instructions, at load, before any tensor is read."""
    monkeypatch.setattr(cpu_kernels, "_cpu_has_bf16_dot", lambda: False)
    with pytest.raises(ValueError, match="AVX512_BF16"):
        SpeechTokenizer.from_pretrained(codecs[0]._folder, precision="bf16")
    from qwen3_tts_jax import Qwen3TTS

    with pytest.raises(ValueError, match="AVX512_BF16"):
        Qwen3TTS.from_pretrained(str(tmp_path / "not-even-there"), codec_precision="bf16")
    SpeechTokenizer.from_pretrained(codecs[0]._folder)          # float32 still loads


@pytest.mark.parametrize("bad", ["fp16", "bfloat16", "int8", None])
def test_bad_precision_names_the_allowed_ones(bad, tmp_path):
    from qwen3_tts_jax import Qwen3TTS

    with pytest.raises(ValueError, match="'float32', 'bf16'"):
        Qwen3TTS.from_pretrained(str(tmp_path), codec_precision=bad)
    with pytest.raises(ValueError, match="'float32', 'bf16'"):
        SpeechTokenizer.from_pretrained(str(tmp_path), precision=bad)


def test_save_converted_refuses_the_bf16_codec(codecs, tmp_path):
    from qwen3_tts_jax.weights import CheckpointError

    if codecs[1] is None:
        pytest.skip("no bf16 codec here")
    with pytest.raises(CheckpointError, match="precision='float32'"):
        codecs[1].save_converted(str(tmp_path))


def test_cli_flag_parses():
    from qwen3_tts_jax import cli

    base = ["custom-voice", "--random-weights", "--text", "hi"]
    assert cli._parser().parse_args(base).codec_precision == "float32"
    assert cli._parser().parse_args(base + ["--codec-precision", "bf16"]).codec_precision == "bf16"
    with pytest.raises(SystemExit):
        cli._parser().parse_args(base + ["--codec-precision", "fp16"])


@needs_bf16
def test_cli_speaks_with_the_bf16_codec(tmp_path, make_checkpoint):
    """`--codec-precision bf16` end to end: the same codes as float32 (the talker is untouched),
    audio close to float32's."""
    import soundfile as sf

    exe = os.path.join(os.path.dirname(sys.executable), "qwen3-tts-jax")
    waves = {}
    for precision in ("float32", "bf16"):
        out = tmp_path / f"{precision}.wav"
        r = subprocess.run(
            [exe, "custom-voice", "--model", make_checkpoint("cv_proj"), "--speaker", "ryan",
             "--language", "english", "--text", "Hello world.", "--greedy",
             "--max-new-tokens", "9", "--output", str(out), "--quiet",
             "--codec-precision", precision],
            capture_output=True, text=True, timeout=900, env=dict(os.environ, JAX_PLATFORMS="cpu"))
        assert r.returncode == 0, r.stderr
        waves[precision] = sf.read(str(out), dtype="float32")[0]
    assert waves["bf16"].shape == waves["float32"].shape == (8 * 1920,)
    assert not np.array_equal(waves["bf16"], waves["float32"])
    assert snr_db(waves["bf16"], waves["float32"]) > 20
