"""Training data: the official JSONL files, audio -> codes (`prepare-data`), and the official batch.

Files (the official `finetuning/README.md` format, so files made by either tool work with either
trainer): one JSON object per line,
  train_raw.jsonl          {"audio": "utt1.wav", "text": "...", "ref_audio": "ref.wav", ...}
  train_with_codes.jsonl   the same object plus "audio_codes": [[c0..c15], ...] (frames x 16)
Other keys (e.g. "language") are kept as they are; the official trainer ignores "language" and so
do we (every example uses the "auto" codec prefix).

The batch (`collate`) is the official `TTSDataset.collate_fn` (finetuning/dataset.py), array for
array: for an example with L = len(text ids) (role + text, `[:-5]` of the assistant prompt) and
F frames, positions are
  0..2          role tokens (text stream only)
  3..5 / 6 / 7  tts_pad + [nothink, think_bos, think_eos] / tts_pad + speaker slot / tts_bos + pad
  8..8+L-4      text tokens + codec_pad;  8+L-3: tts_eos + codec_pad;  8+L-2: tts_pad + codec_bos
  s..s+F-1      tts_pad + frame codes (s = 8+L-1);  s+F: tts_pad + codec_eos
and T = max(L + F) + 8 over the batch. `codec_0_labels` holds code 0 of each frame and the EOS at
the position where it is INPUT (the loss shifts by one). We add what the jitted step needs besides:
the speaker x-vector of each row (under LoRA: the index of its speaker's trained row), the first
frame position and a frame-validity mask, and pad everything to shape buckets (`pad_to`) so that a
new batch rarely compiles a new program.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Iterable

import numpy as np

from ..buckets import ladder
from ..config import Qwen3TTSConfig

RAW_FIELDS = ("audio", "text", "ref_audio")
TRAIN_FIELDS = RAW_FIELDS + ("audio_codes",)
SPEAKER_SLOT = 6            # sequence position of the x-vector (official collate_fn / sft_12hz.py)
PROMPT_TAIL = 5             # tokens dropped from the assistant prompt: "<|im_end|>\n<|im_start|>assistant\n"
IGNORE = -100
NUM_GROUPS = 16
CODEBOOK = 2048

OFFICIAL_KEYS = ("input_ids", "codec_ids", "text_embedding_mask", "codec_embedding_mask",
                 "codec_mask", "attention_mask", "codec_0_labels")


class DataError(ValueError):
    """Training data that cannot be used; the message lists every bad line by number."""


@dataclasses.dataclass
class Example:
    line: int                  # 1-based line number in the JSONL file
    text_ids: np.ndarray       # (L,) int32: role tokens + text tokens
    codes: np.ndarray          # (F, 16) int32
    ref_audio: str
    speaker: str | None = None  # the line's "speaker" (None: the run's --speaker-name)


# ----------------------------------------------------------------------------- JSONL lines

def read_jsonl(path: str, required: Iterable[str]) -> tuple[list[tuple[int, dict]], list[str]]:
    """[(line number, object)] of the usable lines and ["line N: why"] for the others. A line is
    usable when it is a JSON object with every required field, a non-empty "text" and string
    paths; blank lines are skipped silently."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    good, problems = [], []
    for i, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            d = json.loads(raw)
        except json.JSONDecodeError as e:
            problems.append(f"line {i}: not valid JSON ({e.msg})")
            continue
        why = check_fields(d, required)
        if why:
            problems.append(f"line {i}: {why}")
        else:
            good.append((i, d))
    return good, problems


def check_fields(d, required: Iterable[str]) -> str | None:
    if not isinstance(d, dict):
        return "not a JSON object"
    missing = [k for k in required if k not in d or d[k] is None]
    if missing:
        return f"missing field(s) {missing} (each line needs {list(required)})"
    if not isinstance(d["text"], str) or not d["text"].strip():
        return "empty text"
    for k in ("audio", "ref_audio"):
        if k in required and not (isinstance(d[k], str) and d[k].strip()):
            return f"{k!r} must be a path (a non-empty string), got {d[k]!r}"
    if "speaker" in d and check_speaker_name(d["speaker"]):
        return check_speaker_name(d["speaker"])
    return None


