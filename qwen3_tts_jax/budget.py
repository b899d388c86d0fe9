"""The frame budget: how many frames (`max_new_tokens`) an utterance may take, and what is told
when one runs out of them.

Qwen3-TTS ends an utterance by sampling its end token (EOS). Now and then it never does, on any
text (a runaway: the end token's probability collapses and the model speaks noise or silence
until the budget; the official code does it too, about 1 in 200 utterances on the Base
checkpoints by its users' reports), and the official budget is the checkpoint's
`max_new_tokens`, 8192 frames: 11 minutes. So:
- an utterance that ends at its budget without EOS is told apart from one that ended on EOS
  (`generate.budget_reached`): the API warns `BudgetReached`, the server says `finish_reason`
  "length" (and "stop" for EOS), the batch tool lists the file;
- the command line, the batch tool and the server give a text without a budget of its own
  `text_budget` frames (at most the checkpoint's), which bounds a runaway at seconds past the
  text. The API keeps the official budget unless given `max_new_tokens="auto"` (this, per text).

No JAX here: the command line imports it for its flags.
"""
from __future__ import annotations

import math
import warnings
from typing import Sequence

# `text_budget`'s: speech runs about 4 frames (12.5 Hz) per text token in English and Chinese
# alike; 15 leaves room for slow speech, pauses and spelled-out digits, and the floor (6 s) for
# the shortest texts.
FRAMES_PER_TOKEN = 15.0
BUDGET_FLOOR = 75


def text_budget(text_tokens: int, frames_per_token: float = FRAMES_PER_TOKEN,
                floor: int = BUDGET_FLOOR) -> int:
    """max_new_tokens for a text of `text_tokens` tokens: `floor` frames plus `frames_per_token`
    per token, plus one (the last token sampled is never a frame)."""
    return floor + math.ceil(frames_per_token * text_tokens) + 1


class BudgetReached(UserWarning):
    """Warned when an utterance ends at its `max_new_tokens` budget without the model's end
    token (EOS): its audio is cut there. Qwen3-TTS does this now and then on any text (a
    runaway: the end token's probability collapses and it speaks noise or silence until the
    budget), and a budget too small for the text cuts it too. `rows`: the utterances' indices
    in the call; `frames`: the frames each got. As a warning it can be silenced, recorded
    (`warnings.catch_warnings(record=True)`) or made an error
    (`warnings.simplefilter("error", BudgetReached)`)."""

    def __init__(self, message: str, rows: Sequence[int] = (), frames: Sequence[int] = ()):
        super().__init__(message)
        self.rows, self.frames = list(rows), list(frames)


def warn_budget_reached(rows: Sequence[int], frames: Sequence[int], n: int, budget,
                        stacklevel: int = 3) -> None:
    """Warn `BudgetReached` for these rows (of `n` in the call) if there are any. `budget`: the
    call's max_new_tokens, or the cut rows' own (a list)."""
    if not len(rows):
        return
    which = (f"utterance {rows[0]}" if n == 1 or len(rows) == 1 else
             f"utterances {', '.join(map(str, rows))}")
    if isinstance(budget, (list, tuple)):      # the cut rows' own budgets
        budget = budget[0] if len(set(budget)) == 1 else "(" + ", ".join(map(str, budget)) + ")"
    warnings.warn(BudgetReached(
        f"{which} of {n} reached max_new_tokens={budget} without the end token (EOS): the "
        f"audio is cut at {max(frames)} frames ({max(frames) / 12.5:.2f} s). The model "
        "sometimes never ends (a runaway); if the text needs longer, raise max_new_tokens",
        rows, frames), stacklevel=stacklevel)
