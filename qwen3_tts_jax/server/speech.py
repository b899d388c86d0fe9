"""A speech request (`POST /v1/audio/speech`, a batch's item, a text session's first message):
its fields checked against the server's options and model (`parse`: a 400 or 413 `ApiError`
naming the field), its input cut into segments (`segment_chars`), its prompts and jobs built;
and its audio put in order from its segments' jobs (`InOrder`). The functions take the app's
`Server` (options, model, voices, limits).
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import time

import numpy as np

from .. import prompts, segments
from ..budget import text_budget
from ..engine import DeadlineExceeded, Job
from ..settings import GEN_KWARGS, GenerationSettings
from .errors import ApiError
from .voices import INLINE_FIELDS
from .wire import STREAMED, check_unicode

SPEECH_FIELDS = ("model", "input", "voice", "response_format", "speed", "instructions",
                 "stream_format", "language", "non_streaming_mode", "segment_chars",
                 "segment_pause") + GEN_KWARGS + INLINE_FIELDS


@dataclasses.dataclass
class SpeechRequest:
    """A checked speech request: its jobs, one per segment of its input (one unless a long input
    is said in segments: `segment_chars`), played one after another with `pause` samples of
    silence between them."""
    jobs: list[Job]
    fmt: str
    sse: bool
    pause: int = 0

    @property
    def job(self) -> Job:
        return self.jobs[0]

    @property
    def deadline(self) -> float:
        return self.jobs[0].deadline

    def cancel(self) -> None:
        for job in self.jobs:
            job.cancelled = True       # a no-op for a job that has ended

    @property
    def finish_reason(self) -> str | None:
        """"length" if any segment reached its budget, else the last one's."""
        reasons = [job.finish_reason for job in self.jobs]
        return "length" if "length" in reasons else reasons[-1]

    def usage(self) -> dict:
        tokens = sum(len(job.prompt) for job in self.jobs)
        frames = sum(job.frames for job in self.jobs)
        return {"input_tokens": tokens, "output_tokens": frames, "total_tokens": tokens + frames}


class InOrder:
    """A request's chunks in order, from its segments' jobs (whose rows run at once): the current
    segment's as they come, a later one's kept until it is current, `pause` samples of silence
    between segments, None after the last; a failure at once (`push` runs on the event loop)."""

    def __init__(self, jobs: int, pause: int, out: asyncio.Queue):
        self.held = [[] for _ in range(jobs)]
        self.current, self.pause, self.out = 0, pause, out

    def push(self, j: int, item) -> None:
        if isinstance(item, BaseException):
            self.out.put_nowait(item)
            return
        self.held[j].append(item)
        while self.current < len(self.held) and self.held[self.current]:
            item = self.held[self.current].pop(0)
            if item is not None:
                self.out.put_nowait(item)
                continue
            self.current += 1
            if self.current == len(self.held):
                self.out.put_nowait(None)
            elif self.pause:
                self.out.put_nowait(np.zeros(self.pause, np.float32))


async def collect(req: SpeechRequest, out: asyncio.Queue) -> list:
    """A whole-file request's audio chunks as they come from the engine (None ends them), within
    its deadline; a failure raised."""
    waves = []
    while True:
        try:
            item = await asyncio.wait_for(out.get(), req.deadline - time.monotonic() + 1)
        except asyncio.TimeoutError:
            req.cancel()
            raise DeadlineExceeded("the request ran out of time") from None
        if item is None:
            return waves
        if isinstance(item, Exception):
            raise item
        waves.append(item)


def _check_type(data: dict, key: str, types: tuple, what: str):
    """data[key] if it is None or of `types` (a bool is not a number here), else a 400."""
    v = data.get(key)
    if v is not None and (not isinstance(v, types) or isinstance(v, bool) and bool not in types):
        raise ApiError(400, f"`{key}` must be {what}, got {json.dumps(v)[:80]}", key)
    return v


