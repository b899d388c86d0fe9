"""The HTTP API (FastAPI): OpenAI's `POST /v1/audio/speech` over the batching engine, voices,
health. Built by `create_app(tts, ServerOptions(...))`; `qwen3-tts-jax serve` runs it with uvicorn.

    POST   /v1/audio/speech        {"model", "input", "voice", "response_format", "speed",
                                    "instructions", "stream_format"} + official generation settings
                                    (+ "ref_audio", "ref_text": a Base voice in the request)
    POST   /v1/audio/speech/batch  {"items": [speech request, ...], + fields shared by the items}
                                    -> each item's audio (base64) or its own error, in order
    GET    /v1/audio/voices        preset speakers and registered (cloned) voices
    POST   /v1/audio/voices        multipart: name, audio_sample (file), transcript (Base only)
    DELETE /v1/audio/voices/{id}
    WS     /v1/audio/speech/stream  text in pieces (e.g. from an LLM) -> pcm audio as it is made
    GET    /v1/models, GET /health, GET /metrics (Prometheus: metrics.py)

Errors are OpenAI-shaped, `{"error": {"message", "type", "param", "code"}}`, with the status saying
who must act: 400 bad request, 401 no key, 403 a browser origin not allowed, 404 unknown voice id,
409 name taken or --max-voices reached, 413 too long or too large, 415 not a JSON body, 421 a Host
not this server's, 429 queue full or references being encoded (with Retry-After), 504 out of time,
500 a server bug. A stream cut after its status
was sent ends visibly: an SSE `error` event, or a raw (pcm/wav) body closed without its end
(errors.py; the checks before a route runs, key, origins and Host: guards.py). See
docs/serving.md ("Limits, and what the client gets").
"""
from __future__ import annotations

import asyncio
import base64
import dataclasses
import functools
import json
import logging
import os
import re
import time

import jax
import numpy as np
from fastapi import FastAPI, Request, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.middleware.cors import CORSMiddleware
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from .. import segments
from ..buckets import ladder
from ..engine import BatchEngine, DeadlineExceeded, EnginePool, QueueFull
from ..engine import EngineUnavailable, max_prompt_tokens, memory_budget
from ..budget import FRAMES_PER_TOKEN
from . import sessions
from .errors import ApiError, error_body, error_response
from .guards import ApiKeyCheck, BrowserGuard, cors_origins, parse_origins, redact_api_keys_in_logs
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE, MISSING as METRICS_MISSING, Metrics
from .speech import InOrder, SpeechRequest, check_chars, collect, parse as parse_request
from .voices import INLINE_FIELDS, EncodeSlots, InlineVoices, VoiceStore, read_upload
from .wire import MEDIA_TYPES, STREAMED, AudioStream, ClientGone, Truncated, encode_audio, loads, \
    pcm16, read_body, supported_formats, wav_header

log = logging.getLogger("qwen3_tts_jax.server")

OPENAI_VOICES = ("alloy", "ash", "ballad", "coral", "echo", "fable", "onyx", "nova", "sage",
                 "shimmer", "verse", "marin", "cedar")
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
    max_batch_items: int = 32        # items in one POST /v1/audio/speech/batch (413 beyond)
    max_voices: int = 1000           # registered voices kept (a new one beyond: 409)
    session_idle_timeout: float = 30.0  # seconds a session may wait for its next message
    stall_timeout: float = 300.0     # /health is 503 after this long without engine progress
    segment_chars: int | None = None  # a longer input is said in segments (segments.py)
    segment_pause: float = segments.SEGMENT_PAUSE   # seconds of silence between them


def _item_error(index: int, status: int, message: str, param=None, code=None) -> dict:
    """A batch item's entry when it was refused or failed: OpenAI's error shape and its status."""
    return {"index": index, "error": {**error_body(status, message, param, code),
                                      "status": status}}


