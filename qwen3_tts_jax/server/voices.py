"""Cloned voices on the server: the store (one voice file per name in --voices-dir, loaded at
start) and the registration upload (POST /v1/audio/voices, multipart: name, audio_sample,
transcript), read with limits and checked before anything is encoded.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import hashlib
import io
import logging
import os
import re
import time
from typing import Callable

import numpy as np
from fastapi import Request
from starlette.requests import ClientDisconnect

from ..audio import MAX_SECONDS, AudioError, AudioTooLong, inline_bytes, read_file
from ..voice import load_voice, save_voice
from .errors import ApiError
from .wire import bounded

log = logging.getLogger("qwen3_tts_jax.server")

VOICE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
FORM_BYTES = 1 << 20               # a voice registration's other fields (name, transcript, ...)


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


@dataclasses.dataclass
class Upload:
    """A registration's checked fields: the reference audio decoded (mono, any rate)."""
    name: str
    wave: np.ndarray
    sample_rate: int
    transcript: str             # "": an x-vector-only voice
    tail_silence: float


async def read_upload(request: Request, limit: int, taken, check_chars: Callable[[str, str], None]
                      ) -> Upload | None:
    """The multipart registration, read with its limits (the audio file at most `limit` bytes,
    the other fields `FORM_BYTES`), every field checked: ApiError names the one at fault (409 a
    name in `taken`, 413 a file too large or too long). None if the client left."""
    try:
        form = await bounded(request, limit + FORM_BYTES, "the upload").form(
            max_part_size=FORM_BYTES)
    except ApiError:
        raise
    except ClientDisconnect:
        return None                            # the client left
    except Exception as e:  # noqa: BLE001 - starlette raises several kinds
        raise ApiError(400, f"expected a multipart/form-data body: {e}") from None
    name = form.get("name")
    rule = "1-64 letters, digits, '_', '-' or '.', starting with a letter or digit"
    if not isinstance(name, str) or not name:
        raise ApiError(400, f"`name` is required: {rule}", "name")
    if not VOICE_NAME.match(name):
        raise ApiError(400, f"`name` {name[:80]!r} is not a valid voice name: {rule}", "name")
    if name in taken:
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
        check_chars("transcript", transcript)
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
    return Upload(name, wave, sr, transcript, silence)


INLINE_FIELDS = ("ref_audio", "ref_text", "x_vector_only_mode", "ref_tail_silence")


class EncodeSlots:
    """References being encoded at once (registrations and voices given in requests). Encoding
    runs on the engine's worker between the chunks of the streams, so past `most` a new one is a
    429: a flood of references cannot stall everyone's audio."""

    def __init__(self, most: int = 4):
        self.most, self.busy = most, 0

    @contextlib.contextmanager
    def take(self, param: str):
        if self.busy >= self.most:
            raise ApiError(429, f"{self.busy} reference voices are being encoded (the limit is "
                                f"{self.most}); retry later", param,
                           headers={"Retry-After": "1"})
        self.busy += 1
        try:
            yield
        finally:
            self.busy -= 1


class InlineVoices:
    """Voices given in a speech request itself (vLLM-Omni's fields, Base checkpoints):
    `ref_audio` (the reference's file bytes in base64, bare or as a data URL: never a path or a
    URL, the server reads no file and fetches nothing for a client), `ref_text` (its transcript:
    ICL cloning) or `x_vector_only_mode: true` (the speaker embedding only), and optionally
    `ref_tail_silence` (seconds of silence after an ICL reference, as at registration). The reference is
    decoded off the event loop and encoded on the engine's thread; the last `size` voices are
    kept by content, so that a client sending the same reference again pays once and finds the
    voice's caches (its prompt-prefix KV, the codec's state after its reference) filled. New
    references take one of the server's `slots` while they are encoded."""

    def __init__(self, slots: EncodeSlots, size: int = 16):
        self.slots, self.size = slots, size
        self.items: collections.OrderedDict[tuple, list] = collections.OrderedDict()
        self.hits = self.misses = 0

    async def get(self, data: dict, encode: Callable, check_chars: Callable[[str, str], None]
                  ) -> list | None:
        """The request's voice items, or None when it names no `ref_audio`. `encode(audio,
        ref_text, x_vector_only, tail_silence)` returns a Future of the items (the engine runs
        it)."""
        audio = data.get("ref_audio")
        if audio is None:
            for k in INLINE_FIELDS[1:]:
                if data.get(k) is not None:
                    raise ApiError(400, f"`{k}` goes with `ref_audio` (a voice given in the "
                                        "request); a registered voice has its own", k)
            return None
        if data.get("voice") not in (None, ""):
            raise ApiError(400, "give either `voice` (a registered voice) or `ref_audio` (a "
                                "voice given in the request), not both", "voice")
        if not isinstance(audio, str):
            raise ApiError(400, "`ref_audio` must be a string: base64 audio file bytes, bare or "
                                "as a data URL", "ref_audio")
        text = data.get("ref_text")
        if text is not None and not isinstance(text, str):
            raise ApiError(400, "`ref_text` must be a string: the reference's transcript",
                           "ref_text")
        text = (text or "").strip()
        if text:
            check_chars("ref_text", text)
        x_only = data.get("x_vector_only_mode")
        if x_only is not None and not isinstance(x_only, bool):
            raise ApiError(400, "`x_vector_only_mode` must be true or false",
                           "x_vector_only_mode")
        if not text and not x_only:
            raise ApiError(400, "`ref_text` (the reference's transcript, for ICL cloning) is "
                                "required, or set `x_vector_only_mode: true` to clone from the "
                                "speaker embedding alone", "ref_text")
        silence = data.get("ref_tail_silence")
        silence = 0.0 if silence is None else silence
        if isinstance(silence, bool) or not isinstance(silence, (int, float)) \
                or not 0 <= silence <= 5:
            raise ApiError(400, f"`ref_tail_silence` must be seconds in [0, 5], got "
                                f"{str(silence)[:40]}", "ref_tail_silence")
        try:
            raw = inline_bytes(audio, "`ref_audio`")
        except AudioError as e:
            raise ApiError(400, str(e), "ref_audio") from None
        key = (hashlib.sha256(raw).hexdigest(), "" if x_only else text, bool(x_only),
               0.0 if x_only else float(silence))     # the silence only changes ICL codes
        if key in self.items:
            self.hits += 1
            self.items.move_to_end(key)
            return self.items[key]

        with self.slots.take("ref_audio"):
            items = await self._encode(raw, key, encode)
        self.misses += 1
        self.items[key] = items
        while len(self.items) > self.size:
            self.items.popitem(last=False)
        return items

    @staticmethod
    async def _encode(raw: bytes, key: tuple, encode: Callable) -> list:
        def decode():
            samples, sr = read_file(io.BytesIO(raw), "`ref_audio`", MAX_SECONDS)
            return samples.mean(axis=1), sr

        try:
            wave, sr = await asyncio.to_thread(decode)
        except AudioTooLong as e:
            raise ApiError(413, str(e), "ref_audio", code="audio_too_long") from None
        except AudioError as e:
            raise ApiError(400, f"{e}; send WAV, FLAC, OGG or MP3", "ref_audio") from None
        try:
            return await asyncio.wrap_future(encode((wave, sr), key[1] or None, key[2], key[3]))
        except (ValueError, TypeError) as e:
            raise ApiError(400, f"cannot use this reference audio: {e}", "ref_audio") from None
