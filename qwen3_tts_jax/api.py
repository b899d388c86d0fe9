"""`Qwen3TTS`: the official-style API (qwen_tts.Qwen3TTSModel names, arguments and defaults) over
the pure JAX core. This layer validates input, tokenizes, builds and buckets prompts, and turns the
device results into numpy; everything per frame happens in `generate.py`.

    from qwen3_tts_jax import Qwen3TTS
    tts = Qwen3TTS.from_pretrained("Qwen/Qwen3-TTS-12Hz-0.6B-CustomVoice")
    wavs, sr = tts.generate_custom_voice("Hello there.", speaker="ryan", language="english")
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import os
import secrets
import time
from collections.abc import Iterator
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from . import audio as audio_mod
from . import checkpoint, generate as gen, prompts, sampling, speaker_encoder, text as text_mod
from .buckets import batch_rows, ladder
from .config import GenerationDefaults, Qwen3TTSConfig, load_config, load_generation_defaults
from .options import Options
from .voice import VoiceClonePromptItem, load_voice

log = logging.getLogger("qwen3_tts_jax")

GEN_KWARGS = ("do_sample", "top_k", "top_p", "temperature", "repetition_penalty",
              "subtalker_dosample", "subtalker_top_k", "subtalker_top_p", "subtalker_temperature",
              "max_new_tokens", "seed")


_CACHE_WARNED: set = set()


def enable_compilation_cache(path: str | None = None) -> str | None:
    """Keep compiled programs on disk (JAX's persistent compilation cache), so that a new process
    does not compile the same shape buckets again. Default folder: ~/.cache/qwen3-tts-jax/xla.
    Returns the folder, or None (with one warning) where it cannot be created or written."""
    path = path or os.path.join(os.path.expanduser("~"), ".cache", "qwen3-tts-jax", "xla")
    try:
        os.makedirs(path, exist_ok=True)
        if not os.access(path, os.W_OK | os.X_OK):
            raise PermissionError(f"{path} is not writable")
    except OSError as e:   # read-only home, no disk: run without the cache rather than fail
        if path not in _CACHE_WARNED:
            _CACHE_WARNED.add(path)
            log.warning("compilation cache disabled: cannot use %s (%s)", path, e)
        return None
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    return path


def _single(items: list) -> "prompts.Prompt":
    if len(items) != 1:
        raise ValueError(f"streaming takes one text at a time, got {len(items)}")
    return items[0]


def _is_pieces(text) -> bool:
    """Text that arrives in pieces: an iterator of str (a generator), not a str or a list."""
    return isinstance(text, Iterator)


def _check_chunks(chunk_frames, first_chunk_frames) -> None:
    for name, v in (("chunk_frames", chunk_frames), ("first_chunk_frames", first_chunk_frames)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1 (frames of 80 ms), got {v!r}")


def _official_mode(non_streaming_mode, default: bool) -> bool:
    """The text mode of a whole text: as given, or the official default of the method."""
    return default if non_streaming_mode is None else non_streaming_mode


def _as_list(x, n: int, name: str) -> list:
    """A scalar for every item, or one value per item (the official broadcasting rules)."""
    xs = list(x) if isinstance(x, (list, tuple)) else [x]
    if len(xs) == 1 and n > 1:
        xs = xs * n
    if len(xs) != n:
        raise ValueError(f"batch size mismatch: {n} text(s) but {len(xs)} {name} value(s)")
    return xs


# Frames are generated into a KV cache that grows by doubling (`generate.grow`) and positions are
# int32; generation may run past max_position_embeddings (as in the official code), so the bound is
# practical rather than architectural: 2**20 frames is ~23 hours of 12.5 Hz audio, far above any
# checkpoint's generation_config (8192), and keeps every frame count an int32.
MAX_NEW_TOKENS = 2 ** 20
# Seeds are PRNGKey seeds; with 32-bit JAX, values from 2**32 on alias smaller ones. The server and
# the batch tool accept [0, 2**31): the same range here.
SEED_LIMIT = 2 ** 31


class SettingError(ValueError, TypeError):
    """A generation setting of the wrong type or out of range; `param` names it (the server
    answers 400 with that param)."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def check_seed(s) -> int:
    if isinstance(s, (bool, np.bool_)) or not isinstance(s, (int, np.integer)):
        raise SettingError(f"seed must be an integer (or a list of one integer per text), "
                           f"got {s!r}", "seed")
    if not 0 <= s < SEED_LIMIT:
        raise SettingError(f"seed must be in [0, 2**31), got {s!r}", "seed")
    return int(s)


VOICE_FIELDS = ("ref_code", "ref_spk_embedding", "x_vector_only_mode", "icl_mode", "ref_text")


def _items_from_dict(d: dict) -> list[VoiceClonePromptItem]:
    """The official wrapper's dict form of voice_clone_prompt (one list per field, as its
    `_prompt_items_to_voice_clone_prompt` makes it) as items. `ref_text` (a list) may be added:
    ICL voices need their transcript."""
    missing = [k for k in VOICE_FIELDS[:4] if k not in d]
    unknown = sorted(set(d) - set(VOICE_FIELDS))
    if missing or unknown:
        raise TypeError(f"a voice_clone_prompt dict needs the keys {list(VOICE_FIELDS[:4])} "
                        f"(and may have 'ref_text'); missing {missing}, unknown {unknown}")
    emb = d["ref_spk_embedding"]
    n = len(emb) if isinstance(emb, (list, tuple)) else 1
    cols = [_as_list(d.get(k), n, f"voice_clone_prompt[{k!r}]") for k in VOICE_FIELDS]
    return [VoiceClonePromptItem(None if code is None else np.asarray(code),
                                 np.asarray(x, np.float32), bool(xo), bool(icl), text)
            for code, x, xo, icl, text in zip(*cols)]


@dataclasses.dataclass(frozen=True)
class GenerationSettings:
    """Validated generation settings for one call (per-row values allowed for `seed`)."""
    do_sample: bool
    top_k: int
    top_p: float
    temperature: float
    repetition_penalty: float
    subtalker_dosample: bool
    subtalker_top_k: int
    subtalker_top_p: float
    subtalker_temperature: float
    max_new_tokens: int
    seed: Any = None

    @classmethod
    def merge(cls, defaults: GenerationDefaults, **kw) -> "GenerationSettings":
        """User value > generation_config.json value > official hard default; then validate."""
        unknown = sorted(set(kw) - set(GEN_KWARGS))
        if unknown:
            raise TypeError(f"unknown generation argument(s) {unknown}; valid: {list(GEN_KWARGS)}")
        vals = dataclasses.asdict(defaults)
        vals.update({k: v for k, v in kw.items() if v is not None})
        s = cls(**{k: vals.get(k) for k in GEN_KWARGS})
        s.validate()
        return s

    def validate(self):
        def number(name):
            v = getattr(self, name)
            if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer,
                                                                      np.floating)):
                raise SettingError(f"{name} must be a number, got {type(v).__name__} {v!r}", name)
            if not np.isfinite(v):
                raise SettingError(f"{name} must be a finite number, got {v!r}", name)
            return v

        for name in ("do_sample", "subtalker_dosample"):
            v = getattr(self, name)
            if not isinstance(v, (bool, np.bool_)):
                raise SettingError(f"{name} must be True or False, got {type(v).__name__} {v!r}",
                                   name)
        for prefix, do_sample in (("", self.do_sample), ("subtalker_", self.subtalker_dosample)):
            t, p = number(prefix + "temperature"), number(prefix + "top_p")
            k = getattr(self, prefix + "top_k")
            if do_sample and not t > 0:
                raise SettingError(f"{prefix}temperature must be > 0 when sampling (got {t}); "
                                   f"use {prefix or ''}{'do_sample' if not prefix else 'dosample'}"
                                   "=False for greedy decoding", prefix + "temperature")
            if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 0:
                raise SettingError(f"{prefix}top_k must be an integer >= 0 (0 = off), got {k!r}",
                                   prefix + "top_k")
            if not 0 < p <= 1:
                raise SettingError(f"{prefix}top_p must be in (0, 1], got {p!r}", prefix + "top_p")
        if not number("repetition_penalty") > 0:
            raise SettingError(f"repetition_penalty must be > 0, got {self.repetition_penalty!r}",
                               "repetition_penalty")
        m = self.max_new_tokens
        # At least 2, like the official generate (min_new_tokens=2): N talker tokens give at most
        # N - 1 frames (the last token's codes are never predicted), so 1 would give no audio.
        if (not isinstance(m, (int, np.integer)) or isinstance(m, bool)
                or not 2 <= m <= MAX_NEW_TOKENS):
            raise SettingError(f"max_new_tokens must be an integer in [2, {MAX_NEW_TOKENS}] "
                               f"(2**20), got {m!r}", "max_new_tokens")
        if self.seed is not None:
            for s in self.seed if isinstance(self.seed, (list, tuple)) else [self.seed]:
                check_seed(s)


