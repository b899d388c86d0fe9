"""WS /v1/audio/speech/stream: a text session. The client sends its text in pieces (from an LLM,
say) and gets pcm audio as it is generated; the engine runs the session as one row of a batch
whose prompt grows (`TextFeed`, the official streaming text mode). With `segment_chars` (the
first message's, or --segment-chars) the text is said in segments, cut as it arrives where
`segments.split` cuts the whole text: each segment a row of its own, started when the one before
has ended, with `segment_pause` seconds of silence between them (`text_session.TextSession`). At
most
--max-sessions open at once; a session idle past --session-idle-timeout is closed (408), so none
holds a place forever. The functions take the app's `Server` (its options, engine, voices and
request checks: `speech.py`).
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import time

import numpy as np
from fastapi import WebSocket, WebSocketDisconnect

from .. import segments
from ..engine import DeadlineExceeded, EngineUnavailable, QueueFull
from ..text_feed import TextFeed
from ..text_session import TextSession
from .errors import ApiError
from .speech import segment_options
from .wire import check_unicode, loads, pcm16


def parse_session(server, data, inline: list | None = None) -> TextSession:
    """A text session's first message: the speech fields without `input` (or with the first
    piece of text in it); the text mode is the official streaming one; the audio is pcm.
    `inline`: the voice the message gives itself (`ref_audio`: `Server.inline_voice`)."""
    if not isinstance(data, dict):
        raise ApiError(400, "the first message must be a JSON object with the speech fields "
                            "(voice, instructions, language, generation settings)")
    if data.get("non_streaming_mode") or data.get("response_format", "pcm") != "pcm":
        raise ApiError(400, "a text session uses the streaming text mode and sends pcm "
                            "(s16le, 24 kHz, mono): leave non_streaming_mode and "
                            "response_format out", "response_format")
    if data.get("stream_format") is not None:
        raise ApiError(400, "stream_format does not apply to a text session", "stream_format")
    n, pause = segment_options(server, data)
    # the budget: the request's, else the cap until the text has ended, then at most its
    # `text_budget` (the engine's `Job.frames_per_token`)
    own = data.get("max_new_tokens")
    probe = dict(data, input=data.get("input") or "x", response_format="pcm",
                 model=data.get("model") or server.options.model_name, non_streaming_mode=False,
                 max_new_tokens=server.max_new_tokens if own is None else own, segment_chars=0)
    job = server.parse_speech(probe, inline).job   # validates voice, settings, instructions
    job.frames_per_token = server.options.frames_per_token if own is None else 0.0
    base_tokens = len(job.prompt) + len(job.prompt.trailing) - 1   # less the "x"
    language = data.get("language") or server.options.language or "auto"
    speaker = server.voice_for(data) if inline is None else None
    voice = None
    if server.kind == "base":          # a cloned voice: x-vector, or ICL with its reference
        voice, speaker = (server.voices.voices[speaker] if inline is None else inline)[0], None
    job.prompt = None
    prompt = server.tts.text_prompt(language, speaker=speaker,
                                    instruct=data.get("instructions") or None, voice=voice)

    def make(j: int):
        """Segment j's job: the first message's settings, budget, deadline and voice, a feed of
        its own, and the seed a request's segment j gets (`segments.seeds`)."""
        return dataclasses.replace(
            job, feed=TextFeed.of(server.tts.tokenizer, prompt), submitted=time.monotonic(),
            seed=None if job.seed is None else segments.segment_seed(job.seed, j))

    return TextSession(make, segments.Stream(n) if n else None, pause, base_tokens)