def parse(server, data, inline: list | None = None) -> SpeechRequest:
    """Validate a speech request and build its jobs; ApiError names the problem. `inline`: the
    voice the request gives itself (`Server.inline_voice`), if any."""
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    unknown = sorted(set(data) - set(SPEECH_FIELDS))
    if unknown:
        raise ApiError(400, f"unknown field(s) {unknown}; valid fields: {list(SPEECH_FIELDS)}",
                       unknown[0])
    if not isinstance(data.get("model"), str) or not data["model"]:
        raise ApiError(400, "`model` is required (any name; this server has one model, "
                            f"{server.options.model_name!r})", "model")
    text = data.get("input")
    if not isinstance(text, str):
        raise ApiError(400, "`input` is required: the text to speak (a string)", "input")
    if not text.strip():
        raise ApiError(400, "`input` is empty or whitespace only: nothing to say", "input")
    check_chars(server, "input", text)
    fmt = _check_type(data, "response_format", (str,), "a string") or "mp3"
    if fmt not in server.formats:
        raise ApiError(400, f"response_format {fmt!r} is not supported here; supported: "
                            f"{server.formats}", "response_format")
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
        check_chars(server, "instructions", instructions)
    language = (_check_type(data, "language", (str,), "a string") or server.options.language
                or "auto")
    nsm = _check_type(data, "non_streaming_mode", (bool,), "true or false")
    nsm = server.options.non_streaming_mode if nsm is None else nsm
    gen = {**server.options.defaults,
           **{k: data[k] for k in GEN_KWARGS if data.get(k) is not None}}
    if gen.get("max_new_tokens") is None:    # bounded by its text: a runaway stops soon
        gen["max_new_tokens"] = server.max_new_tokens
        if server.options.frames_per_token:
            gen["max_new_tokens"] = min(server.max_new_tokens, text_budget(
                len(server.tts.tokenizer.encode(text)), server.options.frames_per_token))
    m = gen["max_new_tokens"]
    if isinstance(m, (list, str)):     # the API's per-utterance lists and "auto"
        raise ApiError(400, f"max_new_tokens must be an integer (one request is one "
                            f"utterance; leave it out for a budget from the text), got "
                            f"{json.dumps(m)[:80]}", "max_new_tokens")
    if isinstance(m, int) and not isinstance(m, bool) and m > server.max_new_tokens:
        raise ApiError(400, f"max_new_tokens {gen['max_new_tokens']} is above this server's "
                            f"cap of {server.max_new_tokens}", "max_new_tokens")
    seed = gen.pop("seed", None)
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)
                             or not 0 <= seed < 2 ** 31):
        raise ApiError(400, f"seed must be an integer in [0, 2**31), got {seed!r}", "seed")
    try:
        settings = GenerationSettings.merge(server.tts.generate_defaults, **gen)
    except (ValueError, TypeError) as e:
        raise ApiError(400, str(e), getattr(e, "param", None)) from None
    parts, pause = _segments(server, data, text)
    if inline is None and any(data.get(k) is not None for k in INLINE_FIELDS):
        field = next(k for k in INLINE_FIELDS if data.get(k) is not None)
        raise ApiError(400, f"`{field}` was not read here (give it to `inline_voice` "
                            "first)", field)
    voice = server.voice_for(data) if inline is None else None
    tts, ref_code, voices = server.tts, None, None
    if server.kind == "voice_design" and not instructions:
        raise ApiError(400, "this is a VoiceDesign model: describe the voice in "
                            "`instructions` (e.g. 'A warm, low female voice')", "instructions")
    if server.kind == "base":
        if instructions:
            raise ApiError(400, "`instructions` are not supported by voice cloning (Base "
                                "models); leave them out", "instructions")
        voices = (server.voices.voices[voice] if inline is None else inline)[:1]
        if voices[0].icl_mode and voices[0].ref_code is not None:
            ref_code = voices[0].ref_code
    transcript = (voices[0].ref_text or "") if ref_code is not None else ""
    total = len(text) + len(instructions or "") + len(transcript)
    if total > 2 * server.options.max_input_chars:
        raise ApiError(413, f"`input`, `instructions` and the voice's transcript are {total} "
                            f"characters together; this server takes at most "
                            f"{2 * server.options.max_input_chars}: split the text", "input")
    try:
        items = prompts.for_mode(tts.config, tts.tokenizer, parts, language, speaker=voice,
                                 instruct=instructions, voices=voices, non_streaming_mode=nsm)
    except (ValueError, TypeError) as e:
        raise ApiError(400, str(e)) from None
    own_budget = data.get("max_new_tokens") is not None or "max_new_tokens" in \
        server.options.defaults
    seeds = segments.seeds(None if seed is None else [seed], [0] * len(parts), 1)
    deadline = time.monotonic() + server.options.request_timeout
    jobs = []
    for j, (part, prompt) in enumerate(zip(parts, items)):
        run = settings
        if len(parts) > 1 and not own_budget and server.options.frames_per_token:
            run = dataclasses.replace(settings, max_new_tokens=min(
                server.max_new_tokens, text_budget(len(tts.tokenizer.encode(part)),
                                                 server.options.frames_per_token)))
        limit = tts.config.talker.max_position_embeddings
        if len(prompt) + run.max_new_tokens > limit:
            raise ApiError(413, f"the prompt is {len(prompt)} tokens and max_new_tokens is "
                                f"{run.max_new_tokens}: together more than the model's "
                                f"{limit} positions; split the text (`segment_chars`) or "
                                "lower max_new_tokens", "input")
        check_prompt_tokens(server, prompt)
        jobs.append(Job(prompt, run, emit=None, seed=None if seeds is None else seeds[j],
                        ref_code=ref_code, stream=fmt in STREAMED, deadline=deadline))
    return SpeechRequest(jobs, fmt, stream_format == "sse", pause)


