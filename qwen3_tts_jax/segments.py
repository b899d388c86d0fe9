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


def _strip(text: str, a: int, b: int) -> tuple[int, int]:
    """The span text[a:b] less its leading and trailing whitespace."""
    while a < b and text[a].isspace():
        a += 1
    while b > a and text[b - 1].isspace():
        b -= 1
    return a, b


def _ends_sentence(text: str, at: int) -> bool:
    """Whether the mark at `at` ends a sentence: not the period of an abbreviation or initial."""
    if text[at] != ".":
        return True
    before = text[max(0, at - 16):at]          # the word before: an abbreviation is short
    word = before.rsplit(None, 1)[-1] if before.strip() else ""
    word = word.lstrip("\"'(\u201c\u2018[").lower()
    return not (word in _ABBREVIATIONS or (len(word) == 1 and word.isalpha()))


# The levels a text is cut at, coarsest first: (where a piece ends, which of those count, the
# characters such an end is made of besides whitespace); past the last, every max_chars characters.
_LEVELS = ((_SENTENCE, _ends_sentence,
            frozenset(".!?\u2026\"'\u201d\u2019)]\u3002\uff01\uff1f\uff0e\u300d\u300f\uff09\u3011")),
           (_CLAUSE, None, frozenset(",;:\u2014\u2013\uff0c\u3001\uff1b\uff1a")),
           (_WORD, None, frozenset()))


class _Region:
    """What is known of one span of the text at one level (`Stream._pack`): how far it was
    scanned, where its complete pieces end, and the packing of those pieces."""
    __slots__ = ("scan", "cuts", "packed", "state")

    def __init__(self, a: int):
        self.scan, self.cuts, self.packed = a, [], 0
        self.state = ([], None, None, None)


