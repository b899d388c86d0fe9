"""The HTTP API (FastAPI): OpenAI's `POST /v1/audio/speech` over the batching engine, voices,
health. Built by `create_app(tts, ServerOptions(...))`; `qwen3-tts-jax serve` runs it with uvicorn.

    POST   /v1/audio/speech        {"model", "input", "voice", "response_format", "speed",
                                    "instructions", "stream_format"} + official generation settings
    GET    /v1/audio/voices        preset speakers and registered (cloned) voices
    POST   /v1/audio/voices        multipart: name, audio_sample (file), transcript (Base only)
    DELETE /v1/audio/voices/{id}
    WS     /v1/audio/speech/stream  text in pieces (e.g. from an LLM) -> pcm audio as it is made
    GET    /v1/models, GET /health

Errors are OpenAI-shaped, `{"error": {"message", "type", "param", "code"}}`, with the status saying
who must act: 400 bad request, 404 unknown voice id, 409 name taken, 413 input too long, 429 queue
full (with Retry-After), 504 out of time, 500 a server bug. See docs/serving.md.
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
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import prompts
from ..audio import encode_audio_file, output_formats
from ..buckets import ladder
from ..voice import load_voice, save_voice
from ..engine import BatchEngine, DeadlineExceeded, EnginePool, Job, QueueFull, TextFeed
from ..engine import EngineUnavailable, max_prompt_tokens, memory_budget
from ..settings import GEN_KWARGS, GenerationSettings

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
    batch_buckets: tuple[int, ...] | None = None               # default: powers of two
    min_prompt_bucket: int = 16
    language: str | None = None                                # default language
    non_streaming_mode: bool | None = None                     # default text mode
    defaults: dict = dataclasses.field(default_factory=dict)   # CLI generation flags
    max_new_tokens: int | None = None                          # server-wide cap
    warmup: tuple[int, ...] = ()     # prompt lengths (tokens) whose buckets compile at start
    warmup_whole_file: bool = False  # with warmup: also the whole-file formats' codec windows
    continuous_batching: bool = True # waiting requests start in a running batch's free rows
    devices: int | None = None       # local devices, one engine each (default: all)
    api_key: str | None = None       # /v1/... needs `Authorization: Bearer <api_key>`
    max_prompt_tokens: int | None = None  # default: from the device's memory (engine.py)
    max_sessions: int = 16           # WebSocket text sessions open at once (429 beyond)
    session_idle_timeout: float = 30.0  # seconds a session may wait for its next message
    stall_timeout: float = 300.0     # /health is 503 after this long without engine progress


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers


def _error_type(status: int) -> str:
    return {400: "invalid_request_error", 401: "invalid_request_error", 404: "not_found_error",
            409: "conflict_error", 413: "request_too_large", 429: "rate_limit_error",
            504: "timeout_error"}.get(status, "server_error")


def _error_response(status: int, message: str, param=None, code=None, headers=None):
    return JSONResponse({"error": {"message": message, "type": _error_type(status),
                                   "param": param, "code": code}},
                        status_code=status, headers=headers)


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


# ---------------------------------------------------------------------------------- voices
class ApiKeyCheck:
    """ASGI middleware: every /v1/... request needs `Authorization: Bearer <key>` (what OpenAI's
    clients send for `api_key`), else 401 in OpenAI's error shape. A WebSocket may instead pass
    `?api_key=<key>` (browsers cannot set its headers); without it the handshake is refused
    (403). /health stays open for load balancers' probes."""

    def __init__(self, app, key: str):
        if not key:
            raise ValueError("the API key is empty")
        self.app, self.key = app, key.encode()

    def _ok(self, scope) -> bool:
        import secrets
        from urllib.parse import parse_qs

        given = [v[7:] for k, v in scope.get("headers", ())
                 if k.lower() == b"authorization" and v[:7].lower() == b"bearer "]
        if scope["type"] == "websocket":
            query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
            given += [v.encode() for v in query.get("api_key", [])]
        return any(secrets.compare_digest(g.strip(), self.key) for g in given)

    async def __call__(self, scope, receive, send):
        if (scope["type"] in ("http", "websocket") and scope["path"].startswith("/v1")
                and not self._ok(scope)):
            if scope["type"] == "websocket":
                await receive()                        # the websocket.connect message
                await send({"type": "websocket.close", "code": 1008})
                return
            message = ("a valid API key is needed: send the header `Authorization: Bearer "
                       "<key>` (OpenAI clients: api_key=<key>)")
            response = _error_response(401, message, code="invalid_api_key",
                                       headers={"WWW-Authenticate": "Bearer"})
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


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
                  batch_buckets=options.batch_buckets, min_prompt_bucket=options.min_prompt_bucket,
                  refill=options.continuous_batching, stall_timeout=options.stall_timeout)
        # one device: the engine over the loaded weights; several: an engine per device
        self.devices = n
        self.engine = BatchEngine(tts, **kw) if n == 1 else EnginePool(tts, local[:n], **kw)
        self.started = time.time()
        self.max_prompt_tokens, self.prompt_budget = self._prompt_limit()
        self.sessions_open = 0

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
        log.info("warm-up: batch buckets %s x (prompt, trailing text) buckets %s%s compiled in "
                 "%.1f s", list(self.engine.batch_buckets), sorted(shapes),
                 f" and whole-file decodes up to {whole} frames" if whole else "", seconds)
        return seconds

    # ----------------------------------------------------------------------------- voices
    def voice_names(self) -> list[str]:
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
        if voice is None or voice == "":
            raise ApiError(400, f"`voice` is required; this server has: {self.voice_names()}",
                           "voice")
        if not isinstance(voice, str):
            raise ApiError(400, "`voice` must be a string or {\"id\": string}", "voice")
        names = self.voice_names()
        match = {v.lower(): v for v in names}.get(voice.lower())
        if match is None:
            hint = (" (OpenAI's voice names are not mapped: pick one of this model's)"
                    if voice.lower() in OPENAI_VOICES else "")
            if self.kind == "base" and not names:
                hint += "; register one first with POST /v1/audio/voices"
            raise ApiError(400, f"unknown voice {voice!r}{hint}; valid voices: {names}", "voice")
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
        if len(text) > self.options.max_input_chars:
            raise ApiError(413, f"`input` is {len(text)} characters; this server takes at most "
                                f"{self.options.max_input_chars}: split the text", "input")
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
        language = (_check_type(data, "language", (str,), "a string") or self.options.language
                    or "auto")
        nsm = _check_type(data, "non_streaming_mode", (bool,), "true or false")
        nsm = self.options.non_streaming_mode if nsm is None else nsm
        gen = {**self.options.defaults,
               **{k: data[k] for k in GEN_KWARGS if data.get(k) is not None}}
        gen.setdefault("max_new_tokens", self.max_new_tokens)
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

    async def speech(self, request: Request) -> Response:
        body = await request.body()
        if len(body) > MAX_BODY_BYTES:
            raise ApiError(413, f"the request body is {len(body)} bytes; at most {MAX_BODY_BYTES}")
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}") from None
        req = self.parse_speech(data)
        job = req.job
        loop = asyncio.get_running_loop()
        chunks: asyncio.Queue = asyncio.Queue()
        job.emit = lambda item: loop.call_soon_threadsafe(chunks.put_nowait, item)
        try:
            self.engine.submit(job)
        except QueueFull as e:
            raise ApiError(429, f"the server is busy: {e}", headers={"Retry-After": "1"}) from None

        async def next_chunk():
            try:
                item = await asyncio.wait_for(chunks.get(), job.deadline - time.monotonic() + 1)
            except asyncio.TimeoutError:
                job.cancelled = True
                raise DeadlineExceeded("the request ran out of time") from None
            if isinstance(item, Exception):
                raise item
            return item

        try:
            first = await next_chunk()
        except DeadlineExceeded as e:
            raise ApiError(504, f"{e} (the limit is {self.options.request_timeout:g} s)") from None
        except BaseException:
            job.cancelled = True
            raise
        if req.fmt in STREAMED:
            return StreamingResponse(self._stream(req, first, next_chunk),
                                     media_type="text/event-stream" if req.sse
                                     else MEDIA_TYPES[req.fmt])
        waves = []
        try:
            while first is not None:
                waves.append(first)
                first = await next_chunk()
        except DeadlineExceeded as e:
            raise ApiError(504, f"{e} (the limit is {self.options.request_timeout:g} s)") from None
        finally:
            job.cancelled = True     # no-op once finished; stops the row if the client left
        wave = np.concatenate(waves) if waves else np.zeros(0, np.float32)
        return Response(encode_audio(wave, req.fmt), media_type=MEDIA_TYPES[req.fmt])

    async def _stream(self, req: SpeechRequest, first, next_chunk):
        """The response body of a streamed request. Once it has started the status is sent, so a
        later failure (deadline, error) can only end the stream early; it is logged."""
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
                except Exception as e:  # noqa: BLE001 - the status is already sent
                    log.warning("stream ended early after %d frames: %s", job.frames, e)
                    return
            if req.sse:
                tokens = len(job.prompt)
                done = {"type": "speech.audio.done",
                        "usage": {"input_tokens": tokens, "output_tokens": job.frames,
                                  "total_tokens": tokens + job.frames}}
                yield f"data: {json.dumps(done)}\n\n".encode()
        finally:
            job.cancelled = True

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
        probe = dict(data, input=data.get("input") or "x", response_format="pcm",
                     model=data.get("model") or self.options.model_name, non_streaming_mode=False)
        job = self.parse_speech(probe).job       # validates voice, settings, instructions
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
        {"type": "done", "frames", "input_tokens"}; or {"type": "error", "status", "message"}."""
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
            data = json.loads(await receive_text())
            job = self.parse_session(data)
        except WebSocketDisconnect:
            return
        except json.JSONDecodeError as e:
            return await error(400, f"the first message is not valid JSON: {e}")
        except ApiError as e:
            return await error(e.status, e.message, e.param)
        loop = asyncio.get_running_loop()
        chunks: asyncio.Queue = asyncio.Queue()
        job.emit = lambda item: loop.call_soon_threadsafe(chunks.put_nowait, item)
        feed, limit = job.feed, self.options.max_input_chars

        def push(text, final: bool):
            if not isinstance(text, str):
                raise ApiError(400, "`text` must be a string", "text")
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
                    msg = json.loads(await receive_text())
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
                                        "input_tokens": len(feed.tokens)})
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
        try:
            form = await request.form(max_part_size=MAX_UPLOAD_BYTES)
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
        data = await upload.read()
        if len(data) > MAX_UPLOAD_BYTES:
            raise ApiError(413, f"the audio file is {len(data)} bytes; at most {MAX_UPLOAD_BYTES}")
        transcript = form.get("transcript") or form.get("ref_text")
        transcript = transcript.strip() if isinstance(transcript, str) else ""
        try:
            import soundfile as sf

            wave, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
        except Exception as e:  # noqa: BLE001 - libsndfile's errors
            # Its message names the in-memory buffer (<_io.BytesIO object at 0x...>): name the
            # upload instead.
            reason = getattr(e, "error_string", None) or str(e)
            raise ApiError(400, f"cannot read the uploaded audio (field `{field}`, file "
                                f"{getattr(upload, 'filename', None)!r}): {reason}; send WAV, "
                                "FLAC, OGG or MP3", field) from None
        wave = wave.mean(axis=1)
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
        return self.voice_info(name)

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
                "max_new_tokens": self.max_new_tokens, "formats": self.formats, "stats": stats}


def create_app(tts, options: ServerOptions | None = None) -> FastAPI:
    """The FastAPI app for a loaded `Qwen3TTS`; the engine starts and stops with the app."""
    from contextlib import asynccontextmanager

    server = Server(tts, options or ServerOptions())

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

    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        return _error_response(e.status, e.message, e.param, e.code, e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e):
        return _error_response(e.status_code, str(e.detail))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, e):
        return _error_response(400, str(e))

    @app.exception_handler(EngineUnavailable)
    async def engine_unavailable(request, e: EngineUnavailable):
        return _error_response(503, str(e), code="engine_unavailable",
                               headers={"Retry-After": "1"})

    @app.exception_handler(Exception)
    async def server_error(request, e: Exception):
        log.error("request failed: %s: %s", type(e).__name__, e)
        return _error_response(500, f"the server failed: {type(e).__name__}: {e}")

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
            raise ApiError(404, f"no registered voice {voice_id!r}; registered: "
                                f"{sorted(server.voices.voices)}", "voice_id")
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
