"""audio.py: every input form of the official wrapper's loader
(`Qwen3TTSModel._normalize_audio_inputs`, W:188-265), resampling against `librosa.resample` (what
`create_voice_clone_prompt` calls, W:440-444), and every bad-input error.

Speech comes from espeak-ng when it is installed (a real synthesiser: voiced/unvoiced segments,
pauses, formant transitions); otherwise from a small source-filter synthesiser (`_synthetic_speech`,
so the tests also run where espeak-ng is missing). espeak-ng only writes 22050 Hz, so the recordings
at the other rates are its output resampled with soxr VHQ (not the HQ setting under test), plus
-66 dB noise so the band above 11 kHz is not empty, with 16-bit PCM values like real recordings.
"""
import base64
import functools
import http.server
import io
import shutil
import subprocess
import threading
import warnings
import wave as wavefile

import numpy as np
import pytest
import soundfile as sf
import soxr

from qwen3_tts_jax.audio import AudioError, load_audio, resample

RATES = (16000, 22050, 24000, 44100)
VOICES = {16000: ("en-us", 30), 22050: ("en-gb", 50), 24000: ("en-us+f3", 70),
          44100: ("en-gb-scotland", 40)}


def _synthetic_speech(sr: int, pitch: int, seconds: float = 2.0) -> np.ndarray:
    """Glottal pulses with a gliding pitch through three moving formant resonators, in syllables
    separated by pauses, with a little aspiration noise."""
    rng = np.random.default_rng(pitch)
    n = int(seconds * sr)
    t = np.arange(n) / sr
    f0 = (90 + pitch) * (1 + 0.15 * np.sin(2 * np.pi * 1.3 * t))
    source = (np.diff(np.floor(np.cumsum(f0) / sr), prepend=0) > 0).astype(np.float64)
    source += 0.02 * rng.standard_normal(n)
    out = np.zeros(n)
    for k, base in enumerate((700, 1200, 2600)):
        fc = base * (1 + 0.3 * np.sin(2 * np.pi * (0.7 + 0.4 * k) * t))
        r = np.exp(-np.pi * 80 * (k + 1) / sr)
        y1 = y2 = 0.0
        for i in range(n):
            y = source[i] + 2 * r * np.cos(2 * np.pi * fc[i] / sr) * y1 - r * r * y2
            out[i] += y
            y1, y2 = y, y1
    envelope = np.clip(np.sin(2 * np.pi * 2.5 * t), 0, None) ** 0.5
    out *= envelope
    return (0.5 * out / np.abs(out).max()).astype(np.float32)


@functools.lru_cache(maxsize=None)
def speech(sr: int) -> np.ndarray:
    """2-3 s of float32 mono speech at `sr`, holding 16-bit PCM values."""
    voice, pitch = VOICES[sr]
    if shutil.which("espeak-ng"):
        out = subprocess.run(["espeak-ng", "-v", voice, "-p", str(pitch), "-s", "190", "--stdout",
                              "The quick brown fox jumps over the lazy dog."],
                             check=True, capture_output=True).stdout
        wave, native = sf.read(io.BytesIO(out), dtype="float64")
    else:
        native = 22050
        wave = _synthetic_speech(native, pitch).astype(np.float64)
    if sr != native:
        wave = soxr.resample(wave, native, sr, quality="VHQ")
        wave += 5e-4 * np.random.default_rng(sr).standard_normal(wave.shape[0])
    return np.round(np.clip(wave, -1, 32767 / 32768) * 32768).astype(np.int16) / np.float32(32768)


def speech_channels(sr: int, channels: int) -> np.ndarray:
    """(samples, channels): channel c is the speech at 1 - c / 4 of its level."""
    return np.stack([speech(sr) * np.float32(1 - c / 4) for c in range(channels)], -1)


def write_speech(path, sr: int, channels: int = 1, fmt: str | None = None, subtype: str = "PCM_16"):
    sf.write(str(path), speech_channels(sr, channels), sr, format=fmt, subtype=subtype)
    return str(path)


