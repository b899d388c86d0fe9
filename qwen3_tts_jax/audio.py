"""Reference audio in: reading every input form the official wrapper accepts (W:188-265), mono
mixdown, checks, and resampling to the speaker encoder's 24 kHz exactly as the official
`create_voice_clone_prompt` does (`librosa.resample`, i.e. soxr "soxr_hq", W:440-444); and speech
out: `write_audio` (atomic, the format from the file name) and `encode_audio_file`. Host-side numpy.

Input forms (`load_audio`):
  - a file path: anything libsndfile reads (WAV, FLAC, OGG/Vorbis, MP3, AIFF, ...);
  - an http(s) URL (downloaded with a timeout);
  - base64 audio file bytes, bare or as a data URL ("data:audio/wav;base64,...");
  - a `(wave, sample_rate)` tuple; a bare array raises (it has no sample rate), like the official.

Decisions where the official is silent or fragile:
  - Array layouts. Files come from libsndfile as (samples, channels) and, like the official, are
    averaged over channels. For arrays the official averages over the last axis only in code that
    cannot run (it assigns into a tuple: TypeError), so 2-D arrays are ours to define: the axis with
    at most MAX_CHANNELS entries is the channel axis, in either position, (samples, channels) as
    soundfile gives or (channels, samples) as torchaudio / librosa give; a shape where both or
    neither axis could be channels is rejected rather than guessed.
  - Integer arrays are PCM: scaled to [-1, 1) by their full scale, as libsndfile does for the same
    samples read from a file. (The official casts them to float unscaled, so int16 audio would reach
    the speaker encoder 32768x too loud.) Float arrays are used as they are, not normalised: the
    x-vector depends on the level, and the official only warns above 1.0 (so do we).
  - Length limits: at least one codec frame, 1920 samples at 24 kHz (0.08 s: less cannot describe a
    voice, and the speaker encoder's reflect paddings alone need 1280 samples), at most MAX_SECONDS
    = 60 s by default. The official has no limit. Ours exists because in voice-clone (ICL) mode all
    the reference's codes (12.5 per second) go into the talker prompt and are decoded again with the
    output before being cut off, so a long clip costs a long prompt and decoding, while the x-vector
    is a pooled statistic that a few seconds already determine; 60 s leaves room for any sensible
    reference and catches a whole recording passed by mistake before it is decoded (files are
    checked from their header).
"""
from __future__ import annotations

import base64
import binascii
import io
import math
import numbers
import os
import re
import urllib.error
import urllib.parse
import urllib.request
import tempfile
import warnings

import numpy as np
import soundfile as sf
import soxr

SPEAKER_ENCODER_RATE = 24000
MIN_SAMPLES_24K = 1920        # one 12.5 Hz codec frame at 24 kHz
MAX_SECONDS = 60.0
MAX_CHANNELS = 8
MAX_DECODED_SAMPLES = 1 << 24   # frames x channels a length-limited file read may decode
SILENCE_PEAK = 1e-6           # below this peak amplitude a clip carries no voice
URL_TIMEOUT_S = 30.0
MAX_DOWNLOAD_BYTES = 256 * 2 ** 20
RESAMPLE_QUALITY = "soxr_hq"  # librosa.resample's default res_type, which the official uses

_BASE64 = re.compile(r"[A-Za-z0-9+/]+={0,2}")


class AudioError(ValueError):
    """Reference audio that cannot be used; the message says why and what to pass instead."""


class AudioTooLong(AudioError):
    """Reference audio over the length limit (found from the file's header where it has one)."""


def load_audio(audio, max_seconds: float | None = MAX_SECONDS) -> tuple[np.ndarray, int]:
    """Any accepted input form -> (mono float32 wave (N,), sample rate), checked: readable, not
    empty, finite, not silent, at least 0.08 s and at most `max_seconds` (None: no upper limit).

    >>> wave, sr = load_audio("speaker.wav")
    >>> wave, sr = load_audio((stereo_2xN, 44100))
    >>> wave_24k = resample(wave, sr, 24000)
    """
    if isinstance(audio, str):
        wave, sr, what = _load_string(audio, max_seconds)
    elif isinstance(audio, tuple):
        wave, sr = _from_tuple(audio)
        what = "the audio array"
    elif isinstance(audio, np.ndarray):
        raise AudioError("a bare array has no sample rate: pass a tuple (wave, sample_rate)")
    else:
        raise TypeError(f"unsupported audio input {type(audio).__name__}: pass a file path, an "
                        f"http(s) URL, base64 audio, or a tuple (wave, sample_rate)")
    _check(wave, sr, what, max_seconds)
    return wave, sr


