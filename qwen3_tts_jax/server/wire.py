"""The server's wire: audio formats (whole files and streamed pcm/wav), request bodies read with
a limit, JSON and text checks that answer 400 for any malformed input, and the streamed
response that can end without its terminator. No model, no engine: `app` and `sessions` use it.
"""
from __future__ import annotations

import json
import struct

import numpy as np
from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.requests import ClientDisconnect

from ..audio import encode_audio_file, output_formats
from .errors import ApiError

SAMPLE_RATE = 24000
MEDIA_TYPES = {"wav": "audio/wav", "pcm": "audio/pcm", "flac": "audio/flac", "mp3": "audio/mpeg",
               "opus": "audio/ogg", "aac": "audio/aac"}
STREAMED = ("wav", "pcm")          # sent chunk by chunk as frames are generated


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


def check_unicode(value: str, field: str) -> None:
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
