"""The HTTP API (FastAPI): OpenAI's `POST /v1/audio/speech` over the batching engine, voices,
health. Built by `create_app(tts, ServerOptions(...))`; `qwen3-tts-jax serve` runs it with uvicorn.

    POST   /v1/audio/speech        {"model", "input", "voice", "response_format", "speed",
                                    "instructions", "stream_format"} + official generation settings
    GET    /v1/audio/voices        preset speakers and registered (cloned) voices
    POST   /v1/audio/voices        multipart: name, audio_sample (file), transcript (Base only)
    DELETE /v1/audio/voices/{id}
    WS     /v1/audio/speech/stream  text in pieces (e.g. from an LLM) -> pcm audio as it is made
    GET    /v1/models, GET /health, GET /metrics (Prometheus: metrics.py)

Errors are OpenAI-shaped, `{"error": {"message", "type", "param", "code"}}`, with the status saying
who must act: 400 bad request, 401 no key, 403 a browser origin not allowed, 404 unknown voice id,
409 name taken, 413 too long or too large, 415 not a JSON body, 421 a Host not this server's, 429
queue full (with Retry-After), 504 out of time, 500 a server bug. A stream cut after its status
was sent ends visibly: an SSE `error` event, or a raw (pcm/wav) body closed without its end
(errors.py; the checks before a route runs, key, origins and Host: guards.py). See
docs/serving.md ("Limits, and what the client gets").
"""
from __future__ import annotations

import asyncio
import base64
import dataclasses
import io
import json
import logging
import os
import re
import struct
import time

import jax
import numpy as np
from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.middleware.cors import CORSMiddleware
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from .. import prompts
from ..audio import MAX_SECONDS, AudioError, AudioTooLong, encode_audio_file, output_formats, \
    read_file
from ..buckets import ladder
from ..voice import load_voice, save_voice
from ..engine import BatchEngine, DeadlineExceeded, EnginePool, Job, QueueFull
from ..engine import EngineUnavailable, max_prompt_tokens, memory_budget
from ..budget import FRAMES_PER_TOKEN, text_budget
from ..settings import GEN_KWARGS, GenerationSettings
from ..text_feed import TextFeed
from .errors import ApiError, error_body, error_response
from .guards import ApiKeyCheck, BrowserGuard, cors_origins, parse_origins, redact_api_keys_in_logs
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE, MISSING as METRICS_MISSING, Metrics

log = logging.getLogger("qwen3_tts_jax.server")

SAMPLE_RATE = 24000
MEDIA_TYPES = {"wav": "audio/wav", "pcm": "audio/pcm", "flac": "audio/flac", "mp3": "audio/mpeg",
               "opus": "audio/ogg", "aac": "audio/aac"}
STREAMED = ("wav", "pcm")          # sent chunk by chunk as frames are generated
OPENAI_VOICES = ("alloy", "ash", "ballad", "coral", "echo", "fable", "onyx", "nova", "sage",
                 "shimmer", "verse", "marin", "cedar")
SPEECH_FIELDS = ("model", "input", "voice", "response_format", "speed", "instructions",
                 "stream_format", "language", "non_streaming_mode") + GEN_KWARGS
VOICE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MAX_BODY_BYTES = 1 << 20           # a speech request is JSON text; 1 MiB is far above 4096 chars
MAX_UPLOAD_BYTES = 32 << 20        # reference audio (60 s at most is used anyway)
FORM_BYTES = 1 << 20               # a voice registration's other fields (name, transcript, ...)


@dataclasses.dataclass
class ServerOptions:
    """Server-wide settings (the `serve` command's flags)."""
    model_name: str = "qwen3-tts"
    voices_dir: str | None = None
    max_batch_size: int = 8
    batch_window_ms: float = 10.0
    max_queue: int = 64
    max_input_chars: int = 4096
    request_timeout: float = 300.0
    chunk_frames: int = 12
    first_chunk_frames: int = 3
    admit_frames: int | None = None  # a request joins a running batch within this many frames
    chunk_ramp: bool = False         # a stream's chunks grow from its first (engine.BatchEngine)
    batch_buckets: tuple[int, ...] | None = None               # default: powers of two
    min_prompt_bucket: int = 16
    language: str | None = None                                # default language
    non_streaming_mode: bool | None = None                     # default text mode
    defaults: dict = dataclasses.field(default_factory=dict)   # CLI generation flags
    max_new_tokens: int | None = None                          # server-wide cap
    frames_per_token: float = FRAMES_PER_TOKEN  # a request without max_new_tokens: at most
                                                # `budget.text_budget` of its text (0: the cap)
    warmup: tuple[int, ...] = ()     # prompt lengths (tokens) whose buckets compile at start
    warmup_whole_file: bool = False  # with warmup: also the whole-file formats' codec windows
    continuous_batching: bool = True # waiting requests start in a running batch's free rows
    devices: int | None = None       # local devices, one engine each (default: all)
    api_key: str | None = None       # every path but /health needs `Authorization: Bearer <key>`
    allowed_origins: tuple[str, ...] = ()   # browser origins (scheme://host[:port]) let in; "*": any
    max_body_bytes: int = MAX_BODY_BYTES       # a JSON request body, counted as it arrives
    max_upload_bytes: int = MAX_UPLOAD_BYTES   # a voice registration's audio file
    max_prompt_tokens: int | None = None  # default: from the device's memory (engine.py)
    max_sessions: int = 16           # WebSocket text sessions open at once (429 beyond)
    session_idle_timeout: float = 30.0  # seconds a session may wait for its next message
    stall_timeout: float = 300.0     # /health is 503 after this long without engine progress