def check_speaker_name(name) -> str | None:
    """Why `name` cannot be a speaker name (non-empty, printable, no spaces), or None."""
    if not isinstance(name, str) or not name.strip() or any(c.isspace() for c in name) \
            or not name.isprintable():
        return f"speaker name {name!r} must be non-empty, without spaces"
    return None


def check_codes(codes) -> np.ndarray:
    """A JSON audio_codes value -> (F, 16) int32, or ValueError saying what is wrong."""
    try:
        a = np.asarray(codes)
    except ValueError:
        raise ValueError("audio_codes is ragged: every frame needs 16 codes") from None
    if a.ndim != 2 or a.shape[1] != NUM_GROUPS or a.shape[0] == 0:
        raise ValueError(f"audio_codes must be a non-empty list of frames of {NUM_GROUPS} codes; "
                         f"got shape {a.shape}")
    if not np.issubdtype(a.dtype, np.integer) or a.min() < 0 or a.max() >= CODEBOOK:
        raise ValueError(f"audio_codes must be integers in [0, {CODEBOOK})")
    return a.astype(np.int32)


def text_ids(tokenizer, text: str) -> np.ndarray:
    """The official `TTSDataset`: tokenize the assistant prompt and drop its last 5 tokens."""
    from ..text import assistant_text

    return np.asarray(tokenizer.encode(assistant_text(text))[:-PROMPT_TAIL], np.int32)


def load_examples(path: str, tokenizer) -> list[Example]:
    """Every line of a train_with_codes.jsonl as an Example; DataError listing every bad line."""
    if not os.path.exists(path):
        raise DataError(f"training file {path} does not exist")
    lines, problems = read_jsonl(path, TRAIN_FIELDS)
    out = []
    for i, d in lines:
        try:
            codes = check_codes(d["audio_codes"])
        except ValueError as e:
            problems.append(f"line {i}: {e}")
            continue
        spk = d["speaker"].lower() if "speaker" in d else None
        out.append(Example(i, text_ids(tokenizer, d["text"]), codes, d["ref_audio"], spk))
    if problems:
        raise DataError(f"{path}: {len(problems)} unusable line(s):\n  " + "\n  ".join(problems)
                        + "\n(make the codes with `qwen3-tts-jax prepare-data` or the official "
                          "prepare_data.py)")
    if not out:
        raise DataError(f"{path} has no training examples")
    return out


def resolve_path(p: str, base: str) -> str:
    """Relative audio paths are tried as given (the official reads them from the working folder),
    then relative to the JSONL file's folder."""
    if os.path.isabs(p) or os.path.exists(p) or "://" in p:
        return p
    alt = os.path.join(base, p)
    return alt if os.path.exists(alt) else p


# ----------------------------------------------------------------------------- speaker x-vectors

def reference_xvectors(refs: Iterable[str], params, cfg, base: str = "."
                       ) -> tuple[dict[str, np.ndarray], list[str]]:
    """{ref_audio: x-vector (D,) float32} for each distinct reference, and the problems. The
    official dataset reads the file at its own rate and asserts 24 kHz; we resample to 24 kHz."""
    from ..audio import load_audio, resample
    from ..speaker_encoder import extract_xvector

    out, problems = {}, []
    for ref in dict.fromkeys(refs):
        try:
            wave, sr = load_audio(resolve_path(ref, base))
            out[ref] = np.asarray(extract_xvector(params, cfg, resample(wave, sr, 24000)),
                                  np.float32)
        except (ValueError, OSError) as e:
            problems.append(f"ref_audio {ref!r}: {e}")
    return out, problems


def speaker_xvectors(examples: list[Example], xvectors: dict[str, np.ndarray],
                     default: str) -> dict[str, np.ndarray]:
    """{speaker: its x-vector} in the order speakers first appear. The rule: a speaker's x-vector
    is the float32 mean (np.mean, dtype float32) over the x-vectors of that speaker's DISTINCT
    ref_audio files, each counted once however many lines name it (in the order they first
    appear); lines without "speaker" belong to `default`."""
    refs: dict[str, dict[str, None]] = {}
    for e in examples:
        refs.setdefault(e.speaker or default, {})[e.ref_audio] = None
    return {s: np.mean(np.stack([np.asarray(xvectors[r], np.float32) for r in rs]), axis=0,
                       dtype=np.float32) for s, rs in refs.items()}


