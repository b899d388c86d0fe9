"""Batch jobs: many utterances to WAV files, continuous batches on every local device, restartable.

    qwen3-tts-jax batch requests.jsonl --out-dir wavs --model ... --batch-size 16
    qwen3-tts-jax batch lines.txt --out-dir wavs --model ... --speaker ryan --language english

Input: JSONL, one request per line: {"text": ..., "name": "out-name", and per mode "speaker",
"instruct", "voice" (a voice file) or "ref_audio" with "ref_text" (or "x_vector_only_mode": true;
optionally "ref_tail_silence", seconds),
"language", "seed"} (the mode is the checkpoint's; each distinct reference is encoded once); or a plain
text file, one utterance per line, named line-00001... with the voice from the command line. A line
that cannot be used (bad JSON, no text, unknown speaker, ...) is reported with its number and
skipped. Requests are sorted by length and run as continuous batches (`engine.BatchEngine`):
a row whose utterance ended takes the next request at the next host check, and each WAV is
written as its utterance ends. Each WAV is written atomically and durably (temp file, fsync,
rename: `audio.write_audio`), and a file that already exists and decodes whole is not generated
again, so a killed job restarts where it stopped without losing or redoing finished work; an
existing file that does not decode (empty, cut short, not audio) is generated again, and temp
files of this job's names left by a killed run are removed. A request that fails (a bad voice
file, a generation error, a failed write) is reported and the others go on.

Data parallel (several local devices): one engine per device (`engine.EnginePool`), the
weights copied to each with `jax.device_put`, the requests handed to whichever device has room.
With `continuous=False` (`--no-continuous-batching`), padded batches instead, each split over a
1-D "data" `jax.sharding` mesh of the local devices (params replicated; the frame loop a
`shard_map`, each device on its rows: `generate.decode`). Tensor parallel
(`--model-parallel m`, a model too big for one device): padded batches over a (data, model) mesh,
the weights split over "model" and the rows over "data".
Across hosts, start the same command on each host with `--distributed` (host count and index
from `jax.distributed.initialize()`) or `--num-hosts N --host-index i`: host i takes requests i,
i+N, i+2N, ... of the input.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

import jax
import numpy as np

from . import prompts, segments
from .budget import text_budget


def _why(e: BaseException) -> str:
    """An error as the summary lists it: a request's own problem (ValueError, TypeError, OSError)
    by its message, anything else (a device or runtime error) with its type too."""
    if isinstance(e, (ValueError, TypeError, OSError)):
        return str(e)
    return f"{type(e).__name__}: {e}"


def unfinished(path: str) -> str | None:
    """Why the audio file at `path` cannot stand as a finished output, or None: it must decode to
    the end, as many frames as its header declares, at least one (`write_audio` never writes an
    empty file), and a WAV must be as long as its RIFF header says (libsndfile reads a cut WAV
    as a shorter one)."""
    import soundfile as sf

    try:
        with open(path, "rb") as f:
            head = f.read(12)
            size = os.fstat(f.fileno()).st_size
        if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
            declared = int.from_bytes(head[4:8], "little") + 8
            if size < declared:
                return f"it is cut short ({size} of {declared} bytes)"
        with sf.SoundFile(path) as f:
            frames, got = f.frames, 0
            while True:
                n = len(f.read(1 << 16, dtype="float32"))
                if n == 0:
                    break
                got += n
    except Exception as e:  # noqa: BLE001 - whatever the decoder says: not a finished file
        return f"it does not decode ({_why(e)})"
    if got == 0:
        return "it has no audio"
    if got < frames:
        return f"it decodes to {got} of the {frames} frames its header declares"
    return None


def remove_stale_parts(out_dir: str, outputs: set[str]) -> list[str]:
    """Remove `write_audio`'s temp files in `out_dir` for the file names in `outputs` (left by a
    killed run; the names of other jobs' files, e.g. another host's share, are left alone).
    Returns the names removed."""
    from .audio import PART_FILE

    removed = []
    for entry in os.listdir(out_dir):
        m = PART_FILE.fullmatch(entry)
        if m and m["name"] in outputs:
            try:
                os.unlink(os.path.join(out_dir, entry))
            except FileNotFoundError:           # gone meanwhile
                continue
            removed.append(entry)
    return removed


@dataclasses.dataclass
class Request:
    line: int
    text: str
    name: str
    speaker: str | None = None
    instruct: str | None = None
    language: str | None = None
    voice: str | None = None
    ref_audio: str | None = None          # Base: a reference (path, URL, base64) instead of a voice
    ref_text: str | None = None           # its transcript (ICL), or
    x_vector_only_mode: bool | None = None  # the speaker embedding only
    ref_tail_silence: float | None = None   # seconds of silence after the reference (ICL)
    seed: int | None = None


def read_text(path: str) -> str:
    """A UTF-8 text file ("-": standard input), a leading byte order mark (Windows editors write
    one) dropped. Text that is not UTF-8 is a ValueError naming the file and the byte offset of
    the first bad byte."""
    if path == "-":
        if sys.stdin is None:          # started with standard input closed
            raise ValueError("standard input is closed")
        data, path = sys.stdin.buffer.read(), "standard input"
    else:
        with open(path, "rb") as f:
            data = f.read()
    try:
        # decoded as "utf-8", not "utf-8-sig", so that the offset counts the BOM's bytes too
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text: byte 0x{data[e.start]:02x} at offset "
                         f"{e.start} ({e.reason})") from None


def _name_problem(name: str) -> str | None:
    """Why `name` cannot be a file name in OUT_DIR, or None. A leading '.' is refused too: the
    temp files being written are hidden ".NAME...part" files, and "." / ".." are folders; 200
    bytes leave room for the extension and the temp file's affixes under the usual 255."""
    if any(c in "/\\" or ord(c) < 32 or ord(c) == 127 for c in name):
        return "must not contain '/', '\\', NUL, newlines or other control characters"
    if name.startswith("."):
        return "must not start with '.'"
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:                    # a lone surrogate ("\\ud800" in the JSON)
        return "is not valid Unicode"
    if size > 200:
        return f"is {size} bytes long in UTF-8 (at most 200)"
    return None