# ---------------------------------------------------------------------------------- audio formats
def supported_formats() -> list[str]:
    """wav and pcm always; flac, mp3 and opus where this libsndfile can write them
    (`audio.output_formats`; OpenAI's names, so its ogg/Vorbis is not offered)."""
    return ["wav", "pcm"] + [f for f in ("flac", "mp3", "opus") if f in output_formats()]


def pcm16(wave: np.ndarray) -> bytes:
    """float32 [-1, 1] -> s16le bytes (clipped)."""
    return (np.clip(wave, -1.0, 1.0) * 32767.0).round().astype("<i2").tobytes()


def wav_header(sample_rate: int = SAMPLE_RATE, data_bytes: int | None = None) -> bytes:
    """A 16-bit mono WAV header. For a stream of unknown length the RIFF and data sizes are
    0xFFFFFFFF, which players and libsndfile read as "until the end of the file"."""
    size = 0xFFFFFFFF if data_bytes is None else data_bytes
    riff = 0xFFFFFFFF if data_bytes is None else 36 + data_bytes
    return (b"RIFF" + struct.pack("<I", riff) + b"WAVE" + b"fmt " +
            struct.pack("<IHHIIHH", 16, 1, 1, sample_rate, sample_rate * 2, 2, 16) +
            b"data" + struct.pack("<I", size))


def encode_audio(wave: np.ndarray, fmt: str) -> bytes:
    """A whole utterance in a file format (the formats that are not streamed)."""
    if fmt == "wav":
        data = pcm16(wave)
        return wav_header(SAMPLE_RATE, len(data)) + data
    if fmt == "pcm":
        return pcm16(wave)
    return encode_audio_file(wave, SAMPLE_RATE, fmt)


async def read_body(request: Request, limit: int, what: str = "the request body") -> bytes:
    """The body, counted as it arrives: a Content-Length over `limit` is refused before reading,
    and the reading stops at once (413) when the bytes pass it, so no more than `limit` is held."""
    _check_length(request, limit, what)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"{what} is over {limit} bytes; at most {limit}",
                           code="body_too_large")
    return bytes(body)


def _check_length(request: Request, limit: int, what: str) -> None:
    length = request.headers.get("content-length")
    if length is not None:
        if not length.strip().isdigit():
            raise ApiError(400, f"Content-Length {length[:40]!r} is not a number")
        if int(length) > limit:
            raise ApiError(413, f"{what} is {int(length)} bytes; at most {limit}",
                           code="body_too_large")


def bounded(request: Request, limit: int, what: str) -> Request:
    """The request with a receive that counts body bytes and raises 413 past `limit` (for
    parsers that read the stream themselves: the multipart form)."""
    _check_length(request, limit, what)
    seen = 0

    async def receive():
        nonlocal seen
        message = await request.receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise ApiError(413, f"{what} is over {limit} bytes; at most {limit}",
                               code="body_too_large")
        return message

    return Request(request.scope, receive)


def loads(text, what: str = "the request body") -> object:
    """json.loads with every malformed input a 400: bad syntax, invalid UTF-8, nesting past the
    parser's recursion limit, integers too long to convert."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ApiError(400, f"{what} is JSON nested too deeply") from None
    except UnicodeDecodeError as e:
        raise ApiError(400, f"{what} is not UTF-8 text: {e}") from None
    except ValueError as e:       # JSONDecodeError, and int() limits
        raise ApiError(400, f"{what} is not valid JSON: {e}") from None


def _unicode(value: str, field: str) -> None:
    """Text must encode to UTF-8 (JSON's \\ud800 escapes decode to unpaired surrogates)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(400, f"`{field}` holds an unpaired surrogate (\\ud800-\\udfff): not "
                            "valid Unicode text", field) from None


class ClientGone(Exception):
    """The client disconnected (the request was cancelled)."""


class Truncated(Exception):
    """Ends a raw audio stream without its terminator, so the client sees a cut body."""


class AudioStream(StreamingResponse):
    """A streamed audio body. It does not listen for the disconnect itself (the request's own
    watcher does, from before the first chunk); when the body iterator raises Truncated, the
    response ends without its final (empty) chunk: uvicorn closes the connection and the client
    sees an incomplete chunked body instead of a clean end."""

    async def __call__(self, scope, receive, send):
        try:
            await self.stream_response(send)
        except (Truncated, OSError, ClientDisconnect):
            return
        finally:
            await self.body_iterator.aclose()      # its `finally` cancels the job at once


# ---------------------------------------------------------------------------------- voices
class VoiceStore:
    """Cloned voices: one voice file per name in `folder` (`save_voice` format), loaded at start."""

    def __init__(self, folder: str | None):
        self.folder = folder
        self.voices: dict[str, list] = {}
        self.created: dict[str, int] = {}
        if folder:
            os.makedirs(folder, exist_ok=True)
            for f in sorted(os.listdir(folder)):
                if not f.endswith(".voice"):
                    continue
                path = os.path.join(folder, f)
                try:
                    self.voices[f[:-6]] = load_voice(path)
                    self.created[f[:-6]] = int(os.path.getmtime(path))
                except ValueError as e:
                    log.warning("skipping voice file %s: %s", path, e)

    def add(self, name: str, items: list) -> None:
        if self.folder:
            save_voice(items, os.path.join(self.folder, f"{name}.voice"))
        self.voices[name] = items
        self.created[name] = int(time.time())

    def remove(self, name: str) -> None:
        del self.voices[name]
        if self.folder:
            path = os.path.join(self.folder, f"{name}.voice")
            if os.path.exists(path):
                os.unlink(path)


# ---------------------------------------------------------------------------------- requests
@dataclasses.dataclass
class SpeechRequest:
    job: Job
    fmt: str
    sse: bool


def _check_type(data: dict, key: str, types: tuple, what: str):
    """data[key] if it is None or of `types` (a bool is not a number here), else a 400."""
    v = data.get(key)
    if v is not None and (not isinstance(v, types) or isinstance(v, bool) and bool not in types):
        raise ApiError(400, f"`{key}` must be {what}, got {json.dumps(v)[:80]}", key)
    return v