def resample(wave, sr_in: int, sr_out: int) -> np.ndarray:
    """float32 wave at sr_in -> sr_out: `librosa.resample(wave, orig_sr=sr_in, target_sr=sr_out)`
    (soxr_hq, length ceil(N sr_out / sr_in), zero-padded or trimmed to it) to the last bit, without
    librosa. The input is cast to float32 first, as the official does."""
    wave = np.ascontiguousarray(wave, dtype=np.float32)
    if wave.ndim != 1:
        raise AudioError(f"resample takes a mono wave (N,); got shape {wave.shape}")
    sr_in, sr_out = _sample_rate(sr_in), _sample_rate(sr_out)
    if sr_in == sr_out:
        return wave
    n_out = int(np.ceil(wave.shape[0] * (float(sr_out) / sr_in)))
    out = soxr.resample(wave, sr_in, sr_out, quality=RESAMPLE_QUALITY)
    if out.shape[0] >= n_out:
        return out[:n_out]
    return np.pad(out, (0, n_out - out.shape[0]))


def to_mono(samples) -> np.ndarray:
    """(N,), (N, C) or (C, N) with C <= MAX_CHANNELS -> (N,) float32, the mean over channels."""
    samples = _as_float32(samples)
    if samples.ndim == 1:
        return samples
    if samples.ndim != 2:
        raise AudioError(f"audio arrays must be (samples,), (samples, channels) or "
                         f"(channels, samples); got shape {samples.shape}")
    rows, cols = samples.shape
    if cols <= MAX_CHANNELS < rows:
        return np.mean(samples, axis=-1)
    if rows <= MAX_CHANNELS < cols:
        return np.mean(samples, axis=0)
    raise AudioError(f"cannot tell the channel axis of an audio array of shape {samples.shape}: "
                     f"pass (samples,), (samples, channels) or (channels, samples) with at most "
                     f"{MAX_CHANNELS} channels and more samples than that")


# ----------------------------------------------------------------------------- input forms

def _describe(s: str) -> str:
    return repr(s) if len(s) <= 80 else f"{s[:40]!r}... ({len(s)} characters)"


def _is_url(s: str) -> bool:
    u = urllib.parse.urlparse(s)
    return u.scheme in ("http", "https") and bool(u.netloc)


def _load_string(s: str, max_seconds) -> tuple[np.ndarray, int, str]:
    """(mono wave, sr, how to name the source in messages)."""
    path = os.path.expanduser(s)
    if _is_url(s):
        source, what = io.BytesIO(_download(s)), f"the audio downloaded from {s}"
    elif s.startswith("data:"):
        head, sep, payload = s.partition(",")
        if not sep or not head.endswith(";base64"):
            raise AudioError(f"data URL {_describe(s)} is not base64: expected "
                             f"'data:audio/<type>;base64,<data>'")
        source, what = io.BytesIO(_b64decode(payload, "the data URL")), "the data URL audio"
    elif os.path.isfile(path):
        source, what = path, f"audio file {s!r}"
    # Base64 may contain '/', so unlike the official, a string is a path first if the file exists.
    elif len(s) > 256 and _BASE64.fullmatch("".join(s.split())):
        source, what = io.BytesIO(_b64decode(s, "the base64 string")), "the base64 audio"
    elif os.path.isdir(path):
        raise AudioError(f"{s!r} is a folder, not an audio file")
    else:
        raise AudioError(f"audio file {_describe(s)} does not exist (strings are read as a file "
                         f"path, an http(s) URL, a data: URL or base64 audio)")
    return (*_read(source, what, max_seconds), what)