@pytest.fixture(scope="module")
def official_loader():
    """The official wrapper's input normaliser, on an instance without a model (it uses none)."""
    from qwen_tts import Qwen3TTSModel

    return Qwen3TTSModel.__new__(Qwen3TTSModel)._normalize_audio_inputs


# ----------------------------------------------------------------------------- resampling

@pytest.mark.parametrize("sr_in,sr_out", [(16000, 24000), (22050, 24000), (44100, 24000),
                                          (48000, 24000), (8000, 24000), (24000, 16000)])
def test_resample_equals_librosa(sr_in, sr_out):
    import librosa

    wave = speech(sr_in) if sr_in in RATES else soxr.resample(speech(22050), 22050, sr_in, "VHQ")
    ours = resample(wave, sr_in, sr_out)
    ref = librosa.resample(wave, orig_sr=sr_in, target_sr=sr_out)
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    np.testing.assert_array_equal(ours, ref)


def test_resample_same_rate_and_odd_lengths():
    import librosa

    wave = speech(24000)
    np.testing.assert_array_equal(resample(wave, 24000, 24000), wave)
    for n in (1001, 1002, 4411):  # ceil(n * ratio) padding/trimming
        np.testing.assert_array_equal(resample(speech(44100)[:n], 44100, 24000),
                                      librosa.resample(speech(44100)[:n], orig_sr=44100,
                                                       target_sr=24000))
    with pytest.raises(AudioError, match="mono"):
        resample(np.zeros((2, 100), np.float32), 16000, 24000)


# ----------------------------------------------------------------------------- input forms

@pytest.mark.parametrize("fmt,subtype,channels", [("WAV", "PCM_16", 1), ("WAV", "FLOAT", 2),
                                                  ("FLAC", "PCM_24", 2), ("OGG", "VORBIS", 1)])
def test_file_equals_official_loader(tmp_path, official_loader, fmt, subtype, channels):
    path = write_speech(tmp_path / f"ref.{fmt.lower()}", 22050, channels, fmt, subtype)
    wave, sr = load_audio(path)
    [(ref, ref_sr)] = official_loader([path])
    assert sr == ref_sr == 22050 and wave.dtype == np.float32
    np.testing.assert_array_equal(wave, ref)


def test_base64_and_data_url_equal_official(tmp_path, official_loader):
    path = write_speech(tmp_path / "ref.wav", 16000, channels=2)
    b64 = base64.b64encode(open(path, "rb").read()).decode()
    data_url = "data:audio/wav;base64," + b64
    from_file, _ = load_audio(path)
    [(ref, _)] = official_loader([data_url])
    for x in (data_url, b64, b64[:100] + "\n" + b64[100:]):   # bare base64 may contain '/'
        wave, sr = load_audio(x)
        assert sr == 16000
        np.testing.assert_array_equal(wave, ref)
        np.testing.assert_array_equal(wave, from_file)


def test_tuple_forms(tmp_path):
    """Arrays mix down like files of the same samples (official: libsndfile then a channel mean)."""
    mono = speech(24000)
    stereo = speech_channels(24000, 3)
    from_file, _ = load_audio(write_speech(tmp_path / "st.wav", 24000, channels=3, subtype="FLOAT"))
    for x, expect in [((mono, 24000), mono), ((mono.astype(np.float64), np.int64(24000)), mono),
                      ((list(mono), 24000.0), mono), ((mono[None], 24000), mono),
                      ((stereo, 24000), from_file), ((stereo.T.copy(), 24000), from_file),
                      ((stereo[:, :1], 24000), mono)]:
        wave, sr = load_audio(x)
        assert sr == 24000 and wave.dtype == np.float32 and wave.ndim == 1
        np.testing.assert_array_equal(wave, expect)


@pytest.mark.parametrize("dtype,subtype", [(np.int16, "PCM_16"), (np.int32, "PCM_32"),
                                           (np.uint8, "PCM_U8")])
