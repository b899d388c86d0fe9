"""`Qwen3TTS`: the official-style API (qwen_tts.Qwen3TTSModel names, arguments and defaults) over
the pure JAX core. It loads a checkpoint, checks the mode and the settings, and delegates: the
prompts to `prompts.py`, the runs to `runner.py` (offline, streamed) and `engine.py` (text in
pieces), the audio to the codec; everything per frame happens in `generate.py`.

    from qwen3_tts_jax import Qwen3TTS
    tts = Qwen3TTS.from_pretrained("Qwen/Qwen3-TTS-12Hz-0.6B-CustomVoice")
    wavs, sr = tts.generate_custom_voice("Hello there.", speaker="ryan", language="english")
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import os
from collections.abc import Iterator
from typing import Sequence

import jax
import numpy as np

from . import checkpoint, code_predictor, prompts, runner, segments, talker, text as text_mod
from .config import GenerationDefaults, Qwen3TTSConfig, load_config, load_generation_defaults
from .options import Options
from .prefix_cache import PrefixCache
from .compilation_cache import enable_compilation_cache  # noqa: F401 - public here too
from .budget import FRAMES_PER_TOKEN, text_budget
from .segments import SEGMENT_PAUSE
from .settings import GEN_KWARGS, GenerationSettings, SettingError, as_list, keys  # noqa: F401
from .voice import VoiceClonePromptItem, as_items


# The most rows of one padded batch of a call, per device (`Qwen3TTS.max_batch_rows`); fewer on
# a CPU, whose host memory the KV caches of many rows share with everything else.
MAX_BATCH_ROWS = {"cpu": 16}


def _single(items: list) -> "prompts.Prompt":
    if len(items) != 1:
        raise ValueError(f"streaming takes one text at a time, got {len(items)}")
    return items[0]


def _is_pieces(text) -> bool:
    """Text that arrives in pieces: an iterator of str (a generator), not a str or a list."""
    return isinstance(text, Iterator)


def _official_mode(non_streaming_mode, default: bool) -> bool:
    """The text mode of a whole text: as given, or the official default of the method."""
    return default if non_streaming_mode is None else non_streaming_mode


def _load_codec(folder: str, precision: str = "float32", weights_cache: str | None = None):
    from .codec import SpeechTokenizer

    sub = os.path.join(folder, "speech_tokenizer")
    if not os.path.isdir(sub):
        raise FileNotFoundError(
            f"{folder} has no speech_tokenizer/ folder: audio output needs the codec "
            "(the released checkpoints ship it; the *_codes methods work without it)")
    return SpeechTokenizer.from_pretrained(sub, precision=precision, weights_cache=weights_cache)


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
        self.codec_precision = "float32"   # the codec decoder's (`from_pretrained`)
        self.weights_cache = None          # the codec's too (`from_pretrained`)
        # KV of cloned voices' prompt prefixes, reused by the batching engines on this model
        # (`prefix_cache.py`; `PrefixCache(0)` disables it)
        self.prefix_cache = PrefixCache()
        # serialized compiled programs (`compilation_cache.Executables`; from_pretrained's
        # `compile_cache`), or None: JAX's jit
        self.executables = None
        # a call with more texts (or segments) runs them as batches of this many rows per device
        # in turn (`runner.run`: the same codes; the KV caches of this many rows at once)
        self.max_batch_rows = MAX_BATCH_ROWS.get(jax.default_backend(), 64)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, path_or_id: str, dtype=None, model_parallel: int = 1,
                        quantize: str | None = None,
                        options: Options | None = None, adapters=None,
                        weights_cache: str | None = None,
                        compile_cache: str | None = None,
                        codec_precision: str = "float32") -> "Qwen3TTS":
        """Load a local checkpoint folder (released layout, or converted by `qwen3-tts-jax convert`)
        or a hub id through huggingface_hub. `dtype`: default f32 on CPU, bf16 on GPU/TPU.

        `quantize="int8"` stores the talker's and the code predictor's decoder products as int8
        with a scale per output column (`quantize.py`): a quarter of the float32 bytes, 3x
        the CPU's batch-1 speed; not the official model's exact codes (benchmarks/RESULTS.md,
        "int8 weights", gives the measured closeness). `quantize="int4"`: 4-bit values with a
        scale per column and group of 32 k, on the CPU kernels only (elsewhere a ValueError
        naming the backend). Default: the weights as they are.

        `model_parallel` = m > 1 splits the decoder weights over m devices (tensor parallel, for
        a model that does not fit one device's memory, e.g. the 1.7B on small TPU cores): the
        local devices form a (data, model) mesh of shape (n / m, m); the weights go from host
        memory straight to their shards (never whole on one device); batches are split over the
        "data" axis. Same codes as one device (tests/test_batch.py).

        `options`: the static kernel and layout choices of generation (`options.Options`; None:
        `Options.for_backend()` for the weights' dtype), used by every call on this model.

        `adapters`: LoRA adapter folders (`finetune --lora`) merged into the weights at load, in
        float32, before packing and quantization (`lora.merge`); their speakers make the model a
        CustomVoice one, like `qwen3-tts-jax merge-adapter` would.

        `weights_cache`: a folder where the packed (and quantized) weights are kept after the
        first load; a later load with the same checkpoint files, dtype, quantization and options
        reads them from there instead of converting, packing and quantizing again
        (`checkpoint.load_for_inference`; one file per checkpoint and choices, about the size of
        the weights). Not used with `adapters` or `model_parallel` > 1. The codec's decoder
        params are kept there too (`SpeechTokenizer.from_pretrained(weights_cache=...)`).

        `compile_cache`: a folder where the compiled generation and codec programs are kept as
        serialized executables (`compilation_cache.Executables`): a later process with the same
        package, JAX, machine, config, options and shapes loads them instead of tracing and
        compiling. Not used with `model_parallel` > 1.

        `codec_precision="bf16"`: the codec's decoder convolutions in bf16 on AVX-512 BF16 CPUs
        (`SpeechTokenizer.from_pretrained(precision=...)`: faster, not the float32 audio); a
        ValueError elsewhere. Default "float32"."""
        from . import quantize as quantize_mod
        from .codec import decoder as codec_decoder

        quantize_mod.check_method(quantize)
        codec_decoder.check_precision(codec_precision)
        options = options or Options.for_backend(dtype=dtype or checkpoint.default_dtype())
        checkpoint.check_quantize(quantize, options)
        if model_parallel > 1:        # the Pallas kernels take whole weights on one device
            fields = ("predictor_kernels", "talker_kernels")
            asked = [f for f in fields if getattr(options, f) not in ("xla", "auto")]
            if asked:
                raise ValueError(f"Options.{asked[0]}={getattr(options, asked[0])!r} with "
                                 f"model_parallel={model_parallel}: the Pallas kernels take "
                                 f"whole weights on one device; use 'xla' with model_parallel")
            options = dataclasses.replace(options, **{f: "xla" for f in fields
                                                      if getattr(options, f) == "auto"})
        folder = checkpoint.resolve(path_or_id)
        cfg = load_config(folder)
        executables = None
        if compile_cache is not None and model_parallel == 1:
            from .compilation_cache import Executables

            model = repr([cfg, options, str(dtype), quantize]).encode()
            # programs read when first called: reading them ahead in a thread while the weights
            # load (`Executables.preload`) did not pay on two cores (RESULTS.md, Decisions)
            executables = Executables(compile_cache,
                                      group=hashlib.sha256(model).hexdigest()[:12] + "-")

        def load(dtype):
            nonlocal cfg
            if not adapters:
                return checkpoint.load_params(folder, cfg, dtype)
            import jax.numpy as jnp

            from . import lora
            params, cfg = lora.merge(checkpoint.load_params(folder, cfg, jnp.float32), cfg,
                                     folder, adapters, dtype or checkpoint.default_dtype())
            return params

        if model_parallel > 1:
            from .sharding import model_sharding

            dtype = dtype or checkpoint.default_dtype()
            with jax.default_device(jax.local_devices(backend="cpu")[0]):
                params = checkpoint.pack_for_inference(
                    load(dtype), consume=True, quantize=quantize,
                    options=options)
            params = jax.device_put(params, model_sharding(params, model_parallel))
        else:
            params = checkpoint.load_for_inference(
                folder, cfg, dtype, quantize, options, None if adapters else weights_cache,
                lambda: load(dtype))
        act_dtype = params["talker"]["codec_embedding"].dtype
        code_predictor.check_kernels(params["code_predictor"], cfg.talker.code_predictor,
                                     act_dtype, options)
        talker.check_kernels(params["talker"], cfg.talker, act_dtype, options)
        tok = text_mod.TextTokenizer.from_dir(folder)
        tts = cls(cfg, params, tok, load_generation_defaults(folder), folder, options)
        tts.model_parallel = model_parallel
        tts.executables = executables
        tts.codec_precision = codec_precision
        tts.weights_cache = weights_cache
        return tts

    def on_device(self, device) -> "Qwen3TTS":
        """This model with its weights (and its codec's decoder) copied to `device`: what runs
        on them runs there (JAX follows committed arrays). The copy shares the config, the text
        tokenizer and the codec's encoder; one per device makes a data-parallel pool
        (`engine.EnginePool`)."""
        if self.model_parallel > 1:
            raise ValueError("a model split over a mesh (model_parallel > 1) cannot be copied to "
                             "one device")
        other = copy.copy(self)
        other.params = jax.device_put(self.params, device)
        other._replicated = None
        other.executables = None        # its programs are compiled for the first device
        other.prefix_cache = PrefixCache(self.prefix_cache.max_bytes)   # KV on that device
        codec = copy.copy(self.speech_tokenizer) if os.path.isdir(
            os.path.join(self.folder, "speech_tokenizer")) else None
        if codec is not None:
            codec.params = jax.device_put(codec.params, device)
            codec.executables = None
        other._speech_tokenizer = codec
        return other

    def replicated_params(self):
        """The params on every local device (data-parallel runs), copied once."""
        if self._replicated is None:
            from .sharding import data_sharding

            self._replicated = jax.device_put(self.params, data_sharding()[1])
        return self._replicated

    def decode_kernels(self) -> dict:
        """What the frame loop's one-position decoder steps run, per part ("predictor": the code
        predictor's steps 1..14, "talker": its frame steps): "xla", the Pallas kernels' mode and
        the batches they take, or "xla" and why (`Options.predictor_kernels`, `talker_kernels`;
        the server's GET /health shows it)."""
        from . import decode_kernels as dk

        dtype, o = self.params["talker"]["codec_embedding"].dtype, self.options
        tp, cp = self.params["talker"], self.params["code_predictor"]
        return {"predictor": dk.describe(o.predictor_kernels, cp["layers"],
                                         self.config.talker.code_predictor, dtype,
                                         o.cache_layout, o.predictor_tiles),
                "talker": dk.describe(o.talker_kernels, tp["layers"], self.config.talker, dtype,
                                      o.cache_layout, o.talker_tiles)}

    @property
    def speech_tokenizer(self):
        """The 12 Hz codec (speech_tokenizer/ of the checkpoint), loaded on first use."""
        if self._speech_tokenizer is None:
            self._speech_tokenizer = _load_codec(self.folder, self.codec_precision,
                                                 self.weights_cache)
            self._speech_tokenizer.executables = self.executables
        return self._speech_tokenizer

    @property
    def tts_model_type(self) -> str:
        return self.config.tts_model_type

    def get_supported_speakers(self) -> list[str]:
        return sorted(self.config.speakers)

    def get_supported_languages(self) -> list[str]:
        return sorted(self.config.languages)

    def _require(self, kind: str, method: str):
        if self.config.tts_model_type != kind:
            have = self.config.tts_model_type
            hint = {"custom_voice": "generate_custom_voice(text, speaker=...)",
                    "voice_design": "generate_voice_design(text, instruct=...)",
                    "base": "generate_voice_clone(text, ref_audio=..., ...)"}[have]
            raise ValueError(f"{method} needs a {kind} checkpoint, but {self.folder} is a {have} "
                             f"checkpoint (tts_model_type={have!r}); use {hint} instead")

    def _settings(self, gen_kwargs: dict, text=None) -> GenerationSettings:
        """The call's checked settings. `max_new_tokens` may be an integer (the official), a
        list of them (one per utterance) or "auto": each text's own budget (`text_budgets`)."""
        m = gen_kwargs.get("max_new_tokens")
        if isinstance(m, str):
            if m != "auto":
                raise SettingError(f"max_new_tokens must be an integer, a list of them (one per "
                                   f"utterance) or 'auto', got {m!r}", "max_new_tokens")
            gen_kwargs = {**gen_kwargs, "max_new_tokens": self.text_budgets(text)}
        return GenerationSettings.merge(self.generate_defaults, **gen_kwargs)

    def text_budgets(self, text) -> list[int]:
        """`max_new_tokens="auto"`: for each text (a str or a list) `budget.text_budget` frames
        (6 s plus 15 frames per text token, about 4x typical speech) at most the checkpoint's
        `max_new_tokens`, so that an utterance that never ends (a runaway) stops seconds past its
        text instead of at the checkpoint's 11 minutes. Text in pieces (an iterator) gets the
        checkpoint's budget until it has ended, then its own (the streaming methods)."""
        cap = self.generate_defaults.max_new_tokens
        if text is None:
            raise ValueError("max_new_tokens='auto' needs the texts; with built prompts give "
                             "an integer or one per prompt")
        if _is_pieces(text):
            return [cap]
        texts = text if isinstance(text, list) else [text]
        prompts.check_texts(texts)
        return [min(cap, text_budget(len(self.tokenizer.encode(t)))) for t in texts]

    # ------------------------------------------------------------------ prompts of each mode
    def custom_voice_prompts(self, text, speaker, language=None, instruct=None,
                             non_streaming_mode: bool = True) -> list[prompts.Prompt]:
        """The checked prompts of `generate_custom_voice` (`prompts.custom_voice`)."""
        self._require("custom_voice", "generate_custom_voice")
        return prompts.custom_voice(self.config, self.tokenizer, text, speaker, language,
                                    instruct, non_streaming_mode)

    def voice_design_prompts(self, text, instruct, language=None,
                             non_streaming_mode: bool = True) -> list[prompts.Prompt]:
        """The checked prompts of `generate_voice_design` (`prompts.voice_design`)."""
        self._require("voice_design", "generate_voice_design")
        return prompts.voice_design(self.config, self.tokenizer, text, instruct, language,
                                    non_streaming_mode)

    def voice_clone_prompts(self, text, language=None, ref_audio=None, ref_text=None,
                            x_vector_only_mode=False, voice_clone_prompt=None,
                            non_streaming_mode: bool = False):
        """(prompts, voices) of `generate_voice_clone`: the voices from `voice_clone_prompt` (a
        voice file, the official dict, items) or encoded from `ref_audio`."""
        self._require("base", "generate_voice_clone")
        texts = text if isinstance(text, list) else [text]
        prompts.check_texts(texts)
        prompts.check_languages(self.config, as_list("auto" if language is None else language,
                                                     len(texts), "language"))
        voices = as_list(self._voices(ref_audio, ref_text, x_vector_only_mode,
                                      voice_clone_prompt), len(texts), "voice_clone_prompt")
        return prompts.voice_clone(self.config, self.tokenizer, texts, voices, language,
                                   non_streaming_mode), voices

    def _voices(self, ref_audio, ref_text, x_vector_only_mode, voice_clone_prompt):
        """The voices of a clone call: `voice_clone_prompt` as items, or `ref_audio` encoded."""
        self._require("base", "generate_voice_clone")
        if voice_clone_prompt is not None:
            return as_items(voice_clone_prompt)
        if ref_audio is None:
            raise ValueError("generate_voice_clone needs ref_audio (with ref_text for ICL "
                             "mode) or a voice_clone_prompt")
        return self.create_voice_clone_prompt(ref_audio, ref_text, x_vector_only_mode)

    def _in_segments(self, text, segment_chars, segment_pause, per_text: dict, gen_kwargs: dict,
                     run):
        """(waves, sr) of texts said in segments (`segments.py`): a text longer than
        `segment_chars` characters is cut at sentence ends (then clauses, words) into segments of
        at most that many, which `run(segments, **arguments)` says as rows of one batch with
        their text's speaker, language, instruction or voice, budget and seed (`segments.seeds`:
        a text that stays whole samples as it would unsplit); each text's segments are joined
        with `segment_pause` seconds of silence. Every row of the batch is a segment: a long
        text costs the rows of its segments at once, not their time one after another."""
        texts = text if isinstance(text, list) else [text]
        prompts.check_texts(texts)
        pause = segments.check_pause(segment_pause)
        parts, owners = segments.expand(texts, segment_chars)
        n = len(texts)

        def spread(name, value):        # a value per text -> a value per segment
            if not isinstance(value, (list, tuple)):
                return value
            values = as_list(value, n, name)
            return [values[i] for i in owners]

        kw = {name: spread(name, value) for name, value in per_text.items()}
        gen_kwargs = dict(gen_kwargs)
        if gen_kwargs.get("seed") is not None:
            gen_kwargs["seed"] = segments.seeds(gen_kwargs["seed"], owners, n)
        if isinstance(gen_kwargs.get("max_new_tokens"), (list, tuple)):
            gen_kwargs["max_new_tokens"] = spread("max_new_tokens", gen_kwargs["max_new_tokens"])
        wavs, sr = run(parts, **kw, **gen_kwargs)
        return segments.join(wavs, owners, n, round(pause * sr)), sr

    def text_prompt(self, language=None, speaker=None, instruct=None, voice=None):
        """The checked `prompts.PiecesPrompt` of an utterance whose text arrives in pieces, in
        this checkpoint's mode (what the server's WebSocket text sessions run)."""
        return prompts.pieces(self.config, self.tokenizer, language, speaker, instruct, voice)

    # ------------------------------------------------------------------ ahead-of-time warm-up
    def warmup_prompts(self, items: list[prompts.Prompt], batch_sizes=(1,), **gen_kwargs) -> float:
        """Compile, before any request, the programs that batches of these built prompts use,
        at each batch size (`runner.warmup`). Returns seconds. With the persistent compilation
        cache (`enable_compilation_cache`) a later process finds them on disk. On accelerators
        the programs are also those of the settings' sampler kind (greedy, top-k only, or
        general), so warm up with the settings the requests will use."""
        batch_sizes = list(batch_sizes) if isinstance(batch_sizes, (list, tuple, range)) else None
        if not batch_sizes or not all(isinstance(B, (int, np.integer)) and not isinstance(B, bool)
                                      and B >= 1 for B in batch_sizes):
            raise ValueError(f"batch_sizes must be a non-empty list of integers >= 1, got "
                             f"{batch_sizes!r}")
        if not items:
            raise ValueError("warmup needs at least one prompt (texts is empty)")
        return runner.warmup(self, items, batch_sizes, self._settings(gen_kwargs))

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
            items = self.custom_voice_prompts(
                texts, speaker or self.get_supported_speakers()[0], language, instruct,
                _official_mode(non_streaming_mode, True))
        elif kind == "voice_design":
            items = self.voice_design_prompts(texts, instruct or "A clear, neutral voice.",
                                              language, _official_mode(non_streaming_mode, True))
        else:
            if voice_clone_prompt is None:
                raise ValueError("warmup on a Base checkpoint needs voice_clone_prompt= (from "
                                 "create_voice_clone_prompt)")
            items, _ = self.voice_clone_prompts(texts, language, None, None, False,
                                                voice_clone_prompt,
                                                _official_mode(non_streaming_mode, False))
        if gen_kwargs.get("max_new_tokens") == "auto":
            gen_kwargs["max_new_tokens"] = max(self.text_budgets(texts))
        return self.warmup_prompts(items, batch_sizes, **gen_kwargs)

    # ------------------------------------------------------------------ custom voice
    def generate_custom_voice_codes(self, text, speaker, language=None, instruct=None,
                                    non_streaming_mode: bool = True, **gen_kwargs):
        """Codes (list of int32 (frames, 16) arrays) for preset speakers of a CustomVoice model.

        text/speaker/language/instruct: a value or a list (a batch). language None = "auto".
        gen_kwargs: do_sample, top_k, top_p, temperature, repetition_penalty, subtalker_dosample,
        subtalker_top_k, subtalker_top_p, subtalker_temperature, max_new_tokens (defaults from
        generation_config.json; also a list, one per text, or "auto": each text's own budget,
        `text_budgets`), seed (int, list of ints, or None for random).
        """
        settings = self._settings(gen_kwargs, text)
        items = self.custom_voice_prompts(text, speaker, language, instruct, non_streaming_mode)
        return runner.run(self, items, settings)

    def prepare_custom_voice(self, text, speaker, language=None, instruct=None,
                             non_streaming_mode: bool = True, **gen_kwargs):
        """(PromptBatch, generate.Settings, keys) for the functional form `generate.synthesize`."""
        settings = self._settings(gen_kwargs, text)
        return runner.prepare(self.config, self.options, self.custom_voice_prompts(
            text, speaker, language, instruct, non_streaming_mode), settings)

    def generate_custom_voice(self, text, speaker, language=None, instruct=None,
                              non_streaming_mode: bool = True, segment_chars: int | None = None,
                              segment_pause: float = SEGMENT_PAUSE, **gen_kwargs):
        """Speech for preset speakers: (list of float32 waves, 24000). Same arguments as
        `generate_custom_voice_codes`, and for long text `segment_chars` / `segment_pause`: each
        text longer than `segment_chars` characters said in segments cut at sentence ends, joined
        with `segment_pause` seconds of silence (`_in_segments`; default None: the official
        single pass)."""
        if segment_chars is not None:
            return self._in_segments(
                text, segment_chars, segment_pause,
                dict(speaker=speaker, language=language, instruct=instruct), gen_kwargs,
                lambda t, **kw: self.generate_custom_voice(
                    t, non_streaming_mode=non_streaming_mode, **kw))
        segments.check_pause(segment_pause)
        return self.decode(self.generate_custom_voice_codes(
            text, speaker, language, instruct, non_streaming_mode, **gen_kwargs))

    # ------------------------------------------------------------------ voice design
    def generate_voice_design_codes(self, text, instruct, language=None,
                                    non_streaming_mode: bool = True, **gen_kwargs):
        """Codes for a voice described in words (VoiceDesign model). See
        `generate_custom_voice_codes` for gen_kwargs."""
        settings = self._settings(gen_kwargs, text)
        items = self.voice_design_prompts(text, instruct, language, non_streaming_mode)
        return runner.run(self, items, settings)

    def prepare_voice_design(self, text, instruct, language=None, non_streaming_mode: bool = True,
                             **gen_kwargs):
        """(PromptBatch, generate.Settings, keys) for the functional form `generate.synthesize`."""
        settings = self._settings(gen_kwargs, text)
        return runner.prepare(self.config, self.options, self.voice_design_prompts(
            text, instruct, language, non_streaming_mode), settings)

    def generate_voice_design(self, text, instruct, language=None,
                              non_streaming_mode: bool = True, segment_chars: int | None = None,
                              segment_pause: float = SEGMENT_PAUSE, **gen_kwargs):
        """Speech for a voice described in words: (list of float32 waves, 24000); long text in
        segments as in `generate_custom_voice`."""
        if segment_chars is not None:
            return self._in_segments(
                text, segment_chars, segment_pause, dict(instruct=instruct, language=language),
                gen_kwargs, lambda t, **kw: self.generate_voice_design(
                    t, non_streaming_mode=non_streaming_mode, **kw))
        segments.check_pause(segment_pause)
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
        return runner.encode_voices(self, ref_audio, ref_text, x_vector_only_mode,
                                    ref_tail_silence)

    def generate_voice_clone_codes(self, text, language=None, ref_audio=None, ref_text=None,
                                   x_vector_only_mode=False, voice_clone_prompt=None,
                                   non_streaming_mode: bool = False, **gen_kwargs):
        """Codes in a cloned voice (Base model): the generated frames only (no reference)."""
        settings = self._settings(gen_kwargs, text)
        items, _ = self.voice_clone_prompts(text, language, ref_audio, ref_text,
                                            x_vector_only_mode, voice_clone_prompt,
                                            non_streaming_mode)
        return runner.run(self, items, settings)

    def generate_voice_clone(self, text, language=None, ref_audio=None, ref_text=None,
                             x_vector_only_mode=False, voice_clone_prompt=None,
                             non_streaming_mode: bool = False, segment_chars: int | None = None,
                             segment_pause: float = SEGMENT_PAUSE, **gen_kwargs):
        """Speech in a cloned voice: (list of float32 waves, 24000). In ICL mode the codes are
        decoded after the reference codes (as left context) and the reference part is cut, like
        the official. voice_clone_prompt: items from `create_voice_clone_prompt`, or a voice file
        path (`save_voice`). Long text in segments as in `generate_custom_voice` (the reference
        encoded once, every segment in its voice)."""
        if segment_chars is not None:
            voices = self._voices(ref_audio, ref_text, x_vector_only_mode, voice_clone_prompt)
            return self._in_segments(
                text, segment_chars, segment_pause,
                dict(language=language, voice_clone_prompt=voices), gen_kwargs,
                lambda t, **kw: self.generate_voice_clone(
                    t, non_streaming_mode=non_streaming_mode, **kw))
        segments.check_pause(segment_pause)
        settings = self._settings(gen_kwargs, text)
        built, items = self.voice_clone_prompts(text, language, ref_audio, ref_text,
                                                x_vector_only_mode, voice_clone_prompt,
                                                non_streaming_mode)
        return self.decode_voice_clone(runner.run(self, built, settings), items)

    def decode_voice_clone(self, codes: Sequence[np.ndarray], voice: list[VoiceClonePromptItem]):
        """Audio of cloned-voice codes: ICL items are decoded after their reference codes (left
        context for the codec) and the reference part is cut, like the official."""
        voice = as_list(list(voice), len(codes), "voice")
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
        return runner.run(self, items, self._settings(gen_kwargs), data_parallel=pad_batch_to > 1)

    # ------------------------------------------------------------------ streaming
    def _stream(self, text, build, pieces_prompt, settings, non_streaming_mode, chunk_frames,
                first_chunk_frames, ref_code=None, auto: bool = False, segment_chars=None,
                segment_pause: float = SEGMENT_PAUSE):
        """Audio chunks of one utterance: a whole text through `runner.stream` (with
        `segment_chars`, its segments one after another: `_stream_segments`), or text in
        pieces through the batching engine (`engine.stream_pieces`; with `auto`, the text's
        budget once it has ended). Arguments are checked now; the generator runs at the first
        next()."""
        runner.check_chunks(chunk_frames, first_chunk_frames)
        pause = segments.check_pause(segment_pause)
        if segment_chars is not None and not _is_pieces(text):
            return self._stream_segments(text, build, settings, segment_chars, pause, auto,
                                         chunk_frames, first_chunk_frames, ref_code)
        if not _is_pieces(text):
            return runner.stream(self, _single(build(text)), settings, chunk_frames,
                                 first_chunk_frames, ref_code)
        from . import engine, text_feed, text_session

        if non_streaming_mode:
            raise ValueError("text in pieces is read in the official streaming text mode; "
                             "non_streaming_mode=True needs the whole text (a str)")
        cut = None if segment_chars is None else segments.Stream(segment_chars)
        prompt, row = pieces_prompt(), settings.row(0, 1)
        seed = settings.seed[0] if isinstance(settings.seed, (list, tuple)) else settings.seed

        def make(j: int) -> engine.Job:
            """Segment j's job, keyed as row j of the offline call in segments (an int seed)
            or with the seed drawn for it (a list: `segments.seeds`); the first, as the same
            seed for a str text."""
            key = (keys([segments.segment_seed(seed, j)], 1, 1) if isinstance(
                settings.seed, (list, tuple)) else keys(seed, 1, 1, first_row=j))[0]
            return engine.Job(None, row, emit=None, key=key, ref_code=ref_code,
                              feed=text_feed.TextFeed.of(self.tokenizer, prompt),
                              frames_per_token=FRAMES_PER_TOKEN if auto else 0.0)

        session = text_session.TextSession(
            make, cut, round(pause * self.speech_tokenizer.sample_rate))
        return engine.stream_pieces(self, text, session, chunk_frames, first_chunk_frames)

    def _stream_segments(self, text, build, settings, segment_chars, pause, auto, chunk_frames,
                         first_chunk_frames, ref_code):
        """The chunks of one text said in segments (`_in_segments`), each segment streamed after
        the one before with `pause` seconds of silence between: the same audio as the offline
        call with the same seed (each segment samples as its row there)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        parts, owners = segments.expand([text], segment_chars)
        items = [_single(build(part)) for part in parts]      # every segment checked now
        budgets = self.text_budgets(parts) if auto else [settings.most_new_tokens] * len(parts)
        seeds = segments.seeds(settings.seed, owners, 1)
        gap = np.zeros(round(pause * self.speech_tokenizer.sample_rate), np.float32)

        def chunks():
            for j, item in enumerate(items):
                if j and len(gap):
                    yield gap
                seed = [seeds[j]] if isinstance(seeds, list) else seeds
                yield from runner.stream(
                    self, item, dataclasses.replace(settings, max_new_tokens=budgets[j], seed=seed),
                    chunk_frames, first_chunk_frames, ref_code,
                    row=0 if isinstance(seeds, list) else j)

        return chunks()

    def generate_custom_voice_streaming(self, text, speaker: str, language=None,
                                        instruct=None, non_streaming_mode: bool | None = None,
                                        chunk_frames: int = 12, first_chunk_frames: int = 3,
                                        segment_chars: int | None = None,
                                        segment_pause: float = SEGMENT_PAUSE, **gen_kwargs):
        """A generator of float32 24 kHz audio chunks (first after `first_chunk_frames` frames,
        then every `chunk_frames` = 80 ms each), for one text. Same arguments as
        `generate_custom_voice`; with the same seed the codes are the offline codes, and the chunks
        concatenate to the offline audio (float rounding; tests/test_runner.py).

        `text` may also be an iterator of str pieces (a generator: an LLM's output as it comes):
        the text is then read in the official streaming text mode (`non_streaming_mode` False,
        one text token per frame), speech starts once the first word is there, and no frame
        reads text that has not arrived; the audio is the offline streaming-mode audio of the
        whole text (`engine.stream_pieces`).

        `segment_chars` / `segment_pause`: a long text streamed segment after segment, the
        chunks of the offline call with the same arguments (`_stream_segments`); text in pieces
        is cut as it arrives where the whole text would be (`segments.Stream`), each segment
        read in the streaming text mode."""
        self._require("custom_voice", "generate_custom_voice")
        return self._stream(
            text, lambda t: self.custom_voice_prompts(t, speaker, language, instruct,
                                                      _official_mode(non_streaming_mode, True)),
            lambda: self.text_prompt(language, speaker=speaker, instruct=instruct),
            self._settings(gen_kwargs, text), non_streaming_mode, chunk_frames,
            first_chunk_frames, auto=gen_kwargs.get("max_new_tokens") == "auto",
            segment_chars=segment_chars, segment_pause=segment_pause)

    def generate_voice_design_streaming(self, text, instruct: str, language=None,
                                        non_streaming_mode: bool | None = None,
                                        chunk_frames: int = 12, first_chunk_frames: int = 3,
                                        segment_chars: int | None = None,
                                        segment_pause: float = SEGMENT_PAUSE, **gen_kwargs):
        """Streaming twin of `generate_voice_design` (see `generate_custom_voice_streaming`,
        text pieces included)."""
        self._require("voice_design", "generate_voice_design")
        return self._stream(
            text, lambda t: self.voice_design_prompts(t, instruct, language,
                                                      _official_mode(non_streaming_mode, True)),
            lambda: self.text_prompt(language, instruct=instruct),
            self._settings(gen_kwargs, text), non_streaming_mode, chunk_frames,
            first_chunk_frames, auto=gen_kwargs.get("max_new_tokens") == "auto",
            segment_chars=segment_chars, segment_pause=segment_pause)

    def generate_voice_clone_streaming(self, text, language=None, ref_audio=None,
                                       ref_text=None, x_vector_only_mode=False,
                                       voice_clone_prompt=None,
                                       non_streaming_mode: bool | None = None,
                                       chunk_frames: int = 12, first_chunk_frames: int = 3,
                                       segment_chars: int | None = None,
                                       segment_pause: float = SEGMENT_PAUSE, **gen_kwargs):
        """Streaming twin of `generate_voice_clone` (text pieces included, see
        `generate_custom_voice_streaming`); in ICL mode the reference codes are decoded first
        and their audio cut, like the offline decode."""
        self._require("base", "generate_voice_clone")
        settings = self._settings(gen_kwargs, text)
        voices = self._voices(ref_audio, ref_text, x_vector_only_mode, voice_clone_prompt)
        if len(voices) != 1:
            raise ValueError(f"streaming takes one voice, got {len(voices)}")
        voice = voices[0]
        return self._stream(
            text, lambda t: self.voice_clone_prompts(
                t, language, voice_clone_prompt=voices,
                non_streaming_mode=_official_mode(non_streaming_mode, False))[0],
            lambda: self.text_prompt(language, voice=voice), settings, non_streaming_mode,
            chunk_frames, first_chunk_frames,
            ref_code=voice.ref_code if voice.icl_mode else None,
            auto=gen_kwargs.get("max_new_tokens") == "auto", segment_chars=segment_chars,
            segment_pause=segment_pause)

    # ------------------------------------------------------------------ audio
    def decode(self, codes: Sequence[np.ndarray]):
        """Codes -> (list of float32 waves at 24 kHz, 24000) with the checkpoint's codec."""
        return self.speech_tokenizer.decode(list(codes))