def _download(url: str) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=URL_TIMEOUT_S) as resp:
            data = resp.read(MAX_DOWNLOAD_BYTES + 1)
    except urllib.error.HTTPError as e:
        raise AudioError(f"could not download {url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:  # offline, refused, DNS, timeout
        reason = getattr(e, "reason", e)
        raise AudioError(f"could not download {url}: {reason}. Without network access, download "
                         f"the file elsewhere and pass its local path") from None
    if len(data) > MAX_DOWNLOAD_BYTES:
        raise AudioError(f"{url} is larger than {MAX_DOWNLOAD_BYTES // 2 ** 20} MiB: not a "
                         f"reference clip")
    return data


def inline_bytes(s: str, what: str = "the audio") -> bytes:
    """The file bytes of audio given inline, as a data URL ("data:audio/wav;base64,...") or bare
    base64: never a path or a URL (what a server takes from a client: it reads no file and
    fetches nothing for one). AudioError names what is wrong."""
    if s.startswith("data:"):
        head, sep, payload = s.partition(",")
        if not sep or not head.endswith(";base64"):
            raise AudioError(f"{what} is a data URL that is not base64: expected "
                             f"'data:audio/<type>;base64,<data>'")
        return _b64decode(payload, what)
    if _is_url(s) or not _BASE64.fullmatch("".join(s.split())):
        raise AudioError(f"{what} must be base64 audio file bytes, bare or as a data URL "
                         f"('data:audio/wav;base64,...'); paths and URLs are not read here, got "
                         f"{_describe(s)}")
    return _b64decode(s, what)


def _b64decode(s: str, what: str) -> bytes:
    try:
        return base64.b64decode("".join(s.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise AudioError(f"{what} is not valid base64 ({e})") from None


def read_file(source, what: str = "the audio", max_seconds: float | None = MAX_SECONDS
              ) -> tuple[np.ndarray, int]:
    """A file libsndfile reads (a path or a binary file object) -> ((frames, channels) float32,
    sample rate), integer formats scaled to [-1, 1). With `max_seconds`, the length is checked
    from the header before anything is decoded (AudioTooLong), and so is the work the header
    promises (frames x channels at most MAX_DECODED_SAMPLES: a small compressed file of hours of
    silence, or a header with an absurd sample rate, is refused undecoded); the decode itself
    reads at most max_seconds of frames, so a header that lies about its length costs no more."""
    try:
        info = sf.info(source)
        if hasattr(source, "seek"):
            source.seek(0)
        limit = None
        if max_seconds is not None:
            limit = int(max_seconds * info.samplerate)
            if info.frames > limit:
                raise AudioTooLong(f"{what} is {_seconds(info.frames, info.samplerate)} long; "
                                   f"the limit is {max_seconds:g} s (trim it to the part with "
                                   f"the voice)")
            if limit * info.channels > MAX_DECODED_SAMPLES:
                raise AudioTooLong(f"{what} has {info.channels} channel(s) at "
                                   f"{info.samplerate} Hz: {max_seconds:g} s of it is more than "
                                   f"{MAX_DECODED_SAMPLES} samples to decode")
        with sf.SoundFile(source) as f:
            samples = f.read(-1 if limit is None else limit + 1, dtype="float32",
                             always_2d=True)
            sr = f.samplerate
    except AudioError:
        raise
    except Exception as e:  # noqa: BLE001 - libsndfile: "Format not recognised", "System error", ...
        reason = getattr(e, "error_string", None) or str(e)   # not the repr of a file object
        raise AudioError(f"cannot read {what}: {reason} (readable formats: WAV, FLAC, OGG, MP3 "
                         f"and the others libsndfile knows)") from None
    if limit is not None and samples.shape[0] > limit:
        raise AudioTooLong(f"{what} is longer than its header says, over the limit of "
                           f"{max_seconds:g} s (trim it to the part with the voice)")
    return samples, int(sr)


def _seconds(frames: int, sr: int) -> str:
    return f"{frames / sr:.1f} s" if frames < 2 ** 62 else "of unknown length (no length given)"


def _read(source, what: str, max_seconds) -> tuple[np.ndarray, int]:
    """libsndfile -> mono float32 (`read_file`)."""
    samples, sr = read_file(source, what, max_seconds)
    return np.mean(samples, axis=-1), sr


def _from_tuple(t: tuple) -> tuple[np.ndarray, int]:
    if len(t) != 2:
        raise AudioError(f"audio tuples are (wave, sample_rate); got {len(t)} items")
    wave, sr = t
    if np.isscalar(wave) and not np.isscalar(sr):
        raise AudioError("audio tuples are (wave, sample_rate), not (sample_rate, wave)")
    if isinstance(wave, (str, bytes)):
        raise TypeError("audio tuples are (wave array, sample_rate)")
    return to_mono(wave), _sample_rate(sr)


def _as_float32(samples) -> np.ndarray:
    a = np.asarray(samples)
    if a.dtype.kind == "f":
        return a.astype(np.float32, copy=False)
    if a.dtype.kind in "iu":
        half = 2.0 ** (8 * a.dtype.itemsize - 1)
        # Unsigned PCM (8-bit WAV) is offset by half its range.
        offset = half if a.dtype.kind == "u" else 0.0
        return ((a.astype(np.float64) - offset) / half).astype(np.float32)
    raise AudioError(f"audio arrays must hold float or integer PCM samples; got dtype {a.dtype}")


def _sample_rate(sr) -> int:
    if (isinstance(sr, (bool, np.bool_)) or not isinstance(sr, numbers.Real)
            or not math.isfinite(sr) or sr != int(sr) or sr <= 0):
        raise AudioError(f"the sample rate must be a positive whole number of Hz; got {sr!r}")
    return int(sr)


def _check(wave: np.ndarray, sr: int, what: str, max_seconds) -> None:
    n = wave.shape[0]
    if n == 0:
        raise AudioError(f"{what} is empty")
    if not np.all(np.isfinite(wave)):
        bad = int(np.flatnonzero(~np.isfinite(wave))[0])
        raise AudioError(f"{what} has NaN or infinite samples (the first at sample {bad})")
    # Compared in integers: the 24 kHz length is ceil(n * 24000 / sr) (see `resample`).
    if n * SPEAKER_ENCODER_RATE <= (MIN_SAMPLES_24K - 1) * sr:
        raise AudioError(f"{what} is {n / sr:.3f} s long; a reference needs at least "
                         f"{MIN_SAMPLES_24K / SPEAKER_ENCODER_RATE:g} s (one codec frame)")
    if max_seconds is not None and n > max_seconds * sr:
        raise AudioError(f"{what} is {n / sr:.1f} s long; the limit is {max_seconds:g} s "
                         f"(trim it to the part with the voice)")
    peak = float(np.max(np.abs(wave)))
    if peak < SILENCE_PEAK:
        raise AudioError(f"{what} is silent (peak amplitude {peak:.2g})")
    if peak > 1.0:
        warnings.warn(f"{what} peaks at {peak:.3g}, above 1.0: used unscaled, like the official "
                      f"(if it holds integer PCM as floats, divide it by 32768)", stacklevel=3)


# ----------------------------------------------------------------------------- speech out
# Output formats: name -> (libsndfile major format, subtype). 16-bit PCM for the lossless ones, as
# the official demos write (soundfile's WAV default); the lossy ones at libsndfile's default quality.
OUTPUT_FORMATS = {"wav": ("WAV", "PCM_16"), "flac": ("FLAC", "PCM_16"),
                  "mp3": ("MP3", "MPEG_LAYER_III"), "opus": ("OGG", "OPUS"),
                  "ogg": ("OGG", "VORBIS")}
EXTENSIONS = {".wav": "wav", ".flac": "flac", ".mp3": "mp3", ".opus": "opus", ".ogg": "ogg"}


def output_formats() -> list[str]:
    """The formats of OUTPUT_FORMATS that this libsndfile can write (wav always; flac, mp3, opus
    and ogg (Vorbis) by build: mp3 needs libsndfile >= 1.1)."""
    have = sf.available_formats()
    out = []
    for name, (major, subtype) in OUTPUT_FORMATS.items():
        if major == "WAV" or (major in have and subtype in sf.available_subtypes(major)):
            out.append(name)
    return out


def format_for_path(path: str) -> str:
    """The output format a file name asks for (its extension), checked against what this
    libsndfile writes: an unknown or unwritable extension is an AudioError naming the choices."""
    ext = os.path.splitext(path)[1].lower()
    fmt = EXTENSIONS.get(ext)
    formats = output_formats()
    if fmt is None or fmt not in formats:
        names = ", ".join(f".{f}" for f in formats)
        what = (f"{ext!r} is not an audio format this installation writes" if ext
                else "the file name has no extension to pick the audio format")
        raise AudioError(f"cannot write {path}: {what} (choose one of {names})")
    return fmt


def encode_audio_file(wave, sample_rate: int, fmt: str) -> bytes:
    """A mono float32 wave -> the bytes of a whole file in `fmt` (a key of OUTPUT_FORMATS),
    clipped to [-1, 1]. An empty wave becomes one silent sample (encoders refuse empty files)."""
    wave = np.clip(np.asarray(wave, np.float32).reshape(-1), -1.0, 1.0)
    if wave.size == 0:
        wave = np.zeros(1, np.float32)
    major, subtype = OUTPUT_FORMATS[fmt]
    buf = io.BytesIO()
    sf.write(buf, wave, sample_rate, format=major, subtype=subtype)
    return buf.getvalue()


# The names of `write_audio`'s temp files: ".NAME.XXXXXXXX.part" for the file NAME (`tempfile`'s
# random part); the group "name" is the finished file's name.
PART_FILE = re.compile(r"\.(?P<name>.+)\.[a-z0-9_]+\.part")


def write_audio(path: str, wave, sample_rate: int, fmt: str | None = None) -> None:
    """Write a speech file atomically and durably: the bytes go to a hidden temp file in the same
    folder (`PART_FILE`, so that one left behind by a killed process is never taken for a finished
    file), flushed to the disk (fsync), then a rename, and the folder synced where the OS allows,
    so that after a crash the file exists whole or not at all. `fmt` defaults to the format the
    extension names (`format_for_path`)."""
    fmt = fmt or format_for_path(path)
    data = encode_audio_file(wave, sample_rate, fmt)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".part", dir=folder)
    umask = os.umask(0)                 # read it (there is no getter) and put it back at once
    os.umask(umask)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())        # the bytes on the disk before the rename names them
        # mkstemp makes the file 0600; a finished audio file gets the usual 0666 & ~umask
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:                                # the rename itself on the disk (the folder's entry)
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:                     # Windows: a folder cannot be opened
        return
    try:
        os.fsync(dir_fd)
    except OSError:                     # file systems that cannot sync a folder
        pass
    finally:
        os.close(dir_fd)