async def run_session(server, ws: WebSocket) -> None:
    """WS /v1/audio/speech/stream. Client: first a JSON object with the speech fields (voice,
    instructions, language, settings, `segment_chars` / `segment_pause`; optionally `input`,
    the first text); then {"type": "text", "text": "..."} pieces and finally {"type": "end"}
    (which may carry a last "text"). Server: binary messages of pcm audio as it is generated,
    then {"type": "done", "frames", "input_tokens", "segments", "finish_reason"}; or
    {"type": "error", "status", "message"}."""
    await ws.accept()

    async def error(status: int, message: str, param=None):
        await ws.send_json({"type": "error", "status": status, "message": message,
                            "param": param})
        await ws.close(1008 if status < 500 else 1011)

    async def receive_text() -> str:
        """The next text frame; a binary frame is a 400 (starlette's receive_text would
        raise KeyError 'text' on one)."""
        idle = server.options.session_idle_timeout
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
        session = parse_session(server, data, await server.inline_voice(data))
    except WebSocketDisconnect:
        return
    except ApiError as e:
        return await error(e.status, e.message, e.param)
    loop = asyncio.get_running_loop()
    chunks: asyncio.Queue = asyncio.Queue()     # (segment, item); (None, error) from the reader
    limit = server.options.max_input_chars

    def start(j: int) -> None:
        """Segment j's job to the engine, its chunks into `chunks` (the latencies of the
        first only: a later segment's first audio is not the client's)."""
        job = session.job(j)
        job.emit = server.metrics.watch(
            job, "session", lambda item: loop.call_soon_threadsafe(chunks.put_nowait, (j, item)),
            latencies=j == 0)
        server.engine.submit(job)

    def push(text, final: bool):
        if not isinstance(text, str):
            raise ApiError(400, "`text` must be a string", "text")
        check_unicode(text, "text")
        if session.chars + len(text) > limit:
            raise ApiError(413, f"the session's text would be {session.chars + len(text)} "
                                f"characters; at most {limit}", "text")
        for job in session.push(text, final):
            tokens = session.base_tokens + len(job.feed.tokens)
            if tokens > server.max_prompt_tokens:
                raise ApiError(413, f"the session's prompt would be {tokens} tokens; at most "
                                    f"{server.max_prompt_tokens} (max_prompt_tokens)"
                                    + (" (a segment's)" if session.cut else ""), "text")
        server.engine.wake()

    try:
        if data.get("input"):
            push(data["input"], False)
        start(0)
    except ApiError as e:
        return await error(e.status, e.message, e.param)
    except QueueFull as e:
        return await error(429, f"the server is busy: {e}")

    async def receive():
        try:
            while not session.final:
                msg = loads(await receive_text(), "the message")
                kind = msg.get("type") if isinstance(msg, dict) else None
                if kind not in ("text", "end"):
                    raise ApiError(400, f"unknown message {str(msg)[:80]!r}: send "
                                        '{"type": "text", "text": ...} or {"type": "end"}')
                push(msg.get("text", ""), kind == "end")
            while True:       # the text has ended: still listening, so that a client who
                msg = await ws.receive()            # leaves stops the rows (no idle limit)
                if msg["type"] == "websocket.disconnect":
                    raise WebSocketDisconnect(msg.get("code", 1000))
                raise ApiError(400, 'the text has ended: no message is taken after '
                                    '{"type": "end"}')
        except Exception as e:  # noqa: BLE001 - ends the session: the sender reports it
            session.cancel()
            chunks.put_nowait((None, e))

    reader = asyncio.create_task(receive())
    try:
        while True:
            j, item = await chunks.get()
            if item is None and session.follows(j):      # the next segment
                if session.pause:
                    await ws.send_bytes(pcm16(np.zeros(session.pause, np.float32)))
                try:
                    start(j + 1)
                except EngineUnavailable as e:
                    return await error(503, str(e))
                continue
            if item is None:
                await ws.send_json({"type": "done", "frames": session.frames,
                                    "input_tokens": session.input_tokens,
                                    "segments": len(session.jobs),
                                    "finish_reason": session.finish_reason})
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
        session.cancel()
        reader.cancel()


async def open_session(server, ws: WebSocket) -> None:
    """`run_session` within --max-sessions: beyond it the client gets a 429 error message (and
    the close code 1013, try again later). A session holds no place in the HTTP queue."""
    if server.sessions_open >= server.options.max_sessions:
        await ws.accept()
        await ws.send_json({"type": "error", "status": 429, "param": None, "message":
                            f"{server.sessions_open} text sessions are open (the limit is "
                            f"{server.options.max_sessions}); retry later"})
        await ws.close(1013)
        return
    server.sessions_open += 1
    try:
        await run_session(server, ws)
    finally:
        server.sessions_open -= 1
