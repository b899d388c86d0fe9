"""`SpeechTokenizer`: load the 12 Hz speech tokenizer and decode codes to 24 kHz audio (the official
`Qwen3TTSTokenizer` wrapper, WT, and `Qwen3TTSTokenizerV2Model.decode`, TM:993-1024).

Host side: input checking, -1 padding, the official chunking, shape buckets, trimming. The numbers
come from one jitted pure function, `decoder.jit_decode`, run once per window.

Chunks. The official `decode` always runs `chunked_decode` (TM:886-896): chunks of 300 frames, each
decoded on its own (positions from 0) with 25 frames of left context whose samples are dropped. We
decode each chunk's window with the same jitted program and concatenate; the windows are independent,
so they are dispatched back to back without waiting (no host sync until the result is read), and the
program's memory is one window's (~325 frames) whatever the length of the audio: `bucketed_decode`.

Shape buckets. jit compiles a program per input shape, so a window of W frames is padded on the right
to the next of 16, 24, 32, 48, 64, 96, 128, 192, 256 (powers of two and 1.5x powers of two, at most
+50 % work), or to 325 = 300 + 25 (every full chunk), and its output trimmed; exact because the
decoder is causal (see decoder.py). Every length, however long, runs on these ten programs per batch
size: a full chunk is one exact 325-frame window (the first chunk, 300 frames with no context, is
padded to 325), only the last chunk is rounded up. Whole-utterance decoding (`chunk_size=None`) pads
T to the unbounded ladder (384, 512, 768, ...). The batch size is not bucketed: padding rows would
cost full decoder work for every missing item.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import sys

import jax.numpy as jnp
import numpy as np

from ..weights import (CheckpointError, apply_transforms, expected_ours, file_metadata, load_official,
                       load_params, safetensors_files, save_params, without_transforms)
from .. import audio
from ..buckets import ladder
from ..config import ConfigError
from . import decoder, encoder
from .streaming import PrefixStates, StreamDecoder
from .config import DecoderConfig, SpeechTokenizerConfig, load_config

CHUNK_SIZE = 300          # official `chunked_decode` defaults (TM:886)
LEFT_CONTEXT = 25
PARAMS_FILE = "params.safetensors"
ENCODER_PARAMS_FILE = "encoder_params.safetensors"   # our fast-loading form, written by `save_converted`
# PARAMS_FILE's "format": v2 stores the vocoder's conv weights in kernel layout (decoder.RULES'
# "conv" and "polyphase" transforms); the first form (no version) kept them in the torch layout,
# and is converted when loaded.
DECODER_FORMAT = "qwen3_tts_jax.codec.decoder v2"
_V1_TRANSFORMS = ("conv", "polyphase1", "polyphase2")
MIN_BUCKET = 16


def frame_bucket(num_frames: int, cap: int | None = CHUNK_SIZE + LEFT_CONTEXT) -> int:
    """The padded length a window of `num_frames` frames runs with: the next of 16, 24, 32, 48, 64,
    ... (powers of two and 1.5x powers of two), but at most `cap` (the full-chunk window)."""
    b = ladder(num_frames, MIN_BUCKET)
    return b if cap is None else min(b, cap)


def chunk_plan(num_frames: int, chunk_size: int, left_context: int) -> list[tuple[int, int, int]]:
    """(start, stop, context) of each chunk, exactly as the official `chunked_decode` loop."""
    plan, start = [], 0
    while start < num_frames:
        stop = min(start + chunk_size, num_frames)
        plan.append((start, stop, left_context if start - left_context > 0 else start))
        start = stop
    return plan


def bucketed_decode(params, cfg: DecoderConfig, codes_BxTxQ: np.ndarray,
                    chunk_size: int | None = CHUNK_SIZE,
                    left_context: int = LEFT_CONTEXT, executables=None) -> np.ndarray:
    """The official `Decoder.chunked_decode`, window by window with bucketed window lengths (see
    the module docstring): codes (B, T, Q) in [0, codebook_size) -> waveform (B, T * total_upsample)
    float32. chunk_size=None decodes the whole utterance in one window (the official
    `Decoder.forward`; memory grows with T). `executables`: a `compilation_cache.Executables`
    to run the program through (serialized), or None (jit)."""
    run = decoder.jit_decode if executables is None else executables.wrap(
        decoder.jit_decode, "codec_decode", ("cfg",))
    B, T, Q = codes_BxTxQ.shape
    up = cfg.total_upsample
    if chunk_size is None:
        plan, cap = [(0, T, 0)], None
    else:
        plan, cap = chunk_plan(T, chunk_size, left_context), chunk_size + left_context
    pending = []
    for start, stop, ctx in plan:
        frames = stop - start + ctx
        window = np.zeros((B, frame_bucket(frames, cap), Q), np.int32)
        window[:, :frames] = codes_BxTxQ[:, start - ctx:stop]
        pending.append((run(params, cfg, jnp.asarray(window)), ctx * up,
                        (stop - start) * up))
    return np.concatenate([np.asarray(w)[:, keep:keep + n] for w, keep, n in pending], axis=1)


def decode_padded(params, cfg: SpeechTokenizerConfig, codes_BxTxQ: np.ndarray,
                  chunk_size: int | None = CHUNK_SIZE, executables=None) -> list[np.ndarray]:
    """The official `Qwen3TTSTokenizerV2Model.decode`: codes (B, T, Q) padded with -1 -> one float32
    waveform per item, of (#frames with code0 > -1) * decode_upsample_rate samples. Values must
    already be checked (`check_codes`)."""
    lengths_B = (codes_BxTxQ[..., 0] > -1).sum(1) * cfg.decode_upsample_rate
    wave_BxS = bucketed_decode(params, cfg.decoder, np.maximum(codes_BxTxQ, 0), chunk_size,
                               executables=executables)
    return [wave_BxS[b, :n].copy() for b, n in enumerate(lengths_B)]


def _describe(x) -> str:
    return f"array of shape {x.shape} and dtype {x.dtype}" if isinstance(x, np.ndarray) else repr(x)


def _as_codes(x, what: str, num_quantizers: int) -> np.ndarray:
    try:
        a = np.asarray(x)
    except Exception as e:
        raise ValueError(f"{what}: cannot be read as an array of codes ({e})") from e
    if a.dtype == object or not (np.issubdtype(a.dtype, np.integer)
                                 or np.issubdtype(a.dtype, np.floating)):
        raise ValueError(f"{what}: codes must be integers, got {_describe(a)} "
                         "(ragged nested lists? pass a list of (frames, 16) arrays)")
    if np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all():
            raise ValueError(f"{what}: codes contain NaN or infinity")
        if (a != np.round(a)).any():
            raise ValueError(f"{what}: codes must be whole numbers, got non-integer values "
                             "(pass the integer codes, not embeddings or probabilities)")
    if a.ndim == 0 or a.shape[-1] != num_quantizers:
        hint = ""
        if a.ndim >= 2 and a.shape[-2] == num_quantizers:
            hint = f"; did you pass (..., {num_quantizers}, frames)? transpose the last two axes"
        raise ValueError(f"{what}: codes must have {num_quantizers} codebooks in the last axis, "
                         f"(frames, {num_quantizers}); got shape {a.shape}{hint}")
    return a.astype(np.int64)


def check_codes(encoded, num_quantizers: int = 16, codebook_size: int = 2048) -> np.ndarray:
    """Accept what the official `Qwen3TTSTokenizer.decode` accepts and return (B, T, Q) int32 codes
    padded with -1:
    - an object with `.audio_codes`, a dict {"audio_codes": ...} or a list of such dicts;
    - codes as a (T, Q) array (one utterance; numpy, jax or nested lists), a (B, T, Q) array (a
      batch, possibly padded with -1 frames at the end), or a list of (T_i, Q) arrays.
    Raises ValueError naming the problem otherwise."""
    if hasattr(encoded, "audio_codes"):
        encoded = encoded.audio_codes
    elif isinstance(encoded, dict):
        if "audio_codes" not in encoded:
            raise ValueError(f"a dict of codes needs an 'audio_codes' key; got keys {list(encoded)}")
        encoded = encoded["audio_codes"]
    elif isinstance(encoded, (list, tuple)) and encoded and all(isinstance(e, dict)
                                                                for e in encoded):
        if not all("audio_codes" in e for e in encoded):
            raise ValueError("every dict in the list needs an 'audio_codes' key")
        encoded = [e["audio_codes"] for e in encoded]

    if isinstance(encoded, (list, tuple)) and encoded and all(np.ndim(c) == 1 for c in encoded):
        encoded = _as_codes(encoded, "codes", num_quantizers)   # one (T, Q) array as nested lists
    if isinstance(encoded, (list, tuple)):
        if not encoded:
            raise ValueError("no codes to decode: the list is empty")
        items = [_as_codes(c, f"item {i}", num_quantizers) for i, c in enumerate(encoded)]
        for i, c in enumerate(items):
            if c.ndim != 2:
                raise ValueError(f"item {i}: each item of a list must be (frames, "
                                 f"{num_quantizers}); got shape {c.shape}")
        codes = np.full((len(items), max(len(c) for c in items), num_quantizers), -1, np.int64)
        for i, c in enumerate(items):
            codes[i, :len(c)] = c
    else:
        codes = _as_codes(encoded, "codes", num_quantizers)
        if codes.ndim == 2:
            codes = codes[None]
        if codes.ndim != 3:
            raise ValueError(f"codes must be (frames, {num_quantizers}) or (batch, frames, "
                             f"{num_quantizers}); got shape {codes.shape}")

    if codes.shape[0] == 0 or codes.shape[1] == 0:
        raise ValueError(f"no codes to decode: shape {codes.shape}")
    # Padding = trailing frames whose codes are all -1 (what pad_sequence(padding_value=-1) makes).
    pad_BxT = (codes == -1).all(-1)
    trailing_BxT = np.flip(np.cumprod(np.flip(pad_BxT, 1), 1), 1).astype(bool)
    bad = ~trailing_BxT[..., None] & ((codes < 0) | (codes >= codebook_size))
    if bad.any():
        b, t, q = (int(i) for i in np.argwhere(bad)[0])
        v = codes[b, t, q]
        why = ("-1 is only allowed as padding: whole frames at the end of an item" if v == -1
               else f"codes must be in [0, {codebook_size})")
        if codebook_size <= v < codebook_size + 1024:
            why += " (talker control ids such as EOS must be removed first)"
        raise ValueError(f"code {v} at item {b}, frame {t}, codebook {q}: {why}")
    if trailing_BxT.all():
        raise ValueError("no codes to decode: every frame is -1 padding")
    return codes.astype(np.int32)


def _is_hub_id(s: str) -> bool:
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", s)) and not s.startswith((".", "/"))


def _download(repo_id: str, revision: str | None, cache_dir: str | None) -> str:
    """Fetch only the speech tokenizer files: the repo root for a tokenizer repo, or the
    speech_tokenizer/ folder of a Qwen3-TTS model repo."""
    try:
        from huggingface_hub import snapshot_download

        kw = dict(repo_id=repo_id, revision=revision, cache_dir=cache_dir)
        root = snapshot_download(allow_patterns=["config.json", "speech_tokenizer/config.json"],
                                 **kw)
        sub = "speech_tokenizer/" if os.path.exists(
            os.path.join(root, "speech_tokenizer", "config.json")) else ""
        return snapshot_download(allow_patterns=[f"{sub}*.json", f"{sub}*.safetensors"], **kw)
    except Exception as e:
        raise OSError(
            f"could not get the speech tokenizer {repo_id!r} from the Hugging Face Hub "
            f"({type(e).__name__}: {e}). Download it where the Hub is reachable, e.g. "
            f"`huggingface-cli download {repo_id} --local-dir DIR` (for a Qwen3-TTS model repo, "
            "its speech_tokenizer/ folder is enough: config.json and model.safetensors), and pass "
            "that local DIR instead.") from e


def _resolve_folder(folder: str) -> str:
    """A Qwen3-TTS model folder holds the tokenizer in speech_tokenizer/."""
    sub = os.path.join(folder, "speech_tokenizer")
    if os.path.exists(os.path.join(sub, "config.json")):
        own = os.path.join(folder, "config.json")
        if not os.path.exists(own):
            return sub
        with open(own) as f:
            if "talker_config" in json.load(f):
                return sub
    return folder


def _load_decoder_params(folder: str, cfg: SpeechTokenizerConfig, precision: str):
    """The decoder's params from `folder` (params.safetensors when present, else the official
    safetensors), converted to our layout; packed for the bf16 kernel with precision "bf16"."""
    expected = decoder.expected_shapes(cfg.decoder)
    fast = os.path.join(folder, PARAMS_FILE)
    if os.path.exists(fast):
        if file_metadata(fast).get("format") == DECODER_FORMAT:
            params = load_params(fast, expected_ours(decoder.RULES, expected), jnp.float32,
                                 what=f"speech tokenizer {fast}")
        else:
            v1_rules = without_transforms(decoder.RULES, _V1_TRANSFORMS)
            params = apply_transforms(
                load_params(fast, expected_ours(v1_rules, expected), jnp.float32,
                            what=f"speech tokenizer {fast}"),
                decoder.RULES, expected, _V1_TRANSFORMS)
    else:
        files = safetensors_files(folder)
        params = load_official(files, decoder.RULES, expected, jnp.float32,
                               what=f"speech tokenizer decoder in {folder}", prefix="decoder.")
    return decoder.pack_bf16(params) if precision == "bf16" else params


def _cached_decoder_params(folder: str, cfg: SpeechTokenizerConfig, precision: str,
                           cache_dir: str):
    """`_load_decoder_params` through the weights cache (`checkpoint`'s cache files: atomic
    writes, the tree stored in the file, a stale or unreadable file loads the checkpoint). The
    key: the weight files by identity (path, size, modification time), the config, the
    precision and the source of the code that converts and packs."""
    from .. import checkpoint, cpu_kernels, weights
    from . import config as config_mod

    fast = os.path.join(folder, PARAMS_FILE)
    sources = [fast] if os.path.exists(fast) else safetensors_files(folder)
    h = hashlib.sha256()
    for f in sources:
        st = os.stat(f)
        h.update(f"{os.path.realpath(f)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    h.update(json.dumps([repr(cfg), precision, "codec decoder"]).encode())
    for m in (sys.modules[__name__], decoder, config_mod, weights, cpu_kernels, checkpoint):
        with open(m.__file__, "rb") as fh:
            h.update(fh.read())
    key = h.hexdigest()
    slot = hashlib.sha256(json.dumps([os.path.realpath(folder), precision]).encode())
    path = os.path.join(cache_dir, f"codec-{slot.hexdigest()[:20]}.safetensors")
    # the files written here always hold their tree: no abstract tree is needed to read them
    params = checkpoint.load_packed_cache(path, key, lambda: {})
    if params is not None:
        return params
    params = _load_decoder_params(folder, cfg, precision)
    try:
        checkpoint.save_packed_cache(params, path, key)
    except (OSError, ValueError) as e:   # read-only or full disk: run without the cache
        checkpoint.log.warning("weights cache: cannot write %s (%s)", path, e)
    return params


class SpeechTokenizer:
    """The Qwen3-TTS 12 Hz speech tokenizer (decoder), in JAX.

    >>> tok = SpeechTokenizer.from_pretrained("Qwen/Qwen3-TTS-Tokenizer-12Hz")
    >>> wavs, sr = tok.decode(codes_Tx16)           # or (B, T, 16), a list, {"audio_codes": ...}
    >>> wavs[0].shape, sr
    ((1920 * T,), 24000)
    """

    def __init__(self, params, config: SpeechTokenizerConfig, raw_config: dict | None = None,
                 folder: str | None = None, preprocessor: dict | None = None):
        self.params = params
        self.config = config
        self._raw_config = raw_config
        self._folder = folder
        self._preprocessor = preprocessor   # preprocessor_config.json (the feature extractor)
        self._encoder_params = None
        self.executables = None   # a `compilation_cache.Executables` for `decode`, or None: jit
        self.precision = "float32"   # the decoder's ("bf16": `decoder.pack_bf16`'d params)
        # the decoder's state after a cloned voice's reference codes, shared by this
        # tokenizer's stream decoders (`StreamDecoder`, `PrefixStates`)
        self.prefix_states = PrefixStates()
        self.encoder_config = encoder.parse_encoder_config(
            config.encoder_config, valid_num_quantizers=config.encoder_valid_num_quantizers,
            encode_downsample_rate=config.encode_downsample_rate)

    @property
    def encoder_params(self):
        """The Mimi encoder's params, loaded on first use (decoding never needs them)."""
        if self._encoder_params is None:
            if self._folder is None:
                raise CheckpointError("this SpeechTokenizer has no folder to load the encoder from")
            fast = os.path.join(self._folder, ENCODER_PARAMS_FILE)
            if os.path.exists(fast):
                self._encoder_params = load_params(
                    fast, encoder.expected_params(self.encoder_config), jnp.float32,
                    what=f"speech tokenizer encoder {fast}")
            else:
                self._encoder_params = encoder.load(
                    safetensors_files(self._folder), self.encoder_config, jnp.float32,
                    what=f"speech tokenizer encoder in {self._folder}")
        return self._encoder_params

    @property
    def sample_rate(self) -> int:
        return int(self.config.output_sample_rate)

    @property
    def input_sample_rate(self) -> int:
        """The rate `encode` resamples audio to: the official resamples to its feature extractor's
        `sampling_rate` (preprocessor_config.json; 24000 as released), else the encoder's rate."""
        rate = (self._preprocessor or {}).get("sampling_rate")
        return int(rate) if rate else int(self.encoder_config.sampling_rate)

    @classmethod
    def from_pretrained(cls, path: str, *, revision: str | None = None,
                        cache_dir: str | None = None,
                        precision: str = "float32",
                        weights_cache: str | None = None) -> "SpeechTokenizer":
        """Load from a local folder (config.json + model.safetensors, or our fast form
        params.safetensors, which is preferred when present; a Qwen3-TTS model folder works too:
        its speech_tokenizer/ is used) or from a Hugging Face Hub id. Float32 params.

        `precision="bf16"`: the decoder's convolutions run on the CPU's AVX-512 BF16 dot
        products (`decoder.pack_bf16`: inputs and weights rounded to bf16, float32 sums;
        faster, not the float32 audio: benchmarks/RESULTS.md, "bf16 codec"); a ValueError where
        the backend is not the CPU or the CPU lacks AVX512_BF16. Default "float32".

        `weights_cache`: a folder where the decoder's params are kept in their converted form
        (and packed, for bf16) after the first load; a later load with the same files, config,
        precision and code reads them from there (`_cached_decoder_params`; one file per
        folder and precision). Default None: no cache.

        Raises FileNotFoundError / OSError when the files cannot be found or downloaded,
        ConfigError for a config.json we cannot run, CheckpointError when the tensors do not
        match it (listing every missing, unexpected or misshapen key)."""
        decoder.check_precision(precision)
        path = os.fspath(path)
        if not os.path.isdir(path):
            if os.path.exists(path) or not _is_hub_id(path):
                raise FileNotFoundError(f"{path!r} is neither a folder nor a Hugging Face Hub id "
                                        "like 'Qwen/Qwen3-TTS-Tokenizer-12Hz'")
            path = _download(path, revision, cache_dir)
        folder = _resolve_folder(path)
        cfg, raw = load_config(folder)
        try:    # the encoder's config too, before any tensor is read
            encoder.parse_encoder_config(
                cfg.encoder_config, valid_num_quantizers=cfg.encoder_valid_num_quantizers,
                encode_downsample_rate=cfg.encode_downsample_rate)
        except ConfigError as e:
            raise ConfigError(f"{os.path.join(folder, 'config.json')}: {e}") from None
        if weights_cache is None:
            params = _load_decoder_params(folder, cfg, precision)
        else:
            params = _cached_decoder_params(folder, cfg, precision, weights_cache)
        pre = os.path.join(folder, "preprocessor_config.json")
        preprocessor = None
        if os.path.exists(pre):
            try:
                with open(pre) as f:
                    preprocessor = json.load(f)
            except (OSError, ValueError) as e:
                raise ConfigError(f"{pre} cannot be read as JSON: {e}") from None
        tok = cls(params, cfg, raw, folder, preprocessor)
        tok.precision = precision
        return tok

    def save_converted(self, folder: str) -> None:
        """Write the fast-loading form: config.json + params.safetensors (our paths, float32).
        `from_pretrained(folder)` reads it back without conversion."""
        if self._raw_config is None:
            raise CheckpointError("this SpeechTokenizer was not loaded from a config.json; "
                                  "there is no config to save with the params")
        if self.precision != "float32":
            raise CheckpointError("save_converted writes the float32 decoder: load the tokenizer "
                                  "with precision='float32' (this one's weights are rounded to "
                                  f"{self.precision})")
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(self._raw_config, f, indent=2)
        if self._preprocessor is not None:
            with open(os.path.join(folder, "preprocessor_config.json"), "w") as f:
                json.dump(self._preprocessor, f, indent=2)
        save_params(self.params, os.path.join(folder, PARAMS_FILE),
                    metadata={"format": DECODER_FORMAT})
        try:
            enc = self.encoder_params
        except CheckpointError:  # a decode-only codec (e.g. the random-weight demo)
            enc = None
        if enc is not None:
            save_params(enc, os.path.join(folder, ENCODER_PARAMS_FILE),
                        metadata={"format": "qwen3_tts_jax.codec.encoder"})

    def encode(self, audios, sr: int | None = None) -> list[np.ndarray]:
        """Audio -> codes, like the official `Qwen3TTSTokenizer.encode(audios, sr)`: a numpy wave
        (needs `sr`), a path / URL / base64 string, a (wave, sr) tuple, or a list of these ->
        one (ceil(samples_24k / 1920), 16) int32 array each; `tok.decode(tok.encode(x))` works.

        >>> codes = tok.encode("ref.wav")[0]
        """
        return encode_audio(self.encoder_params, self.encoder_config, audios, sr,
                                    self.input_sample_rate)

    def decode(self, encoded, *, chunk_size: int | None = CHUNK_SIZE
               ) -> tuple[list[np.ndarray], int]:
        """Codes -> (list of float32 waveforms, 24000), like the official `Qwen3TTSTokenizer.decode`.

        `encoded`: a (T, 16) or (B, T, 16) integer array (a batch may end items with all -1
        frames: padding), a list of (T_i, 16) arrays, {"audio_codes": ...} or a list of such dicts.
        Each waveform has 1920 samples per (non-padding) frame. The default is the official
        computation (300-frame chunks with 25 frames of left context); chunk_size=None decodes each
        utterance in one piece (the same up to 300 frames; memory grows with the length)."""
        d = self.config.decoder
        codes = check_codes(encoded, d.num_quantizers, d.codebook_size)
        return decode_padded(self.params, self.config, codes, chunk_size,
                             self.executables), self.sample_rate

    def stream_decoder(self, batch: int = 1, *, chunk_size: int | None = CHUNK_SIZE
                       ) -> StreamDecoder:
        """A `StreamDecoder` for `batch` streams: codes pushed as they come, audio of the new
        frames back, together equal to `decode` of the whole stream (same `chunk_size`).

        >>> dec = tok.stream_decoder()
        >>> for codes in chunks: play(dec.push([codes])[0])
        """
        return StreamDecoder(self.params, self.config.decoder, batch, chunk_size, LEFT_CONTEXT,
                             prefix_states=self.prefix_states)


