"""Long text said in segments: a text longer than `max_chars` characters is cut at sentence ends
(then clause punctuation, then spaces, then anywhere) into segments of at most `max_chars`, each
generated as its own utterance with the same voice and settings, and their audio joined with a
pause. Qwen3-TTS says a whole text in one pass (the official too); over minutes of speech the
audio drifts and the end token grows unreliable, so a long article is best said a few sentences
at a time. A request layer: text in, text out; the API runs the segments as rows of one batch.

    split("One. Two three. Four!", 12)  ->  ["One.", "Two three.", "Four!"]
"""
from __future__ import annotations

import re
from typing import Sequence

import numpy as np

from .settings import as_list, check_seed

SEGMENT_PAUSE = 0.2     # seconds of silence between a text's segments (`segment_pause`)

# A sentence ends after . ! ? or an ellipsis (closing quotes and brackets stay with it) before a
# space; after a CJK or full-width end mark with no space; and at a blank line (a paragraph's end).
# A single line break is a space: hard-wrapped text (a book's lines) breaks mid-sentence.
_LATIN_END = r"[.!?\u2026]+[\"'\u201d\u2019)\]]*\s+"
_WIDE_END = r"[\u3002\uff01\uff1f\uff0e][\"'\u201d\u2019\u300d\u300f\uff09\u3011]*\s*"
_SENTENCE = re.compile(rf"(?:{_LATIN_END}|{_WIDE_END}|\n[^\S\n]*\n\s*)")
# Inside a sentence: after a comma, semicolon, colon or dash (ASCII or full-width).
_CLAUSE = re.compile(r"(?:[,;:\u2014\u2013]\s+|[\uff0c\u3001\uff1b\uff1a]\s*)")
_WORD = re.compile(r"\s+")
# Words whose period does not end a sentence ("Dr. Smith"), and single-letter initials.
_ABBREVIATIONS = {"mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "vs", "etc", "e.g", "i.e",
                  "no", "fig", "mt", "approx", "inc", "ltd", "co"}


def check_max_chars(max_chars) -> int:
    """`max_chars` as an int >= 1, or a ValueError naming it."""
    if isinstance(max_chars, bool) or not isinstance(max_chars, (int, np.integer)) \
            or max_chars < 1:
        raise ValueError(f"segment_chars must be an integer >= 1 (the most characters of a "
                         f"segment), got {max_chars!r}")
    return int(max_chars)


def _cut(text: str, pattern: re.Pattern, keep=lambda text, end: True) -> list[str]:
    """`text` in pieces ending where `pattern` matches (the match stays with the piece before),
    skipping matches `keep` refuses. The pieces concatenate to `text`."""
    pieces, start = [], 0
    for m in pattern.finditer(text):
        if m.end() < len(text) and keep(text, m.start()):
            pieces.append(text[start:m.end()])
            start = m.end()
    pieces.append(text[start:])
    return [p for p in pieces if p]


def _ends_sentence(text: str, at: int) -> bool:
    """Whether the mark at `at` ends a sentence: not the period of an abbreviation or initial."""
    if text[at] != ".":
        return True
    before = text[max(0, at - 16):at]          # the word before: an abbreviation is short
    word = before.rsplit(None, 1)[-1] if before.strip() else ""
    word = word.lstrip("\"'(\u201c\u2018[").lower()
    return not (word in _ABBREVIATIONS or (len(word) == 1 and word.isalpha()))


def _pack(pieces: list[str], max_chars: int, finer) -> list[str]:
    """Consecutive pieces joined while they fit `max_chars` (stripped); a piece longer than that
    is cut by `finer` first."""
    out, current = [], ""
    for piece in pieces:
        if len(piece.strip()) > max_chars:
            if current.strip():
                out.append(current.strip())
            current = ""
            parts = finer(piece.strip())
            out.extend(parts[:-1])
            # the last part goes on with the next piece, after the space that ended this one
            current = parts[-1] + piece[len(piece.rstrip()):] if parts else ""
            continue
        if len((current + piece).strip()) <= max_chars:
            current += piece
        else:
            if current.strip():
                out.append(current.strip())
            current = piece
    if current.strip():
        out.append(current.strip())
    return out


def _hard(text: str, max_chars: int) -> list[str]:
    return [text[i:i + max_chars] for i in range(0, len(text), max_chars)]


def split(text: str, max_chars: int) -> list[str]:
    """`text` in segments of at most `max_chars` characters (stripped): whole sentences packed
    together while they fit; a longer sentence cut at clause punctuation, then between words, then
    every `max_chars` characters (a long run with no space, as Chinese may have). A text that fits
    is one segment, itself. No segment is empty or whitespace only."""
    max_chars = check_max_chars(max_chars)
    if len(text.strip()) <= max_chars:
        return [text.strip()] if text.strip() else []

    def words(s):
        return _pack(_cut(s, _WORD), max_chars, lambda w: _hard(w, max_chars))

    def clauses(s):
        return _pack(_cut(s, _CLAUSE), max_chars, words)

    return _pack(_cut(text, _SENTENCE, _ends_sentence), max_chars, clauses)


def expand(texts: Sequence[str], max_chars: int | None) -> tuple[list[str], list[int]]:
    """(segments, owners) of a batch of texts: every text's segments in order, and for each the
    index of its text. `max_chars` None: the texts as they are."""
    if max_chars is None:
        return list(texts), list(range(len(texts)))
    segments, owners = [], []
    for i, text in enumerate(texts):
        parts = split(text, max_chars) or [text]      # whitespace: the API's check names it
        segments += parts
        owners += [i] * len(parts)
    return segments, owners


def seeds(seed, owners: list[int], n: int):
    """The segments' seeds from the texts' (`settings.keys` forms): None and an int stay (an int
    seeds row b with fold_in(key(seed), b), the rows now being segments); a list (one per text)
    gives a text's first segment its seed and each later one a seed drawn from (seed, index), so
    a text short enough to stay whole samples as it would unsplit."""
    if not isinstance(seed, (list, tuple)):
        return seed
    per_text = [check_seed(s) for s in as_list(seed, n, "seed")]
    out, index = [], {}
    for i in owners:
        j = index[i] = index.get(i, -1) + 1
        s = per_text[i]
        out.append(s if j == 0 else
                   int(np.random.SeedSequence([s, j]).generate_state(1)[0]) % 2 ** 31)
    return out


def join(waves: Sequence[np.ndarray], owners: list[int], n: int, pause: int) -> list[np.ndarray]:
    """Each of `n` texts' audio: its segments' waves in order with `pause` samples of silence
    between them."""
    out: list[list[np.ndarray]] = [[] for _ in range(n)]
    for wave, i in zip(waves, owners):
        if out[i] and pause:
            out[i].append(np.zeros(pause, np.float32))
        out[i].append(np.asarray(wave, np.float32))
    return [np.concatenate(parts) if parts else np.zeros(0, np.float32) for parts in out]


def check_pause(pause) -> float:
    """`segment_pause` in seconds, a finite number in [0, 10], or a ValueError naming it."""
    if isinstance(pause, bool) or not isinstance(pause, (int, float, np.integer, np.floating)) \
            or not 0 <= float(pause) <= 10:
        raise ValueError(f"segment_pause must be a number of seconds in [0, 10], got {pause!r}")
    return float(pause)
