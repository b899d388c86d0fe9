"""Text that arrives in pieces, said in segments or in one pass: the jobs of a text session.
Without segments a session is one job whose `TextFeed` gets the text as it comes. With a
`segments.Stream` the text is cut as it arrives where `segments.split` cuts the whole text, and
each segment is a job of its own, made on first use and run after the one before has ended (a
session holds one row at a time); the text of later segments waits in their feeds. The server's
WebSocket sessions (`server/sessions.py`) and the API's text in pieces (`engine.stream_pieces`)
run one. Thread-safe: the text may be pushed on one thread while another starts the jobs."""
from __future__ import annotations

import threading
from typing import Callable

from . import segments
from .cohort import Job


class TextSession:
    """A session's jobs, one per segment of its text (`cut`; one job without it): `make(j)`
    builds segment j's job (its own `TextFeed`, key or seed, budget), `pause` samples of silence
    go between segments."""

    def __init__(self, make: Callable[[int], Job], cut: segments.Stream | None = None,
                 pause: int = 0, base_tokens: int = 0):
        self.make, self.cut, self.pause = make, cut, pause
        self.base_tokens = base_tokens    # the prompt's tokens besides the text (a limit's)
        self.jobs: list[Job] = []
        self.chars = 0                    # characters received
        self.final = False                # the text has ended
        self._lock = threading.Lock()

    def job(self, j: int) -> Job:
        """Segment j's job, made on first use."""
        with self._lock:
            while len(self.jobs) <= j:
                self.jobs.append(self.make(len(self.jobs)))
            return self.jobs[j]

    @property
    def feed(self):
        return self.job(0).feed

    def push(self, text: str, final: bool = False) -> list[Job]:
        """Hand `text` to the segments it belongs to; returns the jobs whose text grew."""
        with self._lock:
            if self.final:
                raise ValueError("the text was already ended")
            self.chars += len(text)
            events = [(0, text, final)] if self.cut is None else self.cut.push(text, final)
            self.final = final
        grown = []
        for j, piece, ends in events:
            job = self.job(j)
            job.feed.push(piece, ends)
            grown.append(job)
        return grown

    def follows(self, j: int) -> bool:
        """Whether a segment follows segment j, which has ended: one the text was cut into, or
        the open one while the text goes on (not when j is the open one: it ended early)."""
        with self._lock:
            if self.cut is None:
                return False
            count = self.cut.index                       # segments cut off
            return j + 1 < count or (j + 1 == count and not self.final)

    @property
    def frames(self) -> int:
        return sum(job.frames for job in self.jobs)

    @property
    def input_tokens(self) -> int:
        return sum(len(job.feed.tokens) for job in self.jobs)

    @property
    def finish_reason(self) -> str | None:
        """"length" if any segment reached its budget, else the last one's."""
        reasons = [job.finish_reason for job in self.jobs]
        return "length" if "length" in reasons else reasons[-1] if reasons else None

    def cancel(self) -> None:
        for job in list(self.jobs):
            job.cancelled = True