# ----------------------------------------------------------------------------- the batch

def collate(examples: list[Example], cfg: Qwen3TTSConfig,
            xvectors: dict[str, np.ndarray] | None = None,
            speaker_index: dict[str, int] | None = None,
            default: str | None = None) -> dict[str, np.ndarray]:
    """The official collate_fn's arrays (OFFICIAL_KEYS, masks 2-D, i.e. before its unsqueeze(-1))
    plus "x_vectors" (B, D), "frame_start" (B,) and "frame_valid" (B, F_max) when `xvectors`
    ({ref_audio: (D,)}) is given, and "speaker_index" (B,) int32 (each line's speaker, or
    `default` for a line without one, looked up in `speaker_index`: the row of the trained
    speaker rows that LoRA feeds at the speaker slot) when `speaker_index` is given."""
    t = cfg.talker
    B = len(examples)
    T = max(len(e.text_ids) + len(e.codes) for e in examples) + 8
    F_max = max(len(e.codes) for e in examples)
    input_ids = np.zeros((B, T, 2), np.int32)
    codec_ids = np.zeros((B, T, NUM_GROUPS), np.int32)
    text_mask = np.zeros((B, T), bool)
    codec_emb_mask = np.zeros((B, T), bool)
    codec_mask = np.zeros((B, T), bool)
    attention_mask = np.zeros((B, T), np.int32)
    labels = np.full((B, T), IGNORE, np.int32)
    frame_start = np.zeros((B,), np.int32)
    frame_valid = np.zeros((B, F_max), bool)
    for i, e in enumerate(examples):
        ids, L, F = e.text_ids, len(e.text_ids), len(e.codes)
        s = 8 + L - 1                                   # first frame position
        # text stream
        input_ids[i, :3, 0] = ids[:3]
        input_ids[i, 3:7, 0] = cfg.tts_pad_token_id
        input_ids[i, 7, 0] = cfg.tts_bos_token_id
        input_ids[i, 8:8 + L - 3, 0] = ids[3:]
        input_ids[i, 8 + L - 3, 0] = cfg.tts_eos_token_id
        input_ids[i, 8 + L - 2:s + F + 1, 0] = cfg.tts_pad_token_id
        text_mask[i, :s + F + 1] = True
        # codec stream; position 6 (0 here) becomes the x-vector in the step
        input_ids[i, 3:8, 1] = [t.codec_nothink_id, t.codec_think_bos_id, t.codec_think_eos_id,
                                0, t.codec_pad_id]
        input_ids[i, 8:8 + L - 2, 1] = t.codec_pad_id
        input_ids[i, 8 + L - 2, 1] = t.codec_bos_id
        input_ids[i, s:s + F, 1] = e.codes[:, 0]
        input_ids[i, s + F, 1] = t.codec_eos_token_id
        labels[i, s:s + F] = e.codes[:, 0]
        labels[i, s + F] = t.codec_eos_token_id
        codec_ids[i, s:s + F] = e.codes
        codec_emb_mask[i, 3:s + F + 1] = True
        codec_emb_mask[i, SPEAKER_SLOT] = False
        codec_mask[i, s:s + F] = True
        attention_mask[i, :s + F + 1] = 1
        frame_start[i] = s
        frame_valid[i, :F] = True
    out = dict(input_ids=input_ids, codec_ids=codec_ids, text_embedding_mask=text_mask,
               codec_embedding_mask=codec_emb_mask, codec_mask=codec_mask,
               attention_mask=attention_mask, codec_0_labels=labels)
    if xvectors is not None:
        out.update(x_vectors=np.stack([xvectors[e.ref_audio] for e in examples]).astype(np.float32),
                   frame_start=frame_start, frame_valid=frame_valid)
    if speaker_index is not None:
        out["speaker_index"] = np.asarray([speaker_index[e.speaker or default] for e in examples],
                                          np.int32)
    return out