class Server:
    """The state behind the routes: model, engine, voices, options."""

    def __init__(self, tts, options: ServerOptions):
        self.tts = tts
        self.options = options
        self.kind = tts.config.tts_model_type
        self.formats = supported_formats()
        self.decode_kernels = tts.decode_kernels()
        self.voices = VoiceStore(options.voices_dir if self.kind == "base" else None)
        cap = options.max_new_tokens or tts.generate_defaults.max_new_tokens
        self.max_new_tokens = min(cap, tts.config.talker.max_position_embeddings - 1)
        local = jax.local_devices()
        n = len(local) if options.devices is None else options.devices
        if not 1 <= n <= len(local):
            raise ValueError(f"devices={n}: this host has {len(local)} local device(s) "
                             f"({local[0].platform}); use 1 to {len(local)}")
        kw = dict(max_batch_size=options.max_batch_size,
                  batch_window=options.batch_window_ms / 1000, max_queue=options.max_queue,
                  chunk_frames=options.chunk_frames, first_chunk_frames=options.first_chunk_frames,
                  admit_frames=options.admit_frames, chunk_ramp=options.chunk_ramp,
                  batch_buckets=options.batch_buckets,
                  min_prompt_bucket=options.min_prompt_bucket,
                  refill=options.continuous_batching, stall_timeout=options.stall_timeout,
                  min_frames=self.max_new_tokens)   # one KV-cache shape, whatever the budgets
        # one device: the engine over the loaded weights; several: an engine per device
        self.devices = n
        self.engine = BatchEngine(tts, **kw) if n == 1 else EnginePool(tts, local[:n], **kw)
        self.started = time.time()
        self.truncated = 0           # streams cut after their status was sent (deadline, failure)
        self.max_prompt_tokens, self.prompt_budget = self._prompt_limit()
        self.sessions_open = 0
        self.metrics = Metrics(self)       # GET /metrics
        if not self.metrics.available:
            log.warning(METRICS_MISSING)

    def _prompt_limit(self) -> tuple[int, str]:
        """(--max-prompt-tokens, how it was set): given, or the longest prompt whose largest
        batch fits half the device's free memory (`engine.max_prompt_tokens`)."""
        if self.options.max_prompt_tokens is not None:
            if self.options.max_prompt_tokens < 1:
                raise ValueError("max_prompt_tokens must be >= 1")
            return self.options.max_prompt_tokens, "--max-prompt-tokens"
        budget, where = memory_budget()
        rows = self.engine.batch_buckets[-1]
        n = max_prompt_tokens(self.tts, rows, self.max_new_tokens, budget,
                              self.options.min_prompt_bucket)
        log.info("prompts are limited to %d tokens: a batch of %d rows fits %s", n, rows, where)
        return n, f"a batch of {rows} fits {where}"

    def check_prompt_tokens(self, prompt) -> None:
        """413 for a prompt (its positions and trailing text: input, instructions, a voice's
        transcript and reference frames) longer than --max-prompt-tokens."""
        n = len(prompt) + len(prompt.trailing)
        if n > self.max_prompt_tokens:
            raise ApiError(413, f"the prompt is {n} tokens (input, instructions and the voice's "
                                f"reference together); this server takes at most "
                                f"{self.max_prompt_tokens} (max_prompt_tokens): shorten them",
                           "input", code="prompt_too_long")

    # ----------------------------------------------------------------------------- warm-up
    def warmup(self) -> float | None:
        """Compile, before the first request, the programs of every batch bucket at the prompt
        buckets of `options.warmup` (prompt lengths in tokens), with the server's default
        settings, voice and text mode (`BatchEngine.warmup`). A Base model warms up with its
        first registered voice, or not at all when it has none. Returns seconds, or None."""
        lengths = self.options.warmup
        if not lengths:
            return None
        names = self.voice_names()
        if self.kind == "base" and not names:
            log.warning("warm-up skipped: this Base model has no registered voice yet")
            return None
        body = {"model": self.options.model_name, "voice": names[0] if names else None,
                "instructions": "A clear, neutral voice." if self.kind == "voice_design"
                else None, "response_format": "pcm"}
        # k words of "a" make a prompt of (that of one word) + k - 1 tokens (one token a word)
        one = len(self.parse_speech({**body, "input": "a"}).job.prompt)
        jobs, shapes = [], set()
        for n in sorted(lengths):
            try:
                job = self.parse_speech({**body, "input": " ".join(["a"] * max(1, n - one + 1))
                                         }).job
            except ApiError as e:
                log.warning("warm-up at %d prompt tokens skipped: %s", n, e)
                continue
            shape = (ladder(len(job.prompt), self.options.min_prompt_bucket),
                     ladder(len(job.prompt.trailing)))
            if shape not in shapes:
                shapes.add(shape)
                jobs.append(job)
        whole = 0
        if self.options.warmup_whole_file:  # the longest utterance: a reference + the cap
            refs = [len(i.ref_code) for items in self.voices.voices.values() for i in items
                    if getattr(i, "ref_code", None) is not None] if self.kind == "base" else []
            whole = self.max_new_tokens + max(refs, default=0)
        seconds = self.engine.warmup(jobs, whole_file_frames=whole)
        primed = self._prime_voices()
        log.info("warm-up: batch buckets %s x (prompt, trailing text) buckets %s%s compiled in "
                 "%.1f s", list(self.engine.batch_buckets), sorted(shapes),
                 f" and whole-file decodes up to {whole} frames" if whole else "", seconds)
        if primed:
            log.info("warm-up: the caches of %d registered voice(s) filled", primed)
        return seconds

    def _prime_voices(self) -> int:
        """At start (with the warm-up): fill the registered voices' caches, the newest first,
        while they take one more without evicting one. Returns how many."""
        primed = 0
        if self.kind == "base":
            for name in sorted(self.voices.voices, key=lambda n: -self.voices.created[n]):
                if not self.engine.caches_have_room():
                    break
                self.prime_voice(name).result()
                primed += 1
        return primed

    # ----------------------------------------------------------------------------- voices
    def voice_names(self) -> list[str]:
        """The voices a request may name: a CustomVoice checkpoint's preset speakers, a Base
        checkpoint's registered voices (not listed in errors: GET /v1/audio/voices has them)."""
        if self.kind == "custom_voice":
            return self.tts.get_supported_speakers()
        if self.kind == "base":
            return sorted(self.voices.voices)
        return []

    def _voice(self, data: dict) -> str | None:
        voice = data.get("voice")
        if isinstance(voice, dict):
            voice = voice.get("id")
        if self.kind == "voice_design":
            return None     # the voice is described in `instructions`
        listed = (f"valid voices: {self.voice_names()}" if self.kind == "custom_voice" else
                  "the registered voices are listed by GET /v1/audio/voices")
        if voice is None or voice == "":
            raise ApiError(400, f"`voice` is required; {listed}", "voice")
        if not isinstance(voice, str):
            raise ApiError(400, "`voice` must be a string or {\"id\": string}", "voice")
        names = self.voice_names()
        match = {v.lower(): v for v in names}.get(voice.lower())
        if match is None:
            hint = (" (OpenAI's voice names are not mapped: pick one of this model's)"
                    if voice.lower() in OPENAI_VOICES else "")
            if self.kind == "base" and not names:
                hint += "; register one first with POST /v1/audio/voices"
            raise ApiError(400, f"unknown voice {voice!r}{hint}; {listed}", "voice")
        return match

    # ----------------------------------------------------------------------------- speech
    def parse_speech(self, data) -> SpeechRequest:
        """Validate a speech request and build its prompt; ApiError names the problem."""
        if not isinstance(data, dict):
            raise ApiError(400, "the request body must be a JSON object")
        unknown = sorted(set(data) - set(SPEECH_FIELDS))
        if unknown:
            raise ApiError(400, f"unknown field(s) {unknown}; valid fields: {list(SPEECH_FIELDS)}",
                           unknown[0])
        if not isinstance(data.get("model"), str) or not data["model"]:
            raise ApiError(400, "`model` is required (any name; this server has one model, "
                                f"{self.options.model_name!r})", "model")
        text = data.get("input")
        if not isinstance(text, str):
            raise ApiError(400, "`input` is required: the text to speak (a string)", "input")
        if not text.strip():
            raise ApiError(400, "`input` is empty or whitespace only: nothing to say", "input")
        self._check_chars("input", text)
        fmt = _check_type(data, "response_format", (str,), "a string") or "mp3"
        if fmt not in self.formats:
            raise ApiError(400, f"response_format {fmt!r} is not supported here; supported: "
                                f"{self.formats}", "response_format")
        stream_format = _check_type(data, "stream_format", (str,), "a string") or "audio"
        if stream_format not in ("audio", "sse"):
            raise ApiError(400, f"stream_format must be 'audio' or 'sse', got {stream_format!r}",
                           "stream_format")
        if stream_format == "sse" and fmt not in STREAMED:
            raise ApiError(400, f"stream_format 'sse' streams {list(STREAMED)} only; got "
                                f"response_format {fmt!r}", "stream_format")
        speed = _check_type(data, "speed", (int, float), "a number")
        if speed is not None and speed != 1.0:
            raise ApiError(400, f"speed {speed} is not supported: Qwen3-TTS has no speed control "
                                "and resampling would change the pitch; leave speed at 1.0 (or "
                                "ask for a pace in `instructions` on a 1.7B model)", "speed")
        instructions = _check_type(data, "instructions", (str,), "a string")
        if instructions:
            self._check_chars("instructions", instructions)
        language = (_check_type(data, "language", (str,), "a string") or self.options.language
                    or "auto")
        nsm = _check_type(data, "non_streaming_mode", (bool,), "true or false")
        nsm = self.options.non_streaming_mode if nsm is None else nsm
        gen = {**self.options.defaults,
               **{k: data[k] for k in GEN_KWARGS if data.get(k) is not None}}
        if gen.get("max_new_tokens") is None:    # bounded by its text: a runaway stops soon
            gen["max_new_tokens"] = self.max_new_tokens
            if self.options.frames_per_token:
                gen["max_new_tokens"] = min(self.max_new_tokens, text_budget(
                    len(self.tts.tokenizer.encode(text)), self.options.frames_per_token))
        m = gen["max_new_tokens"]
        if isinstance(m, int) and not isinstance(m, bool) and m > self.max_new_tokens:
            raise ApiError(400, f"max_new_tokens {gen['max_new_tokens']} is above this server's "
                                f"cap of {self.max_new_tokens}", "max_new_tokens")
        seed = gen.pop("seed", None)
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)
                                 or not 0 <= seed < 2 ** 31):
            raise ApiError(400, f"seed must be an integer in [0, 2**31), got {seed!r}", "seed")
        try:
            settings = GenerationSettings.merge(self.tts.generate_defaults, **gen)
        except (ValueError, TypeError) as e:
            raise ApiError(400, str(e), getattr(e, "param", None)) from None
        voice = self._voice(data)
        tts, ref_code, voices = self.tts, None, None
        if self.kind == "voice_design" and not instructions:
            raise ApiError(400, "this is a VoiceDesign model: describe the voice in "
                                "`instructions` (e.g. 'A warm, low female voice')", "instructions")
        if self.kind == "base":
            if instructions:
                raise ApiError(400, "`instructions` are not supported by voice cloning (Base "
                                    "models); leave them out", "instructions")
            voices = self.voices.voices[voice][:1]
            if voices[0].icl_mode and voices[0].ref_code is not None:
                ref_code = voices[0].ref_code
        transcript = (voices[0].ref_text or "") if ref_code is not None else ""
        total = len(text) + len(instructions or "") + len(transcript)
        if total > 2 * self.options.max_input_chars:
            raise ApiError(413, f"`input`, `instructions` and the voice's transcript are {total} "
                                f"characters together; this server takes at most "
                                f"{2 * self.options.max_input_chars}: split the text", "input")
        try:
            items = prompts.for_mode(tts.config, tts.tokenizer, text, language, speaker=voice,
                                     instruct=instructions, voices=voices, non_streaming_mode=nsm)
        except (ValueError, TypeError) as e:
            raise ApiError(400, str(e)) from None
        prompt = items[0]
        limit = tts.config.talker.max_position_embeddings
        if len(prompt) + settings.max_new_tokens > limit:
            raise ApiError(413, f"the prompt is {len(prompt)} tokens and max_new_tokens is "
                                f"{settings.max_new_tokens}: together more than the model's "
                                f"{limit} positions; split the text or lower max_new_tokens",
                           "input")
        self.check_prompt_tokens(prompt)
        job = Job(prompt, settings, emit=None, seed=seed, ref_code=ref_code,
                  stream=fmt in STREAMED,
                  deadline=time.monotonic() + self.options.request_timeout)
        return SpeechRequest(job, fmt, stream_format == "sse")

    def _check_chars(self, field: str, text: str) -> None:
        """`--max-input-chars` holds for each text field (`input`, `instructions`, a voice's
        `transcript`); their sum in one prompt for twice it (parse_speech)."""
        _unicode(text, field)
        limit = self.options.max_input_chars
        if len(text) > limit:
            raise ApiError(413, f"`{field}` is {len(text)} characters; this server takes at most "
                                f"{limit}: split the text", field)

    async def speech(self, request: Request) -> Response:
        try:
            body = await read_body(request, self.options.max_body_bytes)
        except ClientDisconnect:
            return Response(status_code=400)       # nobody reads it
        req = self.parse_speech(loads(body))
        job = req.job
        loop = asyncio.get_running_loop()
        chunks: asyncio.Queue = asyncio.Queue()
        job.emit = self.metrics.watch(
            job, "speech", lambda item: loop.call_soon_threadsafe(chunks.put_nowait, item))
        try:
            self.engine.submit(job)
        except QueueFull as e:
            raise ApiError(429, f"the server is busy: {e}", headers={"Retry-After": "1"}) from None

        async def watch():
            """The client's disconnect, from the queue to the last chunk, for every format:
            the job is cancelled (the engine drops it, queued or running)."""
            while (await request.receive())["type"] != "http.disconnect":
                pass
            job.cancelled = True
            chunks.put_nowait(ClientGone())

        watcher = asyncio.create_task(watch())

        async def next_chunk():
            try:
                item = await asyncio.wait_for(chunks.get(), job.deadline - time.monotonic() + 1)
            except asyncio.TimeoutError:
                job.cancelled = True
                raise DeadlineExceeded("the request ran out of time") from None
            if isinstance(item, Exception):
                raise item
            return item

        streaming = False
        try:
            first = await next_chunk()
            if req.fmt in STREAMED:
                streaming = True     # the watcher lives on with the body (`_stream` ends it)
                return AudioStream(self._stream(req, first, next_chunk, watcher),
                                   media_type="text/event-stream" if req.sse
                                   else MEDIA_TYPES[req.fmt])
            waves = []
            while first is not None:
                waves.append(first)
                first = await next_chunk()
        except ClientGone:
            return Response(status_code=499)       # nobody reads it
        except DeadlineExceeded as e:
            raise ApiError(504, f"{e} (the limit is {self.options.request_timeout:g} s)") from None
        finally:
            if not streaming:
                job.cancelled = True   # no-op once finished; stops the row if the client left
                watcher.cancel()
        fmt = req.fmt
        data = await asyncio.to_thread(lambda: encode_audio(
            np.concatenate(waves) if waves else np.zeros(0, np.float32), fmt))
        return Response(data, media_type=MEDIA_TYPES[fmt],
                        headers={"X-Finish-Reason": job.finish_reason or "stop"})

    async def _stream(self, req: SpeechRequest, first, next_chunk, watcher):
        """The response body of a streamed request. Once it has started its status (200) is sent,
        so a deadline or failure can only end it, visibly: SSE with an `error` event, a raw
        stream (pcm, wav) by closing the connection without the body's end (`Truncated`); both
        count in /health `stats.truncated`. A client that left ends it quietly."""
        job, chunk = req.job, first

        def piece(data: bytes) -> bytes:
            if not req.sse:
                return data
            event = {"type": "speech.audio.delta", "audio": base64.b64encode(data).decode()}
            return f"data: {json.dumps(event)}\n\n".encode()

        try:
            if req.fmt == "wav":
                yield piece(wav_header())
            while chunk is not None:
                yield piece(pcm16(chunk))
                try:
                    chunk = await next_chunk()
                except ClientGone:
                    return
                except Exception as e:  # noqa: BLE001 - the status is already sent
                    self.truncated += 1
                    log.warning("stream cut after %d frames: %s", job.frames, e)
                    if not req.sse:
                        raise Truncated(str(e)) from e
                    status = 504 if isinstance(e, DeadlineExceeded) else 500
                    error = error_body(status, f"the stream was cut after {job.frames} frames: "
                                                f"{e}", code="deadline_exceeded"
                                        if status == 504 else "generation_failed")
                    yield f"data: {json.dumps({'type': 'error', 'error': error})}\n\n".encode()
                    return
            if req.sse:
                tokens = len(job.prompt)
                done = {"type": "speech.audio.done", "finish_reason": job.finish_reason,
                        "usage": {"input_tokens": tokens, "output_tokens": job.frames,
                                  "total_tokens": tokens + job.frames}}
                yield f"data: {json.dumps(done)}\n\n".encode()
        finally:
            job.cancelled = True
            watcher.cancel()

    # ----------------------------------------------------------------------------- sessions
    def parse_session(self, data) -> Job:
        """A text session's first message: the speech fields without `input` (or with the first
        piece of text in it); the text mode is the official streaming one; the audio is pcm."""
        if not isinstance(data, dict):
            raise ApiError(400, "the first message must be a JSON object with the speech fields "
                                "(voice, instructions, language, generation settings)")
        if data.get("non_streaming_mode") or data.get("response_format", "pcm") != "pcm":
            raise ApiError(400, "a text session uses the streaming text mode and sends pcm "
                                "(s16le, 24 kHz, mono): leave non_streaming_mode and "
                                "response_format out", "response_format")
        if data.get("stream_format") is not None:
            raise ApiError(400, "stream_format does not apply to a text session", "stream_format")
        # the budget: the request's, else the cap until the text has ended, then at most its
        # `text_budget` (the engine's `Job.frames_per_token`)
        own = data.get("max_new_tokens")
        probe = dict(data, input=data.get("input") or "x", response_format="pcm",
                     model=data.get("model") or self.options.model_name, non_streaming_mode=False,
                     max_new_tokens=self.max_new_tokens if own is None else own)
        job = self.parse_speech(probe).job       # validates voice, settings, instructions
        job.frames_per_token = self.options.frames_per_token if own is None else 0.0
        job.base_tokens = len(job.prompt) + len(job.prompt.trailing) - 1   # less the "x"
        language = data.get("language") or self.options.language or "auto"
        speaker = self._voice(data)
        voice = None
        if self.kind == "base":          # a registered voice: x-vector, or ICL with its reference
            voice, speaker = self.voices.voices[speaker][0], None
        job.prompt = None
        job.feed = TextFeed.of(self.tts.tokenizer, self.tts.text_prompt(
            language, speaker=speaker, instruct=data.get("instructions") or None, voice=voice))
        return job

    async def session(self, ws: WebSocket) -> None:
        """WS /v1/audio/speech/stream. Client: first a JSON object with the speech fields (voice,
        instructions, language, settings; optionally `input`, the first text); then
        {"type": "text", "text": "..."} pieces and finally {"type": "end"} (which may carry a
        last "text"). Server: binary messages of pcm audio as it is generated, then
        {"type": "done", "frames", "input_tokens", "finish_reason"}; or {"type": "error",
        "status", "message"}."""
        await ws.accept()

        async def error(status: int, message: str, param=None):
            await ws.send_json({"type": "error", "status": status, "message": message,
                                "param": param})
            await ws.close(1008 if status < 500 else 1011)

        async def receive_text() -> str:
            """The next text frame; a binary frame is a 400 (starlette's receive_text would
            raise KeyError 'text' on one)."""
            idle = self.options.session_idle_timeout
            try:
                msg = await asyncio.wait_for(ws.receive(), idle)
            except asyncio.TimeoutError:
                raise ApiError(408, f"no message for {idle:g} s (the server's session idle "
                                    "timeout): the session is closed", code="idle_timeout"
                               ) from None
            if msg["type"] == "websocket.disconnect":
                raise WebSocketDisconnect(msg.get("code", 1000))
            if msg.get("text") is None:
                raise ApiError(400, "binary frames are not accepted; send JSON text messages")
            return msg["text"]

        try:
            data = loads(await receive_text(), "the first message")
            job = self.parse_session(data)
        except WebSocketDisconnect:
            return
        except ApiError as e:
            return await error(e.status, e.message, e.param)
        loop = asyncio.get_running_loop()
        chunks: asyncio.Queue = asyncio.Queue()
        job.emit = self.metrics.watch(
            job, "session", lambda item: loop.call_soon_threadsafe(chunks.put_nowait, item))
        feed, limit = job.feed, self.options.max_input_chars

        def push(text, final: bool):
            if not isinstance(text, str):
                raise ApiError(400, "`text` must be a string", "text")
            _unicode(text, "text")
            if feed.chars + len(text) > limit:
                raise ApiError(413, f"the session's text would be {feed.chars + len(text)} "
                                    f"characters; at most {limit}", "text")
            feed.push(text, final)
            if job.base_tokens + len(feed.tokens) > self.max_prompt_tokens:
                raise ApiError(413, f"the session's prompt would be "
                                    f"{job.base_tokens + len(feed.tokens)} tokens; at most "
                                    f"{self.max_prompt_tokens} (max_prompt_tokens)", "text")
            self.engine.wake()

        try:
            if data.get("input"):
                push(data["input"], False)
            self.engine.submit(job)
        except ApiError as e:
            return await error(e.status, e.message, e.param)
        except QueueFull as e:
            return await error(429, f"the server is busy: {e}")

        async def receive():
            try:
                while not feed.final:
                    msg = loads(await receive_text(), "the message")
                    kind = msg.get("type") if isinstance(msg, dict) else None
                    if kind not in ("text", "end"):
                        raise ApiError(400, f"unknown message {str(msg)[:80]!r}: send "
                                            '{"type": "text", "text": ...} or {"type": "end"}')
                    push(msg.get("text", ""), kind == "end")
            except Exception as e:  # noqa: BLE001 - ends the session: the sender reports it
                job.cancelled = True
                chunks.put_nowait(e)

        reader = asyncio.create_task(receive())
        try:
            while True:
                item = await chunks.get()
                if item is None:
                    await ws.send_json({"type": "done", "frames": job.frames,
                                        "input_tokens": len(feed.tokens),
                                        "finish_reason": job.finish_reason})
                    await ws.close()
                    return
                if isinstance(item, WebSocketDisconnect):
                    return
                if isinstance(item, Exception):
                    status = (item.status if isinstance(item, ApiError) else
                              504 if isinstance(item, DeadlineExceeded) else
                              503 if isinstance(item, EngineUnavailable) else
                              400 if isinstance(item, (ValueError, json.JSONDecodeError))
                              else 500)
                    return await error(status, getattr(item, "message", None) or str(item))
                await ws.send_bytes(pcm16(item))
        except WebSocketDisconnect:
            return
        finally:
            job.cancelled = True
            reader.cancel()

    # ----------------------------------------------------------------------------- register
    async def register_voice(self, request: Request) -> dict:
        if self.kind != "base":
            raise ApiError(400, f"voice cloning needs a Base checkpoint; this server runs a "
                                f"{self.kind} model (its voices: GET /v1/audio/voices)")
        limit = self.options.max_upload_bytes
        try:
            form = await bounded(request, limit + FORM_BYTES, "the upload").form(
                max_part_size=FORM_BYTES)
        except ApiError:
            raise
        except ClientDisconnect:
            return {}                              # nobody reads it
        except Exception as e:  # noqa: BLE001 - starlette raises several kinds
            raise ApiError(400, f"expected a multipart/form-data body: {e}") from None
        name = form.get("name")
        rule = "1-64 letters, digits, '_', '-' or '.', starting with a letter or digit"
        if not isinstance(name, str) or not name:
            raise ApiError(400, f"`name` is required: {rule}", "name")
        if not VOICE_NAME.match(name):
            raise ApiError(400, f"`name` {name[:80]!r} is not a valid voice name: {rule}", "name")
        if name in self.voices.voices:
            raise ApiError(409, f"a voice named {name!r} exists; delete it first "
                                f"(DELETE /v1/audio/voices/{name}) or pick another name", "name")
        field = next((k for k in ("audio_sample", "audio", "file")
                      if hasattr(form.get(k), "read")), None)
        upload = form.get(field) if field else None
        if upload is None:
            raise ApiError(400, "the reference audio is required: a file field `audio_sample` "
                                "(WAV, FLAC, OGG or MP3)", "audio_sample")
        if (upload.size or 0) > limit:
            raise ApiError(413, f"the audio file is {upload.size} bytes; at most {limit}", field,
                           code="body_too_large")
        transcript = form.get("transcript") or form.get("ref_text")
        transcript = transcript.strip() if isinstance(transcript, str) else ""
        if transcript:
            self._check_chars("transcript", transcript)
        # the upload is decoded from memory (never a path or URL), off the event loop; its length
        # is checked from the header first, so a small file of hours of audio is never decoded
        what = (f"the uploaded audio (field `{field}`, file "
                f"{getattr(upload, 'filename', None)!r})")
        data = await upload.read()

        def decode():
            samples, sr = read_file(io.BytesIO(data), what, MAX_SECONDS)
            return samples.mean(axis=1), sr

        try:
            wave, sr = await asyncio.to_thread(decode)
        except AudioTooLong as e:
            raise ApiError(413, str(e), field, code="audio_too_long") from None
        except AudioError as e:
            raise ApiError(400, f"{e}; send WAV, FLAC, OGG or MP3", field) from None
        silence = form.get("ref_tail_silence") or "0"
        try:
            silence = float(silence)
        except (TypeError, ValueError):
            raise ApiError(400, f"`ref_tail_silence` must be seconds in [0, 5], got {silence!r}",
                           "ref_tail_silence") from None

        def encode():
            return self.tts.create_voice_clone_prompt(
                (wave, sr), ref_text=transcript or None, x_vector_only_mode=not transcript,
                ref_tail_silence=silence)

        try:
            items = await asyncio.wrap_future(self.engine.call(encode))
        except (ValueError, TypeError) as e:
            param = "ref_tail_silence" if "ref_tail_silence" in str(e) else "audio_sample"
            raise ApiError(400, f"cannot use this reference audio: {e}", param) from None
        self.voices.add(name, items)
        try:      # its caches now, so that its first request is as fast as the later ones
            await asyncio.wrap_future(self.prime_voice(name))
        except Exception:  # noqa: BLE001 - the voice works without them (filled on first use)
            log.exception("filling the caches of voice %r failed", name)
        return self.voice_info(name)

    def prime_voice(self, name: str):
        """Fill a registered voice's caches on every device (`BatchEngine.prime`): the talker's
        prompt-prefix KV and the codec's state after its reference, for the server's default
        language and text mode (a request in another language fills its own on first use).
        A Future: True where something was computed."""
        body = {"model": self.options.model_name, "input": "x", "voice": name,
                "response_format": "pcm"}
        return self.engine.prime(self.parse_speech(body).job)

    def voice_info(self, name: str) -> dict:
        if self.kind == "base":
            item = self.voices.voices[name][0]
            return {"id": name, "object": "audio.voice", "name": name, "type": "audio_sample",
                    "created_at": self.voices.created[name],
                    "mode": "icl" if item.icl_mode else "x_vector_only",
                    "transcript": item.ref_text}
        return {"id": name, "object": "audio.voice", "name": name, "type": "preset",
                "created_at": int(self.started)}

    async def open_session(self, ws: WebSocket) -> None:
        """`session` within --max-sessions: beyond it the client gets a 429 error message (and
        the close code 1013, try again later). A session holds no place in the HTTP queue."""
        if self.sessions_open >= self.options.max_sessions:
            await ws.accept()
            await ws.send_json({"type": "error", "status": 429, "param": None, "message":
                                f"{self.sessions_open} text sessions are open (the limit is "
                                f"{self.options.max_sessions}); retry later"})
            await ws.close(1013)
            return
        self.sessions_open += 1
        try:
            await self.session(ws)
        finally:
            self.sessions_open -= 1

    def health(self) -> dict:
        """The server's state; `status` "ok", or "unavailable" with the engine's `reason` (the
        route answers 503 then)."""
        stats = dict(self.engine.stats)
        stats["truncated"] = self.truncated
        stats["batch_sizes"] = {str(k): v for k, v in sorted(stats["batch_sizes"].items())}
        reason = self.engine.health()
        return {"status": "ok" if reason is None else "unavailable", "reason": reason,
                "sessions": self.sessions_open, "max_sessions": self.options.max_sessions,
                "max_prompt_tokens": self.max_prompt_tokens,
                "model": self.options.model_name, "tts_model_type": self.kind,
                "queue": self.engine.waiting, "active": self.engine.active,
                "devices": self.engine.per_device if self.devices > 1 else [
                    {"device": str(jax.local_devices()[0]), "queue": self.engine.waiting,
                     "active": self.engine.active, "requests": stats["requests"],
                     "frames": stats["frames"]}],
                "max_batch_size": self.options.max_batch_size,
                "max_new_tokens": self.max_new_tokens,
                "frames_per_token": self.options.frames_per_token, "formats": self.formats,
                "decode_kernels": self.decode_kernels, "stats": stats}