class Server:
    """The state behind the routes: model, engine, voices, options."""

    def __init__(self, tts, options: ServerOptions):
        self.tts = tts
        self.options = options
        self.kind = tts.config.tts_model_type
        self.formats = supported_formats()
        self.decode_kernels = tts.decode_kernels()
        self.voices = VoiceStore(options.voices_dir if self.kind == "base" else None)
        self.encoding = EncodeSlots()      # references being encoded at once
        self.inline = InlineVoices(self.encoding)   # voices given in requests (`ref_audio`)
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
                else None, "response_format": "pcm", "segment_chars": 0}
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

    def voice_for(self, data: dict) -> str | None:
        """The voice a request names (`voice`, or `{"id": ...}`), matched case-insensitively to
        this model's (None on VoiceDesign: its voice is the instructions); else a 400."""
        voice = data.get("voice")
        if isinstance(voice, dict):
            voice = voice.get("id")
        if self.kind == "voice_design":
            return None     # the voice is described in `instructions`
        listed = (f"valid voices: {self.voice_names()}" if self.kind == "custom_voice" else
                  "the registered voices are listed by GET /v1/audio/voices (or give the voice "
                  "in the request: `ref_audio` with `ref_text`)")
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
    async def inline_voice(self, data) -> list | None:
        """The voice a speech request gives itself (`ref_audio` with `ref_text` or
        `x_vector_only_mode`: `voices.InlineVoices`), encoded; None when it gives none."""
        if not isinstance(data, dict) or all(data.get(k) is None for k in INLINE_FIELDS):
            return None
        if self.kind != "base":
            field = next(k for k in INLINE_FIELDS if data.get(k) is not None)
            raise ApiError(400, f"`{field}` clones a voice, which needs a Base checkpoint; this "
                                f"server runs a {self.kind} model", field)

        def encode(audio, ref_text, x_vector_only, tail_silence):
            return self.engine.call(lambda: self.tts.create_voice_clone_prompt(
                audio, ref_text=ref_text, x_vector_only_mode=x_vector_only,
                ref_tail_silence=tail_silence))

        return await self.inline.get(data, encode, functools.partial(check_chars, self))

    def parse_speech(self, data, inline: list | None = None) -> SpeechRequest:
        """A speech request checked, its jobs built (`speech.parse`); `inline`: the voice it gives
        itself (`inline_voice`), if any."""
        return parse_request(self, data, inline)

    async def speech(self, request: Request) -> Response:
        try:
            body = await read_body(request, self.options.max_body_bytes)
        except ClientDisconnect:
            return Response(status_code=400)       # nobody reads it
        data = loads(body)
        req = self.parse_speech(data, await self.inline_voice(data))
        chunks = self._wire(req, "speech")
        try:
            self.engine.submit_all(req.jobs)
        except QueueFull as e:
            raise ApiError(429, f"the server is busy: {e}", headers={"Retry-After": "1"}) from None

        async def watch():
            """The client's disconnect, from the queue to the last chunk, for every format:
            the jobs are cancelled (the engine drops them, queued or running)."""
            while (await request.receive())["type"] != "http.disconnect":
                pass
            req.cancel()
            chunks.put_nowait(ClientGone())

        watcher = asyncio.create_task(watch())

        async def next_chunk():
            try:
                item = await asyncio.wait_for(chunks.get(), req.deadline - time.monotonic() + 1)
            except asyncio.TimeoutError:
                req.cancel()
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
                req.cancel()   # no-op once finished; stops the rows if the client left
                watcher.cancel()
        fmt = req.fmt
        data = await asyncio.to_thread(lambda: encode_audio(
            np.concatenate(waves) if waves else np.zeros(0, np.float32), fmt))
        return Response(data, media_type=MEDIA_TYPES[fmt],
                        headers={"X-Finish-Reason": req.finish_reason or "stop"})

    def _wire(self, req: SpeechRequest, route: str) -> asyncio.Queue:
        """The queue that gets a request's chunks in order (`speech.InOrder`) from its jobs' emits
        (the engine's thread), each job watched by the metrics (the first's latencies only: a
        later segment's first audio is not the client's)."""
        loop = asyncio.get_running_loop()
        out: asyncio.Queue = asyncio.Queue()
        order = InOrder(len(req.jobs), req.pause, out)
        for j, job in enumerate(req.jobs):
            job.emit = self.metrics.watch(
                job, route, functools.partial(loop.call_soon_threadsafe, order.push, j),
                latencies=j == 0)
        return out

    async def speech_batch(self, request: Request) -> Response:
        """POST /v1/audio/speech/batch: `items`, a list of speech requests (1 to
        --max-batch-items), each with the fields of /v1/audio/speech; the body's other fields
        are shared by every item (an item's own win). All valid items are queued together or
        none are (429 when they do not all fit) and run in the same batches. The answer, once
        all have ended, lists each item in order: its audio as a whole file in its
        `response_format`, base64, with `finish_reason` and `usage`; or its own `error` (status,
        message, param) when it was refused (400, 413) or failed (504, 500): one bad item
        never fails the others."""
        try:
            body = await read_body(request, self.options.max_body_bytes)
        except ClientDisconnect:
            return Response(status_code=400)       # nobody reads it
        results, runs = await self._batch_items(loads(body))
        outs = {i: self._wire(req, "batch") for i, req in runs}
        try:
            self.engine.submit_all([job for _, req in runs for job in req.jobs])
        except QueueFull as e:
            raise ApiError(429, f"the server is busy: {e}", headers={"Retry-After": "1"}) from None

        async def watch():
            while (await request.receive())["type"] != "http.disconnect":
                pass

        gathered = asyncio.gather(*(collect(req, outs[i]) for i, req in runs),
                                  return_exceptions=True)
        watcher = asyncio.create_task(watch())
        try:
            done, _ = await asyncio.wait({gathered, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if gathered not in done:
                return Response(status_code=499)   # the client left: nobody reads it
            outcomes = gathered.result()
        finally:
            for _, req in runs:
                req.cancel()                        # no-op for the finished ones
            watcher.cancel()
            gathered.cancel()

        def encode_all() -> None:
            for (i, req), out in zip(runs, outcomes):
                results[i] = self._batch_entry(i, req, out)

        await asyncio.to_thread(encode_all)
        return JSONResponse({"object": "list", "model": self.options.model_name,
                             "data": results})

    async def _batch_items(self, data) -> tuple[list[dict], list[tuple[int, SpeechRequest]]]:
        """A batch body checked: (an entry per item, the error ones filled in; the valid items'
        (index, request))."""
        if not isinstance(data, dict):
            raise ApiError(400, "the request body must be a JSON object with `items`")
        items, most = data.get("items"), self.options.max_batch_items
        if not isinstance(items, list) or not items:
            raise ApiError(400, f"`items` is required: a list of 1 to {most} speech requests",
                           "items")
        if len(items) > most:
            raise ApiError(413, f"`items` has {len(items)} requests; this server takes at most "
                                f"{most} in one batch (--max-batch-items)", "items")
        shared = {k: v for k, v in data.items() if k != "items"}
        results: list[dict] = [{} for _ in items]
        runs: list[tuple[int, SpeechRequest]] = []
        for i, item in enumerate(items):
            try:
                if not isinstance(item, dict):
                    raise ApiError(400, f"items[{i}] must be a JSON object (a speech request)")
                merged = {**shared, **item}
                req = self.parse_speech(merged, await self.inline_voice(merged))
                if req.sse:
                    raise ApiError(400, "stream_format does not apply to a batch item (each "
                                        "comes back whole)", "stream_format")
                runs.append((i, req))
            except ApiError as e:
                results[i] = _item_error(i, e.status, e.message, e.param, e.code)
        return results, runs

    def _batch_entry(self, i: int, req: SpeechRequest, out) -> dict:
        """A run item's entry: its audio (`out`, the chunks) as a file in base64, or its error."""
        if isinstance(out, BaseException):
            if isinstance(out, DeadlineExceeded):
                return _item_error(i, 504, f"{out} (the limit is "
                                           f"{self.options.request_timeout:g} s)")
            if isinstance(out, EngineUnavailable):
                return _item_error(i, 503, str(out))
            return _item_error(i, 500, f"{type(out).__name__}: {out}")
        audio = encode_audio(np.concatenate(out) if out else np.zeros(0, np.float32), req.fmt)
        return {"index": i, "object": "audio.speech", "response_format": req.fmt,
                "audio": base64.b64encode(audio).decode(),
                "finish_reason": req.finish_reason or "stop", "usage": req.usage()}

    async def _stream(self, req: SpeechRequest, first, next_chunk, watcher):
        """The response body of a streamed request. Once it has started its status (200) is sent,
        so a deadline or failure can only end it, visibly: SSE with an `error` event, a raw
        stream (pcm, wav) by closing the connection without the body's end (`Truncated`); both
        count in /health `stats.truncated`. A client that left ends it quietly."""
        chunk = first

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
                    frames = req.usage()["output_tokens"]
                    log.warning("stream cut after %d frames: %s", frames, e)
                    if not req.sse:
                        raise Truncated(str(e)) from e
                    status = 504 if isinstance(e, DeadlineExceeded) else 500
                    error = error_body(status, f"the stream was cut after {frames} frames: "
                                                f"{e}", code="deadline_exceeded"
                                        if status == 504 else "generation_failed")
                    yield f"data: {json.dumps({'type': 'error', 'error': error})}\n\n".encode()
                    return
            if req.sse:
                done = {"type": "speech.audio.done", "finish_reason": req.finish_reason,
                        "usage": req.usage()}
                yield f"data: {json.dumps(done)}\n\n".encode()
        finally:
            req.cancel()
            watcher.cancel()

    # ----------------------------------------------------------------------------- register
    async def register_voice(self, request: Request) -> dict:
        if self.kind != "base":
            raise ApiError(400, f"voice cloning needs a Base checkpoint; this server runs a "
                                f"{self.kind} model (its voices: GET /v1/audio/voices)")
        if len(self.voices.voices) >= self.options.max_voices:
            raise ApiError(409, f"this server keeps at most {self.options.max_voices} registered "
                                "voices (--max-voices) and has them: delete one first (DELETE "
                                "/v1/audio/voices/{id})", code="voice_limit_reached")
        upload = await read_upload(request, self.options.max_upload_bytes, self.voices.voices,
                                   functools.partial(check_chars, self))
        if upload is None:
            return {}                              # the client left: nobody reads it

        def encode():
            return self.tts.create_voice_clone_prompt(
                (upload.wave, upload.sample_rate), ref_text=upload.transcript or None,
                x_vector_only_mode=not upload.transcript, ref_tail_silence=upload.tail_silence)

        try:
            with self.encoding.take("audio_sample"):
                items = await asyncio.wrap_future(self.engine.call(encode))
        except (ValueError, TypeError) as e:
            param = "ref_tail_silence" if "ref_tail_silence" in str(e) else "audio_sample"
            raise ApiError(400, f"cannot use this reference audio: {e}", param) from None
        self.voices.add(upload.name, items)
        try:      # its caches now, so that its first request is as fast as the later ones
            await asyncio.wrap_future(self.prime_voice(upload.name))
        except Exception:  # noqa: BLE001 - the voice works without them (filled on first use)
            log.exception("filling the caches of voice %r failed", upload.name)
        return self.voice_info(upload.name)

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

    def counters(self) -> dict:
        """The engine's stats with the server's own counters (/health `stats`, /metrics)."""
        stats = dict(self.engine.stats)
        stats["truncated"] = self.truncated
        stats["inline_voices_encoded"] = self.inline.misses
        stats["inline_voices_reused"] = self.inline.hits
        return stats

    def health(self) -> dict:
        """The server's state; `status` "ok", or "unavailable" with the engine's `reason` (the
        route answers 503 then)."""
        stats = self.counters()
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
                "max_batch_items": self.options.max_batch_items,
                "voices": len(self.voices.voices), "max_voices": self.options.max_voices,
                "max_new_tokens": self.max_new_tokens,
                "frames_per_token": self.options.frames_per_token, "formats": self.formats,
                "segment_chars": self.options.segment_chars,
                "segment_pause": self.options.segment_pause,
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

    @app.post("/v1/audio/speech/batch")
    async def speech_batch(request: Request):
        return await server.speech_batch(request)

    @app.websocket("/v1/audio/speech/stream")
    async def speech_stream(ws: WebSocket):
        await sessions.open_session(server, ws)

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