def _segments(server, data: dict, text: str) -> tuple[list[str], int]:
    """(the input's segments, samples of silence between them): `segment_options`."""
    n, pause = segment_options(server, data)
    parts = segments.split(text, n) if n else [text]
    if len(parts) > server.options.max_queue:     # each a job: checked before any is built
        raise ApiError(413, f"segment_chars {n} cuts `input` into {len(parts)} segments; "
                            f"this server queues at most {server.options.max_queue} "
                            "(--max-queue): give a larger segment_chars", "segment_chars")
    return parts or [text], pause


def segment_options(server, data: dict) -> tuple[int, int]:
    """(`segment_chars`, samples of silence between segments): the request's, else
    --segment-chars (0 or none: one pass) and --segment-pause; a 400 naming a bad one."""
    n = data.get("segment_chars")
    if n is None:
        n = server.options.segment_chars
    elif isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ApiError(400, f"segment_chars must be an integer >= 0 (0: the input in one "
                            f"pass), got {json.dumps(n)[:40]}", "segment_chars")
    pause = data.get("segment_pause")
    if pause is None:
        pause = server.options.segment_pause
    try:
        pause = segments.check_pause(pause)
    except ValueError as e:
        raise ApiError(400, str(e), "segment_pause") from None
    return n or 0, round(pause * server.tts.speech_tokenizer.sample_rate)


def check_chars(server, field: str, text: str) -> None:
    """`--max-input-chars` holds for each text field (`input`, `instructions`, a voice's
    `transcript`); their sum in one prompt for twice it (parse_speech)."""
    check_unicode(text, field)
    limit = server.options.max_input_chars
    if len(text) > limit:
        raise ApiError(413, f"`{field}` is {len(text)} characters; this server takes at most "
                            f"{limit}: split the text", field)


def check_prompt_tokens(server, prompt) -> None:
    """413 for a prompt (its positions and trailing text: input, instructions, a voice's
    transcript and reference frames) longer than --max-prompt-tokens."""
    n = len(prompt) + len(prompt.trailing)
    if n > server.max_prompt_tokens:
        raise ApiError(413, f"the prompt is {n} tokens (input, instructions and the voice's "
                            f"reference together); this server takes at most "
                            f"{server.max_prompt_tokens} (max_prompt_tokens): shorten them",
                       "input", code="prompt_too_long")