def test_integer_arrays_are_pcm_like_files(tmp_path, dtype, subtype):
    """Integer samples are scaled as libsndfile scales the same samples stored in a WAV file."""
    info = np.iinfo(dtype)
    pcm = np.clip(np.round(speech(16000).astype(np.float64) * 2.0 ** (info.bits - 1))
                  + info.min + 2 ** (info.bits - 1), info.min, info.max).astype(dtype)
    path = str(tmp_path / f"{subtype}.wav")
    with wavefile.open(path, "wb") as w:   # raw bytes: no float conversion on the way in
        w.setnchannels(1)
        w.setsampwidth(pcm.itemsize)
        w.setframerate(16000)
        w.writeframes(pcm.astype(pcm.dtype.newbyteorder("<")).tobytes())
    assert sf.info(path).subtype == subtype
    np.testing.assert_array_equal(load_audio((pcm, 16000))[0], load_audio(path)[0])


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_http_url(tmp_path):
    path = write_speech(tmp_path / "ref.flac", 44100, fmt="FLAC")
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(tmp_path)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        wave, sr = load_audio(base + "/ref.flac")
        assert sr == 44100
        np.testing.assert_array_equal(wave, load_audio(path)[0])
        with pytest.raises(AudioError, match="HTTP 404"):
            load_audio(base + "/missing.wav")
    finally:
        server.shutdown()
        server.server_close()
    with pytest.raises(AudioError, match="could not download .*local path"):
        load_audio(base + "/ref.flac")   # the server is gone: connection refused


def test_loud_float_audio_is_kept_and_warned():
    wave = 3 * speech(24000)
    with pytest.warns(UserWarning, match="above 1.0"):
        out, _ = load_audio((wave, 24000))
    np.testing.assert_array_equal(out, wave)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_audio((speech(24000), 24000))


# ----------------------------------------------------------------------------- bad input

def _bad_inputs(tmp):
    text = tmp / "notes.txt"
    text.write_text("not audio")
    long_file = tmp / "long.wav"
    sf.write(str(long_file), np.full(61 * 8000, 0.1, np.float32), 8000, subtype="PCM_16")
    ok = speech(16000)
    return [
        (str(tmp / "nope.wav"), "does not exist"),
        (str(tmp), "is a folder"),
        (str(text), "cannot read"),
        (str(long_file), "61.0 s long; the limit is 60 s"),
        ("data:audio/wav;base64,@@@", "not valid base64"),
        ("data:audio/wav,RIFF", "not base64"),
        ("A" * 400, "cannot read the base64 audio"),
        (ok, "bare array has no sample rate"),
        ((np.zeros(0, np.float32), 16000), "is empty"),
        ((np.zeros(16000, np.float32), 16000), "silent"),
        ((np.full(16000, 1e-7, np.float32), 16000), "silent"),
        ((np.where(np.arange(16000) == 5, np.nan, ok[:16000]), 16000), "NaN or infinite .* 5\\)"),
        ((np.where(np.arange(16000) == 7, np.inf, ok[:16000]), 16000), "NaN or infinite"),
        ((ok[:1279], 16000), "at least 0.08 s"),        # 1279 samples -> 1919 at 24 kHz
        ((np.tile(ok, 31)[:61 * 16000], 16000), "the limit is 60 s"),
        ((ok[None, None, :], 16000), "must be \\(samples,\\)"),
        ((np.float32(0.5), 16000), "must be \\(samples,\\)"),
        ((np.zeros((100, 100), np.float32) + 0.1, 16000), "cannot tell the channel axis"),
        ((ok.astype(np.complex64), 16000), "dtype complex64"),
        ((ok > 0, 16000), "dtype bool"),
        ((16000, ok), "not \\(sample_rate, wave\\)"),
        ((ok, 16000, 1), "got 3 items"),
        ((ok, 0), "positive whole number"),
        ((ok, -16000), "positive whole number"),
        ((ok, 22050.5), "positive whole number"),
        ((ok, "16000"), "positive whole number"),
        ((ok, True), "positive whole number"),
        ((ok, float("nan")), "positive whole number"),
    ]