def prepare_audio(audios, sr: int | None, target_sr: int) -> list[np.ndarray]:
    """What the official `Qwen3TTSTokenizer._normalize_audio_inputs` (WT:160-206) makes of the
    inputs, reusing `audio.py`: a numpy waveform (with `sr`), a path / URL / base64 string or a
    (wave, sample_rate) tuple (`audio.load_audio`), or a list of those -> 1-D float32 waveforms at
    `target_sr`, channels averaged (`audio.to_mono`), resampled like librosa (`audio.resample`).

    Differences, all for inputs the official mishandles: the kinds may be mixed in one list, 2-D
    arrays may be (channels, samples) too, integer arrays are scaled as PCM, and strings go through
    `audio.load_audio`'s checks (readable, not silent, >= 0.08 s; no length limit here)."""
    if isinstance(audios, (str, np.ndarray)) or (
            isinstance(audios, tuple) and len(audios) == 2 and np.isscalar(audios[1])):
        audios = [audios]
    audios = list(audios)
    if not audios:
        raise ValueError("no audio to encode: the list is empty")
    out = []
    for i, a in enumerate(audios):
        if isinstance(a, np.ndarray):
            if sr is None:
                raise ValueError("numpy waveforms need their sampling rate: encode(audios, sr=...)"
                                 " (or pass (wave, sample_rate) tuples)")
            wave, a_sr = audio.to_mono(a), sr
        else:
            wave, a_sr = audio.load_audio(a, max_seconds=None)
        if wave.size == 0 or not np.isfinite(wave).all():
            raise ValueError(f"audio {i} is empty or has NaN or infinite samples")
        out.append(audio.resample(wave, a_sr, target_sr))
    return out


def encode_audio(params, cfg: encoder.EncoderConfig, audios, sr: int | None = None,
                 target_sr: int | None = None) -> list[np.ndarray]:
    """The official `Qwen3TTSTokenizer.encode(audios, sr)` of the 12 Hz tokenizer: `prepare_audio`,
    the feature extractor's right zero padding (`pad_batch`) and `encode`. One (frames, 16) int32
    array per input, frames = ceil(samples at 24 kHz / 1920). Inputs are resampled to `target_sr`,
    the feature extractor's rate (preprocessor_config.json; default: the encoder's own rate).

    >>> codes = encode_audio(params, cfg, [wave_16k, wave2_16k], sr=16000)
    >>> codes = encode_audio(params, cfg, "reference.wav")    # or a URL, base64, (wave, sr)
    """
    target = target_sr or cfg.sampling_rate   # the feature extractor's rate (`SpeechTokenizer`)
    return encoder.encode(params, cfg, *encoder.pad_batch(prepare_audio(audios, sr, target)))