class Stream:
    """`split` for text that arrives in pieces (a text session's): the segments `split` gives
    the whole text, each one's text handed out as soon as it is certain to be in it, so a
    segment can be said while the text goes on.

    `push(piece, final)` returns [(segment index, text to add to it, whether that ends it)].
    The rule that makes it `split`: a piece (sentence, clause, word) counts once the text after
    it shows it has ended; a segment takes whole pieces while they fit. So the text of a sentence
    that may still join the open segment is held until it ends or outgrows the room left (then
    the segment ends before it); the first sentence of a segment is handed out word by word (it
    is in that segment whatever follows, down to the first `max_chars` characters). Each push
    costs the work of its own text: the pieces found and the packing of the complete ones are
    kept (`_Region`), from the sentence the open segment starts in, and only the text from there
    on (offsets count from it)."""

    def __init__(self, max_chars: int):
        self.max_chars = check_max_chars(max_chars)
        self.text = ""       # from a little before the sentence the open segment starts in
        self.final = False
        self.index = 0       # the open segment; the count of segments ended
        self._given = 0      # characters of the open segment handed out
        self._start = 0      # where the open segment starts (all before it is handed out)
        self._anchor = 0     # where the sentence it starts in starts
        self._regions: dict[tuple[int, int], _Region] = {}

    def push(self, piece: str, final: bool = False) -> list[tuple[int, str, bool]]:
        if self.final:
            raise ValueError("the text was already ended")
        self.text += piece
        self.final = final
        text = self.text
        closed, current, anchor, certain = self._pack(0, self._anchor, len(text), not final,
                                                      self._start)
        if final and current is not None:
            closed, current = closed + [current], None
        out = []
        for a, b in closed:
            segment = text[a:b].strip()
            out.append((self.index, segment[self._given:], True))
            self.index, self._given, self._start = self.index + 1, 0, b
        if current is not None:
            a = _strip(text, *current)[0] + self._given
            if certain > a:
                out.append((self.index, text[a:certain], False))
                self._given += certain - a
            if closed:    # a new open segment: planned from its own sentence, text kept from
                self._regions.clear()       # there (and the words before: `_ends_sentence`)
                drop = max(0, anchor - 16)
                self.text, self._start, self._anchor = text[drop:], self._start - drop, \
                    anchor - drop
        if final and not out and self.index == 0:
            out.append((0, "", True))            # no text at all: the only segment ends empty
        return out

    def _pack(self, level: int, a: int, z: int, growing: bool, start: int = 0):
        """`split`'s packing of text[a:z] at `level` (the last piece still growing while
        `growing`), from `start` (the open segment's start): (the spans of the segments it
        ends, the open one's span or None, where the piece that one starts in starts, how far
        its text is certain while growing)."""
        text, n = self.text, self.max_chars
        if level == len(_LEVELS):                       # every max_chars characters
            cuts = list(range(a, z, n)) or [a]
            return [(c, c + n) for c in cuts[:-1]], (cuts[-1], z), a, z
        region = self._regions.get((level, a))
        if region is None:
            region = self._regions[(level, a)] = _Region(a)
        pattern, keep, marks = _LEVELS[level]
        for m in pattern.finditer(text, region.scan, z):
            if m.end() >= z:                  # the text may go on: not an end yet
                break
            region.scan = m.end()
            if keep is None or keep(text, m.start()):
                region.cuts.append(m.end())
        # No end spans a character it cannot be made of, and those before the last such one
        # were all found: the next scan starts after it (a long sentence is not rescanned).
        i = z
        while i > region.scan and (text[i - 1] in marks or text[i - 1].isspace()):
            i -= 1
        region.scan = max(region.scan, i)
        while region.packed < len(region.cuts):
            i = region.packed
            piece = (region.cuts[i - 1] if i else a, region.cuts[i])
            region.state = self._add(region.state, level, piece, False, start)
            region.packed += 1
        state, last = region.state, region.cuts[-1] if region.cuts else a
        if last < z:
            state = self._add(state, level, (last, z), growing, start)
        closed, current, anchor, certain = state
        return closed, current, anchor, a if certain is None else certain

    def _add(self, state, level: int, piece: tuple[int, int], growing: bool, start: int):
        """The packing `state` with one more piece (`_pack`); a new state, `state` unchanged."""
        closed, current, anchor, certain = state
        text, n = self.text, self.max_chars
        a0, b = piece
        if b <= start:                          # handed out already
            return state
        a = max(a0, start)
        sa, sb = _strip(text, a, b)
        ca, cb = _strip(text, *current) if current is not None else (a, a)
        if sb - sa > n:               # too long alone: its own segments, cut at the next level
            parts, tail, _, certain = self._pack(level + 1, sa, sb, growing)
            # the last part goes on with the next piece, after the space that ended this one
            return (closed + ([current] if cb > ca else []) + parts, (tail[0], b), a0,
                    certain)
        lo, hi = _strip(text, current[0], b) if current is not None else (a, a)
        if current is None or hi - lo <= n:
            if growing:               # held while it may outgrow the room; a segment's first
                certain = cb if cb > ca else self._pack(level + 1, sa, sb, True)[3]
            return (closed, (a, b), a0, certain) if current is None else \
                (closed, (current[0], b), anchor, certain)
        if growing:
            certain = self._pack(level + 1, sa, sb, True)[3]
        return closed + ([current] if cb > ca else []), (a, b), a0, certain


def split(text: str, max_chars: int) -> list[str]:
    """`text` in segments of at most `max_chars` characters (stripped): whole sentences packed
    together while they fit; a longer sentence cut at clause punctuation, then between words, then
    every `max_chars` characters (a long run with no space, as Chinese may have). A text that fits
    is one segment, itself. No segment is empty or whitespace only."""
    max_chars = check_max_chars(max_chars)
    if len(text.strip()) <= max_chars:
        return [text.strip()] if text.strip() else []
    return [part for _, part, _ in Stream(max_chars).push(text, final=True) if part]


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
        out.append(segment_seed(per_text[i], j))
    return out


def segment_seed(seed: int, j: int) -> int:
    """The seed of segment `j` of a text whose seed is `seed` (`seeds`)."""
    return seed if j == 0 else int(np.random.SeedSequence([seed, j]).generate_state(1)[0]) % 2 ** 31


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