def test_bad_inputs_raise_clear_errors(tmp_path):
    for x, message in _bad_inputs(tmp_path):
        with pytest.raises(AudioError, match=message):
            load_audio(x)


def test_bad_types_and_limits():
    with pytest.raises(TypeError, match="file path, an http"):
        load_audio(16000)
    with pytest.raises(TypeError, match="wave array"):
        load_audio(("ref.wav", 16000))
    long = np.tile(speech(16000), 31)[:61 * 16000]
    assert load_audio((long, 16000), max_seconds=None)[0].shape == (61 * 16000,)
    assert load_audio((speech(16000)[:1280], 16000))[0].shape == (1280,)   # 1920 at 24 kHz
    with pytest.raises(AudioError, match="the limit is 1.5 s"):
        load_audio((speech(16000), 16000), max_seconds=1.5)


# ----------------------------------------------------------------------------- speech out

def test_write_audio_picks_the_format_from_the_extension(tmp_path):
    """Each writable format round-trips through libsndfile at 24 kHz: wav and flac exactly to
    16 bits (values clipped to [-1, 1]), the lossy ones (mp3, opus, ogg/Vorbis) as a file of the
    same length whose spectrum peaks at the tone (their codec delays shift the samples)."""
    from qwen3_tts_jax.audio import output_formats, write_audio

    t = np.arange(24000) / 24000
    wave = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    wave[100] = 1.7                                     # clipped, not wrapped
    formats = output_formats()
    assert formats[:2] == ["wav", "flac"]
    for fmt in formats:
        path = tmp_path / f"speech.{fmt}"
        write_audio(str(path), wave, 24000)
        info = sf.info(str(path))
        assert info.samplerate == 24000 and info.channels == 1, (fmt, info)
        assert info.format == {"wav": "WAV", "flac": "FLAC", "mp3": "MP3", "opus": "OGG",
                               "ogg": "OGG"}[fmt]
        back, _ = sf.read(str(path), dtype="float32")
        if fmt in ("wav", "flac"):
            assert info.subtype == "PCM_16"
            want = np.round(np.clip(wave, -1, 1) * 32767) / 32768
            np.testing.assert_allclose(back, want, atol=1.5 / 32768)
        else:
            assert abs(len(back) - len(wave)) <= 2048, (fmt, len(back))
            spectrum = np.abs(np.fft.rfft(back[2400:21600]))
            assert abs(np.argmax(spectrum) * 24000 / 19200 - 440) < 5, fmt
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"speech.{f}" for f in formats)


def test_write_audio_refuses_unknown_extensions_before_writing(tmp_path):
    from qwen3_tts_jax.audio import format_for_path, write_audio

    assert format_for_path("a/B.FLAC") == "flac" and format_for_path("x.ogg") == "ogg"
    for name, needle in (("x.aiff", "'.aiff' is not an audio format"),
                         ("x", "has no extension"), ("x.wav.txt", "'.txt'")):
        with pytest.raises(AudioError, match=needle) as e:
            write_audio(str(tmp_path / name), np.zeros(10, np.float32), 24000)
        assert ".wav, .flac" in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_write_audio_temp_files_are_hidden_parts(tmp_path, monkeypatch):
    """Atomic: the bytes go to ".NAME.XXXX.part" and are renamed, so a killed writer never leaves
    a file that looks finished; an empty wave is written as one silent sample."""
    import os

    from qwen3_tts_jax.audio import write_audio

    seen, real = [], os.replace

    def spy(src, dst):
        seen.append(os.path.basename(src))
        real(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    write_audio(str(tmp_path / "x.wav"), np.zeros(240, np.float32), 24000)
    write_audio(str(tmp_path / "e.flac"), np.zeros(0, np.float32), 24000)
    assert seen[0].startswith(".x.wav.") and seen[0].endswith(".part")
    assert sorted(os.listdir(tmp_path)) == ["e.flac", "x.wav"]
    assert sf.info(str(tmp_path / "e.flac")).frames == 1