def _check_reference(d: dict) -> None:
    """A line's cloned voice: a voice file, or a reference with its transcript (ICL) or
    `x_vector_only_mode` (the official `create_voice_clone_prompt`'s rule), not both."""
    x_only = d.get("x_vector_only_mode")
    if x_only is not None and not isinstance(x_only, bool):
        raise ValueError(f"x_vector_only_mode must be true or false, got {x_only!r}")
    silence = d.get("ref_tail_silence")
    if silence is not None and (isinstance(silence, bool) or not isinstance(silence, (int, float))
                                or not 0 <= silence <= 5):
        raise ValueError(f"ref_tail_silence must be seconds in [0, 5], got {silence!r}")
    if d.get("ref_audio") is None:
        extra = [k for k in ("ref_text", "x_vector_only_mode", "ref_tail_silence")
                 if d.get(k) is not None]
        if extra:
            raise ValueError(f"{extra[0]} goes with ref_audio (a reference to clone)")
        return
    if d.get("voice") is not None:
        raise ValueError("give either voice (a voice file) or ref_audio, not both")
    if not (d.get("ref_text") or "").strip() and not x_only:
        raise ValueError("ref_audio needs its transcript, ref_text (ICL cloning), or "
                         "\"x_vector_only_mode\": true (the speaker embedding only)")


