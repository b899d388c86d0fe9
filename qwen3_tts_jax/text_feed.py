"""Text that arrives in pieces (an LLM's output, a WebSocket session), tokenized as it comes:
`TextFeed` commits tokens only where the text can no longer change them (`commit_point`), so the
pieces give the tokens of the whole text, and hands the frame loop the text it reads one token
per frame in the official streaming text mode (`trailing`). The engine runs a feed's request as
a text session (`engine.Job.feed`); the API's text in pieces and the server's WebSocket make
one."""
from __future__ import annotations

import threading
import unicodedata
from typing import Callable

import numpy as np

from . import prompts
from .text import assistant_text


class TextFeed:
    """Text that arrives in pieces (thread-safe), tokenized as it comes.

    Tokens are committed only up to the last place where the tokenizer's pre-split ends a piece
    whatever follows (`commit_point`: a word can still grow, and BPE merges within it) until the
    text is final; they are the text tokens of the official prompt,
    `encode(assistant_text(text))[3:-5]`, so a text sent in pieces gives the tokens of the whole
    text. Only the new part is tokenized on each piece (it starts a piece of the pre-split), so a
    long text costs linear time, however finely it is split.

    The official streaming text mode lays the text sequence, `prefix` (an ICL clone's reference
    transcript; else nothing) + the text tokens + EOS, against the prompt's last `room`
    positions (one; an ICL clone: its reference frames + 1) and feeds the rest one per frame
    (`trailing`). A session starts once the prompt's share is there or the text is final (a
    short final text then ends inside the prompt: `build` gets it whole)."""

    def __init__(self, tokenizer, build: Callable[[list[int], bool], prompts.Prompt],
                 room: int = 1, prefix: tuple[int, ...] = (), eos_id: int = 0, pad_id: int = 0):
        self.tokenizer = tokenizer
        self.build = build              # (committed text tokens, final) -> the prompt
        self.room, self.prefix = max(1, room), list(prefix)
        self.eos_id, self.pad_id = eos_id, pad_id
        self.final = False
        self.tokens: list[int] = []
        self.chars = 0                  # characters received
        self.scanned = 0                # characters examined for commit points (linear in chars)
        self._parts: list[str] = []     # the text received, in pieces (joined when read)
        self._tail: list[str] = []      # the pieces after the committed text
        self._done = 0                  # characters of the text that `tokens` cover
        self._cut = 0                   # the last commit point found (>= _done)
        self._last = ""                 # the last character received
        self._lock = threading.Lock()

    @property
    def text(self) -> str:
        """The text received so far."""
        with self._lock:
            if len(self._parts) > 1:
                self._parts = ["".join(self._parts)]
            return self._parts[0] if self._parts else ""

    @classmethod
    def of(cls, tokenizer, prompt: prompts.PiecesPrompt) -> "TextFeed":
        """The feed of a `prompts.pieces` prompt."""
        return cls(tokenizer, prompt.build, room=prompt.room, prefix=prompt.prefix,
                   eos_id=prompt.eos_id, pad_id=prompt.pad_id)

    def can_start(self, tokens: list[int], final: bool) -> bool:
        return final or bool(tokens) and len(self.prefix) + len(tokens) >= self.room

    def trailing(self, tokens: list[int], final: bool) -> np.ndarray:
        """The text ids the frames read after the prompt: the sequence past the prompt's share,
        EOS last once final (a pad alone where the final text ended inside the prompt)."""
        seq = self.prefix + list(tokens) + ([self.eos_id] if final else [])
        if final and len(seq) <= self.room:
            return np.asarray([self.pad_id], np.int32)
        return np.asarray(seq[self.room:], np.int32)

    def push(self, piece: str, final: bool = False) -> None:
        """Add a piece. Each character is examined once for a commit point (the scan goes on
        where the last one stopped), and the uncommitted text is joined only when a commit
        point moved: a text without break points costs linear time, however finely split."""
        with self._lock:
            if self.final:
                raise ValueError("the text was already ended")
            if piece:
                self._parts.append(piece)
                self._tail.append(piece)
                cut = _last_break(self._last + piece, self._done - self.chars + len(self._last))
                if cut is not None:
                    self._cut = self.chars - len(self._last) + cut
                self.scanned += len(piece)
                self.chars += len(piece)
                self._last = piece[-1]
            self.final = final
            cut = self.chars if final else self._cut
            if cut <= self._done:
                return
            tail = "".join(self._tail)          # text[_done:]
            new = tail[:cut - self._done]
            if not self.tokens and not new.strip():
                return                          # only spaces so far: wait for words
            if not self.tokens:     # the first words, tokenized as in the prompt's template
                self.tokens = self.tokenizer.encode(assistant_text(new))[3:-5]
            else:                   # the next ones alone: a piece of the pre-split starts there
                self.tokens = self.tokens + self.tokenizer.encode(new)
            self._tail = [tail[cut - self._done:]]
            self._done = cut

    def snapshot(self) -> tuple[list[int], bool]:
        with self._lock:
            return list(self.tokens), self.final


def _is_break(c: str, before: str) -> bool:
    """Whether a commit point is at character `c` (after `before`): see `commit_point`."""
    if c == "\t" or unicodedata.category(c) == "Zs":
        return not before.isspace()
    return (ord(c) > 127 and unicodedata.category(c)[0] in "PS"
            and unicodedata.category(before)[0] in "LN")


def _last_break(text: str, start: int) -> int | None:
    """The last commit point p of `text` with p > start (and p >= 1), or None."""
    for p in range(len(text) - 1, max(start, 0), -1):
        if _is_break(text[p], text[p - 1]):
            return p
    return None


def commit_point(text: str, start: int = 0) -> int:
    """How much of a text that may still grow can be tokenized now: up to the start of its last
    run of spaces or tabs (not newlines: "a.\n" is one pre-token, "\n\n" is one), or its last
    non-ASCII punctuation mark or symbol after a letter or digit ("你好，世界" -> "你好": Chinese
    and Japanese have no spaces between words). Both pre-tokenizer splits (Qwen2's and the
    Mistral one, `text.py`) end a piece there whatever comes next (a letter, digit or
    punctuation run stops at a space or at punctuation; the space starts a new piece), so the
    tokens of text[:cut] are the first tokens of the whole text. ASCII punctuation is left out:
    it may be inside a special token that has not fully arrived ("<|im_end|>"). `start`: a
    commit point already known (the search stops there; returned if there is none after it).
    Whether p is a commit point depends on text[p - 1:p + 1] only, so `TextFeed` examines each
    character once, as it arrives."""
    cut = _last_break(text, start)
    return start if cut is None else cut