def create_app(tts, options: ServerOptions | None = None) -> FastAPI:
    """The FastAPI app for a loaded `Qwen3TTS`; the engine starts and stops with the app."""
    from contextlib import asynccontextmanager

    server = Server(tts, options or ServerOptions())
    if server.options.api_key is not None:
        ApiKeyCheck(None, server.options.api_key)        # an empty key is an error, not "no auth"
    origins = parse_origins(server.options.allowed_origins)  # a ValueError names a bad entry

    @asynccontextmanager
    async def lifespan(app):
        server.warmup()                 # before the port opens: uvicorn waits for the lifespan
        server.engine.start()
        try:
            yield
        finally:
            server.engine.stop(5.0)     # after uvicorn drained (--shutdown-timeout)

    app = FastAPI(title="qwen3-tts-jax", lifespan=lifespan)
    app.state.server = server
    if server.options.api_key is not None:
        app.add_middleware(ApiKeyCheck, key=server.options.api_key)
        redact_api_keys_in_logs()
    app.add_middleware(BrowserGuard, allowed_origins=server.options.allowed_origins)
    if server.options.allowed_origins:
        # outermost: the allowed pages' CORS preflights are answered before the key check (a
        # preflight carries no key), and every answer to them, a 401 included, is readable there
        app.add_middleware(CORSMiddleware, allow_origins=cors_origins(origins),
                           allow_methods=["GET", "POST", "DELETE"],
                           allow_headers=["authorization", "content-type"], max_age=600)

    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        return error_response(e.status, e.message, e.param, e.code, e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e):
        return error_response(e.status_code, str(e.detail))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, e):
        return error_response(400, str(e))

    @app.exception_handler(EngineUnavailable)
    async def engine_unavailable(request, e: EngineUnavailable):
        return error_response(503, str(e), code="engine_unavailable",
                               headers={"Retry-After": "1"})

    @app.exception_handler(Exception)
    async def server_error(request, e: Exception):
        log.error("request failed: %s: %s", type(e).__name__, e)
        return error_response(500, f"the server failed: {type(e).__name__}: {e}")

    @app.post("/v1/audio/speech")
    async def speech(request: Request):
        return await server.speech(request)

    @app.websocket("/v1/audio/speech/stream")
    async def speech_stream(ws: WebSocket):
        await server.open_session(ws)

    @app.get("/v1/audio/voices")
    async def list_voices():
        return {"object": "list", "data": [server.voice_info(v) for v in server.voice_names()]}

    @app.post("/v1/audio/voices")
    async def register_voice(request: Request):
        return await server.register_voice(request)

    @app.delete("/v1/audio/voices/{voice_id}")
    async def delete_voice(voice_id: str):
        if server.kind != "base" or voice_id not in server.voices.voices:
            raise ApiError(404, f"no registered voice {voice_id!r} (GET /v1/audio/voices lists "
                                "them)", "voice_id")
        server.voices.remove(voice_id)
        return {"id": voice_id, "object": "audio.voice.deleted", "deleted": True}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": server.options.model_name, "object": "model",
                                            "created": int(server.started),
                                            "owned_by": "qwen3-tts-jax"}]}

    @app.get("/health")
    async def health():
        body = server.health()
        return body if body["status"] == "ok" else JSONResponse(body, status_code=503)

    @app.get("/metrics", include_in_schema=False)
    async def metrics():
        if not server.metrics.available:
            raise ApiError(501, METRICS_MISSING)
        return Response(server.metrics.render(), media_type=METRICS_CONTENT_TYPE)

    _add_playground(app, server)
    return app


STATIC_DIR = os.path.join(os.path.dirname(__file__), "static")


def _add_playground(app: FastAPI, server: Server) -> None:
    """GET / : the playground, a static page (static/: HTML, CSS, JavaScript; no build step, no
    CDN) that uses only the public API above. The model size, which no endpoint reports, is
    written into the page (a 0.6B CustomVoice model has no instructions)."""
    from fastapi.responses import HTMLResponse
    from starlette.staticfiles import StaticFiles

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    async def playground():
        with open(os.path.join(STATIC_DIR, "index.html"), encoding="utf-8") as f:
            page = f.read()
        size = re.sub(r"[^0-9a-z]", "", str(server.tts.config.tts_model_size))
        return HTMLResponse(page.replace('data-model-size=""', f'data-model-size="{size}"'))