class _Voices:
    """Each request's cloned voice (Base): its voice file, or its reference encoded
    (`create_voice_clone_prompt`); the last 256 distinct ones kept, so a voice shared by many
    lines is read or encoded once."""

    def __init__(self, tts, size: int = 256):
        self.tts, self.size = tts, size
        self.items: dict = {}

    def __call__(self, r: Request):
        from .voice import load_voice

        if r.voice:
            key = ("file", r.voice)
        elif r.ref_audio:
            key = ("ref", r.ref_audio, (r.ref_text or "").strip(), bool(r.x_vector_only_mode),
                   float(r.ref_tail_silence or 0.0))
        else:
            raise ValueError("a Base checkpoint needs a \"voice\" file or a \"ref_audio\" for "
                             "every request")
        if key not in self.items:
            while self.items and len(self.items) >= self.size:
                self.items.pop(next(iter(self.items)))
            self.items[key] = load_voice(r.voice)[0] if r.voice else \
                self.tts.create_voice_clone_prompt(r.ref_audio, ref_text=key[2] or None,
                                                   x_vector_only_mode=key[3],
                                                   ref_tail_silence=key[4])[0]
        return self.items[key]


def read_requests(path: str, defaults: dict) -> tuple[list[Request], list[str]]:
    """(requests, problems): JSONL if the file's first non-empty line is a JSON object."""
    lines = read_text(path).splitlines()
    first = next((ln.strip() for ln in lines if ln.strip()), "")
    as_json = first.startswith("{")
    fields = {f.name for f in dataclasses.fields(Request)} - {"line"}
    out, problems, names = [], [], set()
    for i, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            if as_json:
                d = json.loads(raw)
                if not isinstance(d, dict):
                    raise ValueError("not a JSON object")
                unknown = sorted(set(d) - fields)
                if unknown:
                    raise ValueError(f"unknown field(s) {unknown}; known: {sorted(fields)}")
            else:
                d = {"text": raw}
            d = {**defaults, **{k: v for k, v in d.items() if v is not None}}
            if not isinstance(d.get("text"), str) or not d["text"].strip():
                raise ValueError("no text")
            for k in ("speaker", "instruct", "language", "voice", "ref_audio", "ref_text"):
                if k in d and not isinstance(d[k], str):
                    raise ValueError(f"{k} must be a string, got {d[k]!r}")
            _check_reference(d)
            seed = d.get("seed")
            if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)
                                     or not 0 <= seed < 2 ** 31):
                raise ValueError(f"seed must be an integer in [0, 2**31), got {seed!r}")
            name = str(d.get("name") or f"line-{i:05d}")
            why = _name_problem(name)
            if why:
                raise ValueError(f"bad name {name!r}: it {why}")
            if name in names:
                raise ValueError(f"duplicate name {name!r}")
            names.add(name)
            out.append(Request(line=i, **{**d, "name": name}))
        except (ValueError, TypeError) as e:
            problems.append(f"line {i}: {e}")
    return out, problems