class Qwen3TTS:
    """A loaded Qwen3-TTS checkpoint (CustomVoice, VoiceDesign or Base)."""

    def __init__(self, cfg: Qwen3TTSConfig, params, tokenizer: text_mod.TextTokenizer,
                 defaults: GenerationDefaults, folder: str, options: Options | None = None):
        self.config = cfg
        self.options = options or Options.for_backend()   # static choices of every program
        self.params = params
        self.tokenizer = tokenizer
        self.generate_defaults = defaults
        self.folder = folder
        self._speech_tokenizer = None
        self._replicated = None        # params on every local device, for data-parallel runs
        self.model_parallel = 1        # > 1: params split over a (data, model) mesh

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, path_or_id: str, dtype=None, model_parallel: int = 1,
                        quantize: str | None = None,
                        options: Options | None = None) -> "Qwen3TTS":
        """Load a local checkpoint folder (released layout, or converted by `python -m convert`)
        or a hub id through huggingface_hub. `dtype`: default f32 on CPU, bf16 on GPU/TPU.

        `quantize="int8"` stores the talker's and the code predictor's decoder products as int8
        with a scale per output column (`quantize.py`): a quarter of the float32 bytes, 3x
        the CPU's batch-1 speed; not the official model's exact codes (benchmarks/RESULTS.md,
        "int8 weights", gives the measured closeness). Default: the weights as they are.

        `model_parallel` = m > 1 splits the decoder weights over m devices (tensor parallel, for
        a model that does not fit one device's memory, e.g. the 1.7B on small TPU cores): the
        local devices form a (data, model) mesh of shape (n / m, m); the weights go from host
        memory straight to their shards (never whole on one device); batches are split over the
        "data" axis. Same codes as one device (tests/test_batch.py).

        `options`: the static kernel and layout choices of generation (`options.Options`; None:
        `Options.for_backend()` for the weights' dtype), used by every call on this model."""
        from . import quantize as quantize_mod

        quantize_mod.check_method(quantize)
        options = options or Options.for_backend(dtype=dtype or checkpoint.default_dtype())
        folder = checkpoint.resolve(path_or_id)
        cfg = load_config(folder)
        if model_parallel > 1:
            from .batch import model_sharding

            dtype = dtype or checkpoint.default_dtype()
            with jax.default_device(jax.local_devices(backend="cpu")[0]):
                params = checkpoint.pack_for_inference(
                    checkpoint.load_params(folder, cfg, dtype), consume=True, quantize=quantize,
                    options=options)
            params = jax.device_put(params, model_sharding(params, model_parallel))
        else:
            params = checkpoint.pack_for_inference(checkpoint.load_params(folder, cfg, dtype),
                                                   consume=True, quantize=quantize,
                                                   options=options)
        tok = text_mod.TextTokenizer.from_dir(folder)
        tts = cls(cfg, params, tok, load_generation_defaults(folder), folder, options)
        tts.model_parallel = model_parallel
        return tts

    def on_device(self, device) -> "Qwen3TTS":
        """This model with its weights (and its codec's decoder) copied to `device`: what runs
        on them runs there (JAX follows committed arrays). The copy shares the config, the text
        tokenizer and the codec's encoder; one per device makes a data-parallel pool
        (`server.engine.EnginePool`)."""
        if self.model_parallel > 1:
            raise ValueError("a model split over a mesh (model_parallel > 1) cannot be copied to "
                             "one device")
        other = copy.copy(self)
        other.params = jax.device_put(self.params, device)
        other._replicated = None
        codec = copy.copy(self.speech_tokenizer) if os.path.isdir(
            os.path.join(self.folder, "speech_tokenizer")) else None
        if codec is not None:
            codec.params = jax.device_put(codec.params, device)
        other._speech_tokenizer = codec
        return other

    @property
    def speech_tokenizer(self):
        """The 12 Hz codec (speech_tokenizer/ of the checkpoint), loaded on first use."""
        if self._speech_tokenizer is None:
            from .codec import SpeechTokenizer

            sub = os.path.join(self.folder, "speech_tokenizer")
            if not os.path.isdir(sub):
                raise FileNotFoundError(
                    f"{self.folder} has no speech_tokenizer/ folder: audio output needs the codec "
                    "(the released checkpoints ship it; the *_codes methods work without it)")
            self._speech_tokenizer = SpeechTokenizer.from_pretrained(sub)
        return self._speech_tokenizer

    @property
    def tts_model_type(self) -> str:
        return self.config.tts_model_type

    def get_supported_speakers(self) -> list[str]:
        return sorted(self.config.speakers)

    def get_supported_languages(self) -> list[str]:
        return sorted(self.config.languages)

    # ------------------------------------------------------------------ validation
    def _require(self, kind: str, method: str):
        if self.config.tts_model_type != kind:
            have = self.config.tts_model_type
            hint = {"custom_voice": "generate_custom_voice(text, speaker=...)",
                    "voice_design": "generate_voice_design(text, instruct=...)",
                    "base": "generate_voice_clone(text, ref_audio=..., ...)"}[have]
            raise ValueError(f"{method} needs a {kind} checkpoint, but {self.folder} is a {have} "
                             f"checkpoint (tts_model_type={have!r}); use {hint} instead")

    def _check_texts(self, texts: list) -> None:
        if not texts:
            raise ValueError("no text given: `text` is an empty list")
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"text[{i}] must be a str, got {type(t).__name__}")
            if not t.strip():
                raise ValueError(f"text[{i}] is empty or whitespace only: nothing to say")

    def _check_languages(self, languages: list) -> list[str]:
        supported = set(self.config.languages)
        bad = [lang for lang in languages if lang is None or str(lang).lower() not in supported]
        if bad:
            raise ValueError(f"unsupported language(s) {bad}; supported: {sorted(supported)}")
        return [str(lang).lower() for lang in languages]

    def _check_speakers(self, speakers: list) -> None:
        supported = self.config.speakers
        bad = [s for s in speakers if s and str(s).lower() not in supported]
        if bad:
            raise ValueError(f"unknown speaker(s) {bad}; this checkpoint has: {sorted(supported)}")

    # ------------------------------------------------------------------ prompts + generation
    def _input_ids(self, text: str) -> list[int]:
        return self.tokenizer.encode(text_mod.assistant_text(text))

    def _instruct_ids(self, instruct) -> list[int] | None:
        if instruct is None or instruct == "":
            return None
        if not isinstance(instruct, str):
            raise TypeError(f"instruct must be a str, got {type(instruct).__name__}")
        return self.tokenizer.encode(text_mod.instruct_text(instruct))

    def _prepare(self, items: list[prompts.Prompt], settings: GenerationSettings,
                 data_parallel: int = 1):
        """Built prompts -> (PromptBatch, gen.Settings, keys) padded to shape buckets: the batch to
        a power of two, at least `Options.min_rows` (extra rows stop at once),
        prompt and trailing text to the ladder."""
        cfg = self.config
        n = len(items)
        longest = max(len(p) for p in items)
        # A text longer than the model's positions is refused; generation may run past them, as
        # in the official code (RoPE has no table to run out of; max_new_tokens bounds it, and a
        # checkpoint's generation_config may well ask for more frames than max_position_embeddings).
        limit = cfg.talker.max_position_embeddings
        if longest > limit:
            raise ValueError(f"the prompt is {longest} tokens, more than the model's {limit} "
                             "positions; split the text")
        B = batch_rows(n, self.options.min_rows)
        B = -(-B // data_parallel) * data_parallel   # every device gets the same number of rows
        items = items + [items[0]] * (B - n)
        # Prompt lengths on the finer 16, 24, 32, 48, ... ladder: prefill is most of the time to
        # the first frame, and a power of two could nearly double it.
        batch = prompts.batch_prompts(cfg, items, length=ladder(longest),
                                      trailing_length=ladder(max(len(p.trailing) for p in items)))
        budget = np.array([settings.max_new_tokens] * n + [1] * (B - n), np.int32)
        talker = sampling.SamplingParams.create(
            B, do_sample=settings.do_sample, temperature=settings.temperature,
            top_k=settings.top_k, top_p=settings.top_p, options=self.options)
        predictor = sampling.SamplingParams.create(
            B, do_sample=settings.subtalker_dosample, temperature=settings.subtalker_temperature,
            top_k=settings.subtalker_top_k, top_p=settings.subtalker_top_p,
            options=self.options)
        run_settings = gen.Settings(talker, predictor,
                                    jnp.full((B,), settings.repetition_penalty, jnp.float32),
                                    jnp.asarray(budget))
        return batch, run_settings, self._keys(settings.seed, n, B)

    def _run(self, items: list[prompts.Prompt], settings: GenerationSettings,
             data_parallel: bool = False) -> list[np.ndarray]:
        """Generate codes for built prompts: one padded, bucketed batch on device, or with
        `data_parallel` the batch split over all local devices (params replicated)."""
        m = self.model_parallel
        devices = len(jax.local_devices()) // m if (data_parallel or m > 1) else 1
        batch, run_settings, keys = self._prepare(items, settings, devices)
        params = self.params
        if m > 1:                      # params already split over the mesh's "model" axis
            from .batch import data_sharding

            rows, _ = data_sharding(m)
            batch, run_settings, keys = jax.device_put((batch, run_settings, keys), rows)
        elif devices > 1:
            from .batch import data_sharding

            rows, replicated = data_sharding()
            batch, run_settings, keys = jax.device_put((batch, run_settings, keys), rows)
            if self._replicated is None:
                self._replicated = jax.device_put(self.params, replicated)
            params = self._replicated
        state = gen.generate(params, self.config, batch, run_settings, keys,
                             max_frames=settings.max_new_tokens - 1, options=self.options)
        codes = np.asarray(state.codes_BxFxG)
        lengths = np.asarray(state.length_B)
        return [codes[b, :lengths[b]] for b in range(len(items))]

    # ------------------------------------------------------------------ ahead-of-time warm-up
    def warmup_prompts(self, items: list[prompts.Prompt], batch_sizes=(1,), **gen_kwargs) -> float:
        """Compile, before any request, the programs that batches of these built prompts use:
        for each batch size, the exact shapes `_run` would give (prompt and text buckets, padded
        batch, first KV-cache segment), by running the prefill at each of its compute lengths in
        the prompt bucket (`generate.prefill_lengths`) and one frame. Returns seconds.
        With the persistent compilation cache (`enable_compilation_cache`) a later process finds
        them on disk. On accelerators the programs are also those of the settings' sampler kind
        (`sampling.SamplingParams.kind`: greedy, top-k only, or general), so warm up with the
        settings the requests will use (`do_sample=False` for greedy ones)."""
        t = time.perf_counter()
        batch_sizes = list(batch_sizes) if isinstance(batch_sizes, (list, tuple, range)) else None
        if not batch_sizes or not all(isinstance(B, (int, np.integer)) and not isinstance(B, bool)
                                      and B >= 1 for B in batch_sizes):
            raise ValueError(f"batch_sizes must be a non-empty list of integers >= 1, got "
                             f"{batch_sizes!r}")
        if not items:
            raise ValueError("warmup needs at least one prompt (texts is empty)")
        settings = GenerationSettings.merge(self.generate_defaults, **gen_kwargs)
        capacity = gen.capacity(settings.max_new_tokens - 1, self.options)
        for B in batch_sizes:
            rows = (list(items) * B)[:B]
            batch, run_settings, keys = self._prepare(rows, settings)
            for compute in gen.prefill_lengths(batch.text_BxL.shape[1]):
                state, ctx = gen.prefill(self.params, self.config, batch, run_settings, keys,
                                         frames=capacity, compute=compute, options=self.options)
            jax.block_until_ready(gen.decode(self.params, self.config, state, ctx, run_settings,
                                             1, self.options).step)
        return time.perf_counter() - t

    def warmup(self, texts=("Hello.",), batch_sizes=(1,), language=None, speaker=None,
               instruct=None, voice_clone_prompt=None, non_streaming_mode=None,
               **gen_kwargs) -> float:
        """`warmup_prompts` for the checkpoint's own mode: texts of the lengths you expect (each
        text stands for its prompt-length bucket), at the batch sizes you will use. CustomVoice
        takes `speaker` (default: the first), VoiceDesign `instruct` (default: a short
        description), Base a `voice_clone_prompt`. Returns seconds spent."""
        texts = list(texts)
        kind = self.tts_model_type
        if kind == "custom_voice":
            items = self._custom_voice_prompts(
                texts, speaker or self.get_supported_speakers()[0], language, instruct,
                True if non_streaming_mode is None else non_streaming_mode)
        elif kind == "voice_design":
            items = self._voice_design_prompts(
                texts, instruct or "A clear, neutral voice.", language,
                True if non_streaming_mode is None else non_streaming_mode)
        else:
            if voice_clone_prompt is None:
                raise ValueError("warmup on a Base checkpoint needs voice_clone_prompt= (from "
                                 "create_voice_clone_prompt)")
            items, _ = self._voice_clone_prompts(
                texts, language, None, None, False, voice_clone_prompt,
                False if non_streaming_mode is None else non_streaming_mode)
        return self.warmup_prompts(items, batch_sizes, **gen_kwargs)

    @staticmethod
    def _keys(seed, n: int, B: int):
        """Per-row PRNG keys: `seed` an int (row b gets fold_in(key(seed), b)), a list of ints
        (one per row), or None (fresh random)."""
        if isinstance(seed, (list, tuple)):
            seeds = _as_list(seed, n, "seed")
            keys = [jax.random.PRNGKey(check_seed(s)) for s in seeds]
        else:
            base = jax.random.PRNGKey(secrets.randbits(31) if seed is None else check_seed(seed))
            keys = [jax.random.fold_in(base, b) for b in range(n)]
        keys += [keys[0]] * (B - n)
        return jnp.stack(keys)

    # ------------------------------------------------------------------ custom voice
    def _custom_voice_prompts(self, text, speaker, language, instruct, non_streaming_mode):
        self._require("custom_voice", "generate_custom_voice")
        texts = text if isinstance(text, list) else [text]
        self._check_texts(texts)
        n = len(texts)
        languages = self._check_languages(_as_list("auto" if language is None else language, n,
                                                   "language"))
        speakers = _as_list(speaker, n, "speaker")
        if any(s is None or s == "" for s in speakers):
            raise ValueError(f"a speaker is required; this checkpoint has: "
                             f"{self.get_supported_speakers()}")
        self._check_speakers(speakers)
        instructs = _as_list(instruct if instruct is not None else "", n, "instruct")
        if self.config.tts_model_size in "0b6" and any(instructs):
            log.warning("the 0.6B CustomVoice model ignores `instruct` (like the official "
                        "qwen-tts); use a 1.7B CustomVoice checkpoint for instructions")
            instructs = [""] * n
        return [prompts.build_prompt(self.config, self._input_ids(t), lang, spk,
                                     self._instruct_ids(ins), non_streaming_mode)
                for t, spk, lang, ins in zip(texts, speakers, languages, instructs)]

    def generate_custom_voice_codes(self, text, speaker, language=None, instruct=None,
                                    non_streaming_mode: bool = True, **gen_kwargs):
        """Codes (list of int32 (frames, 16) arrays) for preset speakers of a CustomVoice model.

        text/speaker/language/instruct: a value or a list (a batch). language None = "auto".
        gen_kwargs: do_sample, top_k, top_p, temperature, repetition_penalty, subtalker_dosample,
        subtalker_top_k, subtalker_top_p, subtalker_temperature, max_new_tokens (defaults from
        generation_config.json), seed (int, list of ints, or None for random).
        """
        settings = GenerationSettings.merge(self.generate_defaults, **gen_kwargs)
        items = self._custom_voice_prompts(text, speaker, language, instruct, non_streaming_mode)
        return self._run(items, settings)

    def prepare_custom_voice(self, text, speaker, language=None, instruct=None,
                             non_streaming_mode: bool = True, **gen_kwargs):
        """(PromptBatch, gen.Settings, keys) for the functional form `generate.synthesize`."""
        settings = GenerationSettings.merge(self.generate_defaults, **gen_kwargs)
        return self._prepare(self._custom_voice_prompts(text, speaker, language, instruct,
                                                        non_streaming_mode), settings)

    def generate_custom_voice(self, text, speaker, language=None, instruct=None,
                              non_streaming_mode: bool = True, **gen_kwargs):
        """Speech for preset speakers: (list of float32 waves, 24000). Same arguments as
        `generate_custom_voice_codes`."""
        return self.decode(self.generate_custom_voice_codes(
            text, speaker, language, instruct, non_streaming_mode, **gen_kwargs))

    # ------------------------------------------------------------------ voice design
    def _voice_design_prompts(self, text, instruct, language, non_streaming_mode):
        self._require("voice_design", "generate_voice_design")
        texts = text if isinstance(text, list) else [text]
        self._check_texts(texts)
        n = len(texts)
        if instruct is None:
            raise ValueError("generate_voice_design needs `instruct`: a description of the voice, "
                             "e.g. 'A warm, low female voice, speaking slowly.'")
        instructs = _as_list(instruct, n, "instruct")
        languages = self._check_languages(_as_list("auto" if language is None else language, n,
                                                   "language"))
        return [prompts.build_prompt(self.config, self._input_ids(t), lang, None,
                                     self._instruct_ids(ins), non_streaming_mode)
                for t, lang, ins in zip(texts, languages, instructs)]

    def generate_voice_design_codes(self, text, instruct, language=None,
                                    non_streaming_mode: bool = True, **gen_kwargs):
        """Codes for a voice described in words (VoiceDesign model). See
        `generate_custom_voice_codes` for gen_kwargs."""
        settings = GenerationSettings.merge(self.generate_defaults, **gen_kwargs)
        items = self._voice_design_prompts(text, instruct, language, non_streaming_mode)
        return self._run(items, settings)

    def prepare_voice_design(self, text, instruct, language=None, non_streaming_mode: bool = True,
                             **gen_kwargs):
        """(PromptBatch, gen.Settings, keys) for the functional form `generate.synthesize`."""
        settings = GenerationSettings.merge(self.generate_defaults, **gen_kwargs)
        return self._prepare(self._voice_design_prompts(text, instruct, language,
                                                        non_streaming_mode), settings)

    def generate_voice_design(self, text, instruct, language=None,
                              non_streaming_mode: bool = True, **gen_kwargs):
        """Speech for a voice described in words: (list of float32 waves, 24000)."""
        return self.decode(self.generate_voice_design_codes(
            text, instruct, language, non_streaming_mode, **gen_kwargs))

    # ------------------------------------------------------------------ voice clone (Base)
    def create_voice_clone_prompt(self, ref_audio, ref_text=None, x_vector_only_mode=False,
                                  ref_tail_silence: float = 0.0) -> list[VoiceClonePromptItem]:
        """Encode reference voice(s) once: the x-vector (speaker encoder) and, in ICL mode, the
        reference codes (codec encoder) with the transcript. ref_audio: a path, URL, base64 or
        data: URL, or (np.ndarray, sample_rate); or a list. Save with `save_voice`.

        `ref_tail_silence` (seconds, default 0 = the official): silence appended to the
        reference before its codes are taken (ICL). A reference cut mid-word can bleed its last
        sound into the first generated frames, which continue it; half a second of silence is
        the usual remedy. The x-vector is taken from the reference as given."""
        self._require("base", "create_voice_clone_prompt")
        if (isinstance(ref_tail_silence, bool) or not isinstance(ref_tail_silence, (int, float))
                or not 0 <= ref_tail_silence <= 5):
            raise ValueError(f"ref_tail_silence must be seconds in [0, 5], got {ref_tail_silence!r}")
        audios = [os.fspath(a) if isinstance(a, os.PathLike) else a
                  for a in (ref_audio if isinstance(ref_audio, list) else [ref_audio])]
        n = len(audios)
        texts = _as_list(ref_text, n, "ref_text")
        xvec_only = _as_list(x_vector_only_mode, n, "x_vector_only_mode")
        for i, (t, x) in enumerate(zip(texts, xvec_only)):
            if not x and (t is None or not str(t).strip()):
                raise ValueError(f"ref_text[{i}] is required in ICL mode (x_vector_only_mode="
                                 "False): pass the transcript of the reference audio, or "
                                 "x_vector_only_mode=True to clone from the x-vector alone")
        enc_cfg = self.config.speaker_encoder
        loaded = [audio_mod.load_audio(a) for a in audios]
        rates = {sr for _, sr in loaded}
        codes = [None] * n
        if not all(xvec_only):
            padded = [np.concatenate([w, np.zeros(int(round(ref_tail_silence * sr)), w.dtype)])
                      for w, sr in loaded]
            # Like the official: one padded batch when the rates agree (the last frame of a
            # shorter item depends on the batch width, so batching matters), else one by one.
            if len(rates) == 1:
                codes = self.speech_tokenizer.encode(padded, sr=rates.pop())
            else:
                codes = [self.speech_tokenizer.encode((w, sr))[0]
                         for w, (_, sr) in zip(padded, loaded)]
        items = []
        for (wave, sr), code, text, x in zip(loaded, codes, texts, xvec_only):
            wave24 = wave if sr == enc_cfg.sample_rate else audio_mod.resample(
                wave, sr, enc_cfg.sample_rate)
            xvec = np.asarray(speaker_encoder.extract_xvector(self.params["speaker_encoder"],
                                                              enc_cfg, wave24), np.float32)
            items.append(VoiceClonePromptItem(None if x else code, xvec, bool(x), not x, text))
        return items

    def _voice_clone_prompts(self, text, language, ref_audio, ref_text, x_vector_only_mode,
                             voice_clone_prompt, non_streaming_mode):
        self._require("base", "generate_voice_clone")
        texts = text if isinstance(text, list) else [text]
        self._check_texts(texts)
        n = len(texts)
        languages = self._check_languages(_as_list("auto" if language is None else language, n,
                                                   "language"))
        if voice_clone_prompt is None:
            if ref_audio is None:
                raise ValueError("generate_voice_clone needs ref_audio (with ref_text for ICL "
                                 "mode) or a voice_clone_prompt")
            items = self.create_voice_clone_prompt(ref_audio, ref_text, x_vector_only_mode)
        elif isinstance(voice_clone_prompt, (str, os.PathLike)):
            items = load_voice(os.fspath(voice_clone_prompt))
        elif isinstance(voice_clone_prompt, dict):
            items = _items_from_dict(voice_clone_prompt)
        else:
            items = list(voice_clone_prompt) if isinstance(voice_clone_prompt, (list, tuple)) \
                else [voice_clone_prompt]
        items = _as_list(items, n, "voice_clone_prompt")
        D = self.config.talker.hidden_size
        G, V = self.config.talker.num_code_groups, self.config.talker.code_predictor.vocab_size
        for i, it in enumerate(items):
            if not all(hasattr(it, a) for a in VOICE_FIELDS):
                raise TypeError(f"voice_clone_prompt item {i} is a {type(it).__name__}; expected "
                                "the items of create_voice_clone_prompt, a voice file path, or "
                                f"the official dict form with keys {list(VOICE_FIELDS[:4])}")
            if np.shape(it.ref_spk_embedding) != (D,):
                raise ValueError(f"voice {i} has a {np.shape(it.ref_spk_embedding)} x-vector; this "
                                 f"checkpoint needs ({D},): was it made with another model size?")
            if not np.all(np.isfinite(np.asarray(it.ref_spk_embedding, np.float32))):
                raise ValueError(f"voice {i}'s x-vector (ref_spk_embedding) has NaN or inf values")
            if it.icl_mode and it.ref_code is not None and (
                    not isinstance(it.ref_text, str) or not it.ref_text.strip()):
                raise ValueError(f"voice {i} is an ICL voice (reference codes) without ref_text: "
                                 "the transcript of its reference audio is required in ICL mode")
            if it.icl_mode and it.ref_code is not None:
                code = np.asarray(it.ref_code)
                if (code.ndim != 2 or code.shape[1] != G or not len(code)
                        or not np.issubdtype(code.dtype, np.integer)
                        or code.min() < 0 or code.max() >= V):
                    raise ValueError(
                        f"voice {i}'s reference codes are {code.dtype} {code.shape} in "
                        f"[{code.min() if code.size else '-'}, {code.max() if code.size else '-'}]"
                        f"; this checkpoint needs integers (frames, {G}) in [0, {V}) (codes of "
                        "its speech tokenizer, frames first)")
        out = []
        for t, lang, it in zip(texts, languages, items):
            icl = it.icl_mode and it.ref_code is not None
            out.append(prompts.build_prompt(
                self.config, self._input_ids(t), lang, None, None, non_streaming_mode,
                xvector=it.ref_spk_embedding if (it.x_vector_only_mode or it.icl_mode) else None,
                ref_ids=self.tokenizer.encode(text_mod.ref_text(it.ref_text)) if icl else None,
                ref_code=it.ref_code if icl else None))
        return out, items

    def generate_voice_clone_codes(self, text, language=None, ref_audio=None, ref_text=None,
                                   x_vector_only_mode=False, voice_clone_prompt=None,
                                   non_streaming_mode: bool = False, **gen_kwargs):
        """Codes in a cloned voice (Base model): the generated frames only (no reference)."""
        settings = GenerationSettings.merge(self.generate_defaults, **gen_kwargs)
        items, _ = self._voice_clone_prompts(text, language, ref_audio, ref_text,
                                             x_vector_only_mode, voice_clone_prompt,
                                             non_streaming_mode)
        return self._run(items, settings)

    def generate_voice_clone(self, text, language=None, ref_audio=None, ref_text=None,
                             x_vector_only_mode=False, voice_clone_prompt=None,
                             non_streaming_mode: bool = False, **gen_kwargs):
        """Speech in a cloned voice: (list of float32 waves, 24000). In ICL mode the codes are
        decoded after the reference codes (as left context) and the reference part is cut, like
        the official. voice_clone_prompt: items from `create_voice_clone_prompt`, or a voice file
        path (`save_voice`)."""
        settings = GenerationSettings.merge(self.generate_defaults, **gen_kwargs)
        built, items = self._voice_clone_prompts(text, language, ref_audio, ref_text,
                                                 x_vector_only_mode, voice_clone_prompt,
                                                 non_streaming_mode)
        return self.decode_voice_clone(self._run(built, settings), items)

    def decode_voice_clone(self, codes: Sequence[np.ndarray], voice: list[VoiceClonePromptItem]):
        """Audio of cloned-voice codes: ICL items are decoded after their reference codes (left
        context for the codec) and the reference part is cut, like the official."""
        voice = _as_list(list(voice), len(codes), "voice")
        refs = [it.ref_code if it.icl_mode and it.ref_code is not None else None for it in voice]
        full = [c if r is None else np.concatenate([np.asarray(r, np.int32), c])
                for c, r in zip(codes, refs)]
        wavs, sr = self.decode(full)
        out = []
        for wav, r, f in zip(wavs, refs, full):
            cut = 0 if r is None else int(len(r) / max(len(f), 1) * len(wav))
            out.append(wav[cut:])
        return out, sr

    def generate_prompts_codes(self, items: list[prompts.Prompt], pad_batch_to: int = 1,
                               **gen_kwargs):
        """Codes for already built prompts (any mode); with pad_batch_to > 1 the batch is split
        over all local devices. Used by the batch tool."""
        settings = GenerationSettings.merge(self.generate_defaults, **gen_kwargs)
        return self._run(items, settings, data_parallel=pad_batch_to > 1)

    # ------------------------------------------------------------------ streaming
    def _stream(self, item: prompts.Prompt, settings: GenerationSettings, chunk_frames: int,
                first_chunk_frames: int, ref_code=None):
        """Yield float32 audio chunks of one utterance while it is generated.

        The frame loop is the same compiled `generate.decode` as offline generation, called with
        a growing `until` and the state carried on device; so the codes are exactly the offline
        codes for the same seed. Each chunk's codes go to a `StreamDecoder`, which carries the
        codec's state between chunks: the chunks concatenate to the offline audio (float
        rounding) at any length, and each costs only its new frames."""
        _check_chunks(chunk_frames, first_chunk_frames)
        # Checked now, at call time; the generator below runs at the first next().
        return self._stream_chunks(item, settings, chunk_frames, first_chunk_frames, ref_code)

    def _stream_chunks(self, item, settings, chunk_frames, first_chunk_frames, ref_code):
        batch, run_settings, keys = self._prepare([item], settings)
        max_frames = settings.max_new_tokens - 1
        capacity = gen.capacity(max_frames, self.options)
        state, ctx = gen.prefill(self.params, self.config, batch, run_settings, keys,
                                 frames=capacity, compute=gen.prefill_length(batch.mask_BxL),
                                 options=self.options)
        codec = self.speech_tokenizer.stream_decoder()
        codec.reset(0, prefix=ref_code)     # ICL: the reference is decoded first, its audio cut
        emitted, target = 0, first_chunk_frames
        while True:
            while target > capacity and capacity < gen.bucket(max_frames):
                capacity = min(2 * capacity, gen.bucket(max_frames))
                state = gen.grow(state, capacity)
            state = gen.decode(self.params, self.config, state, ctx, run_settings,
                               min(target, capacity), self.options)
            length, done = int(state.length_B[0]), bool(state.done_B[0])
            if length > emitted:
                yield codec.push([np.asarray(state.codes_BxFxG[0, emitted:length])])[0]
                emitted = length
            if done or emitted >= max_frames:
                return
            target = emitted + chunk_frames

    def generate_custom_voice_streaming(self, text, speaker: str, language=None,
                                        instruct=None, non_streaming_mode: bool | None = None,
                                        chunk_frames: int = 12, first_chunk_frames: int = 3,
                                        **gen_kwargs):
        """A generator of float32 24 kHz audio chunks (first after `first_chunk_frames` frames,
        then every `chunk_frames` = 80 ms each), for one text. Same arguments as
        `generate_custom_voice`; with the same seed the codes are the offline codes, and the chunks
        concatenate to the offline audio (float rounding; tests/test_streaming.py).

        `text` may also be an iterator of str pieces (a generator: an LLM's output as it comes):
        the text is then read in the official streaming text mode (`non_streaming_mode` False,
        one text token per frame), speech starts once the first word is there, and no frame
        reads text that has not arrived; the audio is the offline streaming-mode audio of the
        whole text (see `_stream_text`)."""
        settings = GenerationSettings.merge(self.generate_defaults, **gen_kwargs)
        if _is_pieces(text):
            self._custom_voice_prompts("x", speaker, language, instruct, False)   # checks
            feed = self._text_feed(language, speaker=speaker, instruct=instruct)
            return self._stream_text(text, feed, settings, non_streaming_mode, chunk_frames,
                                     first_chunk_frames)
        item = self._custom_voice_prompts(text, speaker, language, instruct,
                                          _official_mode(non_streaming_mode, True))
        return self._stream(_single(item), settings, chunk_frames, first_chunk_frames)

    def generate_voice_design_streaming(self, text, instruct: str, language=None,
                                        non_streaming_mode: bool | None = None,
                                        chunk_frames: int = 12, first_chunk_frames: int = 3,
                                        **gen_kwargs):
        """Streaming twin of `generate_voice_design` (see `generate_custom_voice_streaming`,
        text pieces included)."""
        settings = GenerationSettings.merge(self.generate_defaults, **gen_kwargs)
        if _is_pieces(text):
            self._voice_design_prompts("x", instruct, language, False)          # checks
            feed = self._text_feed(language, instruct=instruct)
            return self._stream_text(text, feed, settings, non_streaming_mode, chunk_frames,
                                     first_chunk_frames)
        item = self._voice_design_prompts(text, instruct, language,
                                          _official_mode(non_streaming_mode, True))
        return self._stream(_single(item), settings, chunk_frames, first_chunk_frames)

    def generate_voice_clone_streaming(self, text, language=None, ref_audio=None,
                                       ref_text=None, x_vector_only_mode=False,
                                       voice_clone_prompt=None,
                                       non_streaming_mode: bool | None = None,
                                       chunk_frames: int = 12, first_chunk_frames: int = 3,
                                       **gen_kwargs):
        """Streaming twin of `generate_voice_clone` (text pieces included, see
        `generate_custom_voice_streaming`); in ICL mode the reference codes are decoded first
        and their audio cut, like the offline decode."""
        settings = GenerationSettings.merge(self.generate_defaults, **gen_kwargs)
        pieces = _is_pieces(text)
        built, voice = self._voice_clone_prompts(
            "x" if pieces else text, language, ref_audio, ref_text, x_vector_only_mode,
            voice_clone_prompt, _official_mode(non_streaming_mode, False) if not pieces else False)
        ref = voice[0].ref_code if voice[0].icl_mode else None
        if pieces:
            feed = self._text_feed(language, voice=voice[0])
            return self._stream_text(text, feed, settings, non_streaming_mode, chunk_frames,
                                     first_chunk_frames, ref_code=ref)
        return self._stream(_single(built), settings, chunk_frames, first_chunk_frames,
                            ref_code=ref)

    # ------------------------------------------------------------------ text in pieces
    def _text_feed(self, language: str | None, speaker: str | None = None,
                   instruct: str | None = None, voice: VoiceClonePromptItem | None = None):
        """A `server.engine.TextFeed` for one utterance whose text arrives in pieces (checked
        arguments): the prompt of the official streaming text mode for its speaker, instruction
        or cloned voice, built from the text tokens received so far. The server's WebSocket
        sessions and `_stream_text` use it."""
        from .server.engine import TextFeed

        cfg = self.config
        language = self._check_languages(["auto" if language is None else language])[0]
        template = self.tokenizer.encode(text_mod.assistant_text("x"))
        head, tail = template[:3], template[-5:]
        if self.tts_model_type == "custom_voice" and cfg.tts_model_size in "0b6":
            instruct = None              # the 0.6B CustomVoice ignores instruct (official)
        instruct_ids = self._instruct_ids(instruct)
        clone: dict = {}
        room, prefix = 1, []
        if voice is not None:    # a cloned voice: x-vector, or ICL with its reference
            clone = dict(xvector=voice.ref_spk_embedding
                         if (voice.x_vector_only_mode or voice.icl_mode) else None)
            if voice.icl_mode and voice.ref_code is not None:
                ref_ids = self.tokenizer.encode(text_mod.ref_text(voice.ref_text))
                clone.update(ref_ids=ref_ids, ref_code=voice.ref_code)
                room, prefix = 1 + len(voice.ref_code), ref_ids[3:-2]

        def build(tokens: list[int], final: bool) -> prompts.Prompt:
            # the prompt takes the text sequence's first `room` ids (TextFeed): one token, or
            # for an ICL clone as many as its reference frames hold (the rest is trailing)
            return prompts.build_prompt(cfg, head + tokens[:max(1, room - len(prefix))] + tail,
                                        language, speaker, instruct_ids, non_streaming_mode=False,
                                        **clone)

        return TextFeed(self.tokenizer, build, room=room, prefix=prefix,
                        eos_id=cfg.tts_eos_token_id, pad_id=cfg.tts_pad_token_id)

    def _stream_text(self, pieces, feed, settings: GenerationSettings, non_streaming_mode,
                     chunk_frames: int, first_chunk_frames: int, ref_code=None):
        """Audio chunks of one utterance whose text comes from the iterator `pieces`.

        The server's engine runs it (`server.engine.BatchEngine`, one row: what its WebSocket
        text sessions run): a thread reads the pieces into the `TextFeed` while the engine's
        thread generates, extending the frame loop's trailing text between chunks and never
        running a frame past the tokens received until the iterator ends. Tokens are committed
        where a word ends whatever follows (`server.engine.commit_point`), so the codes are
        those of the offline streaming-mode generation of the whole text with the same seed.
        Closing the generator early (or an exception from `pieces`) stops the generation.
        Reading stops once the text holds more tokens than `max_new_tokens` frames can read (an
        endless iterator ends the utterance at its budget, as the whole text would)."""
        if non_streaming_mode:
            raise ValueError("text in pieces is read in the official streaming text mode; "
                             "non_streaming_mode=True needs the whole text (a str)")
        _check_chunks(chunk_frames, first_chunk_frames)
        key = self._keys(settings.seed, 1, 1)[0]     # as the same seed for a str text
        return self._stream_text_chunks(pieces, feed, settings, key, chunk_frames,
                                        first_chunk_frames, ref_code)

    def _stream_text_chunks(self, pieces, feed, settings, key, chunk_frames, first_chunk_frames,
                            ref_code):
        import queue
        import threading

        from .server.engine import BatchEngine, Job

        out: queue.Queue = queue.Queue()
        job = Job(None, settings, emit=out.put, key=key, ref_code=ref_code, feed=feed)
        engine = BatchEngine(self, max_batch_size=1, batch_window=0.0, max_queue=1,
                             chunk_frames=chunk_frames, first_chunk_frames=first_chunk_frames)

        # Text tokens the frames can read (`TextFeed.trailing`): past them, reading stops (an
        # endless iterator too); so does a text with no place to commit tokens, past 32 chars
        # a token.
        readable = feed.room - len(feed.prefix) + settings.max_new_tokens
        max_chars = 32 * readable + 4096

        def read() -> None:
            try:
                for i, piece in enumerate(pieces):
                    if job.cancelled:
                        return
                    if not isinstance(piece, str):
                        raise TypeError(f"text piece {i} is a {type(piece).__name__}, not a str")
                    feed.push(piece)
                    engine.wake()
                    if len(feed.tokens) >= readable or len(feed.text) > max_chars:
                        break         # the rest could not be spoken within max_new_tokens
                if not feed.snapshot()[0] and not feed.text.strip():
                    raise ValueError("the text pieces ended without any text")
                feed.push("", final=True)
                engine.wake()
            except BaseException as e:  # noqa: BLE001 - handed to the consumer, who raises it
                job.cancelled = True
                out.put(e)

        engine.start()
        try:
            engine.submit(job)
            threading.Thread(target=read, name="qwen3-tts-text", daemon=True).start()
            while True:
                item = out.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            job.cancelled = True
            engine.stop()

    # ------------------------------------------------------------------ audio
    def decode(self, codes: Sequence[np.ndarray]):
        """Codes -> (list of float32 waves at 24 kHz, 24000) with the checkpoint's codec."""
        return self.speech_tokenizer.decode(list(codes))