def pad_to(batch: dict[str, np.ndarray], rows: int | None = None, length: int | None = None,
           frames: int | None = None) -> dict[str, np.ndarray]:
    """Pad a collated batch to `rows` x `length` (sequence) x `frames` (default: the shape
    buckets of `buckets.ladder`). Padding rows and positions are masked everywhere (labels -100,
    no frames), so they change no loss and no gradient."""
    B, T = batch["input_ids"].shape[:2]
    F = batch["frame_valid"].shape[1]
    rows, length, frames = rows or B, length or ladder(T), frames or ladder(F)
    out = {}
    for k, a in batch.items():
        pad = [(0, rows - B)] + [(0, 0)] * (a.ndim - 1)
        if k in OFFICIAL_KEYS:
            pad[1] = (0, length - T)
        elif k == "frame_valid":
            pad[1] = (0, frames - F)
        fill = IGNORE if k == "codec_0_labels" else 0
        out[k] = np.pad(a, pad, constant_values=fill)
    return out


def batch_frames(batch) -> int:
    return int(np.sum(batch["frame_valid"]))


# ----------------------------------------------------------------------------- prepare-data

def prepare_data(tokenizer, input_path: str, output_path: str, batch_size: int = 32,
                 progress: bool = True) -> dict:
    """train_raw.jsonl -> train_with_codes.jsonl: each usable line's object plus "audio_codes"
    from `tokenizer` (a SpeechTokenizer), in input order, written like the official script
    (`json.dumps(ensure_ascii=False)` per line).

    Resumable: finished batches are appended to OUTPUT.partial, and OUTPUT.progress records how
    many input lines and bytes are done; a restarted run truncates the partial file to that size
    and goes on from there. When all lines are done the partial file becomes OUTPUT. An OUTPUT
    that already exists (without a progress file) is left alone. Lines that cannot be used
    (bad JSON, a missing field, empty text, unreadable audio) are reported by number and skipped.
    Returns {"written", "skipped_lines" (already done), "failed": ["line N: why"], "output"}."""
    from tqdm import tqdm

    from ..audio import load_audio

    partial, prog_file = output_path + ".partial", output_path + ".progress"
    if os.path.exists(output_path) and not os.path.exists(prog_file):
        return {"written": 0, "skipped_lines": None, "failed": [], "output": output_path,
                "already_done": True}
    base = os.path.dirname(os.path.abspath(input_path))
    lines, failed = read_jsonl(input_path, RAW_FIELDS)
    done_lines, done_bytes = 0, 0
    if os.path.exists(prog_file) and os.path.exists(partial):
        with open(prog_file) as f:
            state = json.load(f)
        done_lines, done_bytes = int(state["input_lines"]), int(state["bytes"])
        with open(partial, "r+b") as f:
            f.truncate(done_bytes)
    else:
        open(partial, "wb").close()
    failed = [p for p in failed if int(p.split(":")[0].split()[1]) > done_lines]
    todo = [(i, d) for i, d in lines if i > done_lines]
    written = 0
    bar = tqdm(total=len(todo), disable=not progress, unit="utt", desc="encoding")
    for start in range(0, len(todo), batch_size):
        chunk = todo[start:start + batch_size]
        waves, ok = [], []
        for i, d in chunk:
            try:
                waves.append(load_audio(resolve_path(d["audio"], base), max_seconds=None))
                ok.append((i, d))
            except (ValueError, OSError) as e:
                failed.append(f"line {i}: audio {d['audio']!r}: {e}")
        codes = tokenizer.encode(waves) if waves else []
        text = "".join(json.dumps({**d, "audio_codes": c.tolist()}, ensure_ascii=False) + "\n"
                       for (_, d), c in zip(ok, codes))
        with open(partial, "ab") as f:
            f.write(text.encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
            done_bytes = f.tell()
        done_lines = chunk[-1][0]
        _write_json_atomic(prog_file, {"input_lines": done_lines, "bytes": done_bytes})
        written += len(ok)
        bar.update(len(chunk))
    bar.close()
    os.replace(partial, output_path)
    os.remove(prog_file)
    failed.sort(key=lambda p: int(p.split(":")[0].split()[1]))
    return {"written": written, "skipped_lines": len(lines) - len(todo), "failed": failed,
            "output": output_path}


def _write_json_atomic(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)