def run(tts, requests: list[Request], out_dir: str, batch_size: int = 8, gen: dict | None = None,
        progress: bool = True, num_hosts: int = 1, host_index: int = 0,
        continuous: bool = True, fmt: str = "wav", frames_per_token: float = 0.0,
        segment_chars: int | None = None,
        segment_pause: float = segments.SEGMENT_PAUSE) -> dict:
    """Generate every request not yet on disk (OUT_DIR/NAME.FMT, `fmt` a format of
    `audio.output_formats()`). Returns a summary dict (done, skipped, failed, redone, cut: the
    outputs written that reached max_new_tokens without the end token).

    Restartable: an existing output is kept if it decodes whole (`unfinished`), generated again
    if not (one stderr line each); temp files of our names left by a killed run are removed. A
    request that fails is listed in "failed" and the others go on; an exception that ends the
    run (KeyboardInterrupt) leaves every finished output in place.

    `continuous`: rows refill as requests end, one engine per local device (the default);
    False: padded batches of `batch_size`, each waiting for its longest row, split over a
    `jax.sharding` mesh of the local devices (always so with `model_parallel` > 1).

    `frames_per_token` > 0: each request's budget is at most `budget.text_budget` of its text
    (a padded batch: of its longest text), bounding a runaway (the command line's default).

    `segment_chars`: a text longer than that is said in segments (`segments.py`), each a request
    of its own in the batches, its file written once every segment is done (`_Segmented`): the
    API's `segment_chars` audio for the request's seed."""
    from tqdm import tqdm

    from .audio import AudioError, output_formats, write_audio

    if fmt not in output_formats():
        raise AudioError(f"unknown or unwritable audio format {fmt!r}: choose one of "
                         f"{', '.join(output_formats())}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if segment_chars is not None:
        segments.check_max_chars(segment_chars)
    pause = segments.check_pause(segment_pause)
    os.makedirs(out_dir, exist_ok=True)
    mine = requests[host_index::num_hosts]

    def path(r: Request) -> str:
        return os.path.join(out_dir, f"{r.name}.{fmt}")

    # every format's: a run with another --format may have left them
    remove_stale_parts(out_dir, {f"{r.name}.{f}" for r in mine for f in output_formats()})
    todo, redone = [], []
    for r in mine:
        if os.path.lexists(path(r)):
            why = unfinished(path(r))
            if why is None:
                continue
            print(f"qwen3-tts-jax: generating {path(r)} again: {why}", file=sys.stderr)
            redone.append(r.name)
        todo.append(r)
    skipped = len(mine) - len(todo)
    devices = len(jax.local_devices())
    failed, cut, done, audio_s, t0 = [], [], 0, 0.0, time.perf_counter()
    bar = tqdm(total=len(todo), disable=not progress, unit="utt")

    def fail(r: Request, why: str) -> None:
        failed.append(f"line {r.line} ({r.name}): {why}")
        bar.update(1)

    def written(r: Request, wave, sr: int, budget_reached: bool = False) -> None:
        nonlocal audio_s, done
        try:
            write_audio(path(r), wave, sr, fmt)
        except Exception as e:  # noqa: BLE001 - a full disk, ...: the others still go on
            fail(r, f"cannot write {path(r)}: {e}")
            return
        if budget_reached:
            cut.append(f"line {r.line} ({r.name}): {path(r)} is {len(wave) / sr:.2f} s")
        done += 1
        audio_s += len(wave) / sr
        bar.update(1)
        wall = time.perf_counter() - t0
        bar.set_postfix_str(f"{audio_s:.1f} s audio, {audio_s / max(wall, 1e-9):.2f}x real time")

    def limit(r: Request) -> int | None:
        return text_budget(len(tts.tokenizer.encode(r.text)), frames_per_token) \
            if frames_per_token else None

    if segment_chars is not None:     # each segment a request; a file once all are done
        joined = _Segmented(todo, segment_chars, pause, dict(gen or {}), written, fail)
        todo, written, fail = joined.todo, joined.written, joined.fail
    todo.sort(key=lambda r: len(r.text))              # similar lengths share a padded batch
    refilled, voice_of = None, _Voices(tts)
    if continuous and tts.model_parallel == 1:
        refilled = _run_continuous(tts, todo, batch_size, dict(gen or {}), written, fail,
                                   jax.local_devices(), limit, voice_of)
    else:
        devices //= tts.model_parallel                 # rows split over the mesh's "data" axis
        batch_size = max(batch_size, devices) // devices * devices
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            try:
                waves, sr, ran_out = _generate(tts, chunk, dict(gen or {}), devices, limit,
                                               voice_of)
            except Exception as e:  # noqa: BLE001 - the batch's own requests fail, not the run
                waves, error = None, e
            if waves is not None:
                for i, (r, w) in enumerate(zip(chunk, waves)):
                    written(r, w, sr, i in ran_out)
                continue
            if len(chunk) == 1:
                fail(chunk[0], _why(error))
                continue
            for r in chunk:          # which request failed it: each alone, the others written
                try:
                    w, sr, ran_out = _generate(tts, [r], dict(gen or {}), devices, limit,
                                               voice_of)
                except Exception as e:  # noqa: BLE001 - this request fails, the others go on
                    fail(r, _why(e))
                    continue
                written(r, w[0], sr, 0 in ran_out)
    bar.close()
    return {"done": done, "skipped": skipped, "failed": failed, "redone": redone, "cut": cut,
            "audio_seconds": audio_s, "wall_seconds": time.perf_counter() - t0,
            "refilled": refilled}


# Frames between the batch's host checks on one device: a finished row is refilled at the next
# one (at most this many frames idle); each check copies the codes to the host.
CONTINUOUS_CHUNK_FRAMES = 8


def _run_continuous(tts, todo: list[Request], batch_size: int, gen: dict, written, fail,
                    devices: list, limit, voice_of: _Voices) -> int:
    """The requests through the server's `BatchEngine` (continuous batching: a row whose request
    ended takes the next request at the next host check, instead of the padded batch waiting for
    its longest row), one engine per device (`EnginePool`: the weights copied to each, no
    collective), each WAV written as its request ends, with the offline API's audio (its seed,
    the official codec decode). Requests are handed out as rows free up (a device whose rows
    end sooner takes more), at most two batches' worth ahead per device. Returns how many
    requests started in a running batch."""
    import threading

    from .engine import BatchEngine, EnginePool, Job
    from .settings import GenerationSettings

    kw = dict(max_batch_size=batch_size, batch_window=0.0, max_queue=len(todo) + 1,
              chunk_frames=CONTINUOUS_CHUNK_FRAMES, first_chunk_frames=CONTINUOUS_CHUNK_FRAMES)
    engine = (BatchEngine(tts, **kw) if len(devices) == 1
              else EnginePool(tts, devices=devices, **kw))
    sr = tts.speech_tokenizer.config.output_sample_rate
    jobs: list[Job] = []
    left = [0]
    all_done = threading.Event()
    lock = threading.Lock()

    def submit_next() -> None:
        with lock:
            job = jobs.pop(0) if jobs else None
        if job is not None:
            engine.submit(job)

    def emit_for(r: Request, job: list):
        waves = []

        def emit(x):
            if x is not None and not isinstance(x, BaseException):
                waves.append(x)
                return
            try:
                if x is None:
                    written(r, np.concatenate(waves) if waves else np.zeros(0, np.float32), sr,
                            job[0].finish_reason == "length")
                else:
                    fail(r, _why(x))
            except Exception as e:  # noqa: BLE001 - never lose the count: the job waits for every row
                fail(r, _why(e))
            finally:
                submit_next()
                with lock:
                    left[0] -= 1
                    if left[0] == 0:
                        all_done.set()
        return emit

    settings_kw = {k: v for k, v in gen.items() if k not in ("seed", "non_streaming_mode")}
    for r in todo:
        try:
            items, ref_code, seed = _prompts(tts, [r], dict(gen), voice_of)
            settings = GenerationSettings.merge(tts.generate_defaults, **settings_kw)
            most = limit(r)
            if most is not None and most < settings.max_new_tokens:
                settings = dataclasses.replace(settings, max_new_tokens=most)
        except Exception as e:  # noqa: BLE001 - this request fails, the others go on
            fail(r, _why(e))
            continue
        box: list[Job] = []         # the emit reads its job's finish_reason
        box.append(Job(items[0], settings, emit=emit_for(r, box), seed=seed[0],
                       ref_code=ref_code[0], stream=False))
        jobs.append(box[0])
    left[0] = len(jobs)
    if jobs:
        ahead = 2 * batch_size * len(devices)
        for _ in range(min(ahead, len(jobs))):
            submit_next()
        engine.start()
        try:
            all_done.wait()
        finally:        # Ctrl-C too: a device thread still running at exit aborts the process
            engine.stop()
    return engine.stats["joined"]


class _Segmented:
    """Requests whose text is longer than `max_chars` as one request per segment (`segments.py`;
    the first keeps the request's seed, the others get `segments.seeds`'), and the `written` and
    `fail` of the run for them: a request's file is written once every segment has its audio
    (joined with `pause` seconds of silence); its first failing segment fails it, once."""

    def __init__(self, requests: list[Request], max_chars: int, pause: float, gen: dict,
                 written, fail):
        self._written, self._fail = written, fail
        self.pause = pause
        self.todo: list[Request] = []
        self.parent: dict[int, tuple[Request, int]] = {}   # id(segment) -> (request, index)
        self.waves: dict[int, list] = {}                   # id(request) -> audio per segment
        self.cut: dict[int, bool] = {}
        for r in requests:
            parts = segments.split(r.text, max_chars) or [r.text]
            if len(parts) == 1:
                self.todo.append(r)
                continue
            seeds = segments.seeds([_seed(r, gen)], [0] * len(parts), 1)
            self.waves[id(r)], self.cut[id(r)] = [None] * len(parts), False
            for j, (text, seed) in enumerate(zip(parts, seeds)):
                seg = dataclasses.replace(r, text=text, seed=seed)
                self.parent[id(seg)] = (r, j)
                self.todo.append(seg)

    def written(self, seg: Request, wave, sr: int, budget_reached: bool = False) -> None:
        if id(seg) not in self.parent:
            return self._written(seg, wave, sr, budget_reached)
        r, j = self.parent.pop(id(seg))
        waves = self.waves.get(id(r))
        if waves is None:                    # the request failed already
            return
        waves[j] = wave
        self.cut[id(r)] |= bool(budget_reached)
        if all(w is not None for w in waves):
            del self.waves[id(r)]
            joined = segments.join(waves, [0] * len(waves), 1, round(self.pause * sr))[0]
            self._written(r, joined, sr, self.cut[id(r)])

    def fail(self, seg: Request, why: str) -> None:
        if id(seg) not in self.parent:
            return self._fail(seg, why)
        r, j = self.parent.pop(id(seg))
        if self.waves.pop(id(r), None) is not None:
            self._fail(r, f"segment {j + 1} ({seg.text[:40]!r}): {why}")


def _seed(r: Request, gen: dict) -> int:
    """A request's seed: its own, or the run's (`--seed`, default 0) plus its line number."""
    return r.seed if r.seed is not None else (gen.get("seed") or 0) + r.line


def _prompts(tts, chunk: list[Request], gen: dict, voice_of: _Voices):
    """(prompts, ICL reference codes or None, seeds) of requests; pops the text mode from gen."""
    seeds = [_seed(r, gen) for r in chunk]
    voices = None
    if tts.tts_model_type == "base":
        voices = [voice_of(r) for r in chunk]
    elif any(r.ref_audio for r in chunk):
        raise ValueError(f"ref_audio clones a voice, which needs a Base checkpoint; this is a "
                         f"{tts.tts_model_type} checkpoint")
    items = prompts.for_mode(tts.config, tts.tokenizer, [r.text for r in chunk],
                             [r.language or "auto" for r in chunk],
                             speaker=[r.speaker for r in chunk],
                             instruct=[r.instruct or "" for r in chunk], voices=voices,
                             non_streaming_mode=gen.pop("non_streaming_mode", None))
    refs = [v.ref_code if v is not None and v.icl_mode and v.ref_code is not None else None
            for v in (voices or [None] * len(chunk))]
    return items, refs, seeds


def _generate(tts, chunk: list[Request], gen: dict, devices: int, limit, voice_of: _Voices):
    """One padded batch through the official-style API, sharded over the local devices:
    (waves, sample rate, the indices in `chunk` that reached max_new_tokens without EOS).
    `limit(request)`: its text's budget (each row its own) or None."""
    import warnings

    from .budget import BudgetReached

    items, _, seeds = _prompts(tts, chunk, gen, voice_of)
    gen = {**gen, "seed": seeds}
    most = [limit(r) for r in chunk]
    if None not in most:
        cap = gen.get("max_new_tokens") or tts.generate_defaults.max_new_tokens
        gen["max_new_tokens"] = [min(cap, m) for m in most]
    with warnings.catch_warnings(record=True) as caught:   # told in the summary instead
        warnings.simplefilter("always", BudgetReached)
        codes = tts.generate_prompts_codes(items, pad_batch_to=devices, **gen)
    for w in caught:
        if not isinstance(w.message, BudgetReached):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    ran_out = {i for w in caught if isinstance(w.message, BudgetReached) for i in w.message.rows}
    if tts.tts_model_type == "base":
        waves, sr = tts.decode_voice_clone(codes, [voice_of(r) for r in chunk])
    else:
        waves, sr = tts.decode(codes)
    return waves, sr, ran_out
