"""Long text in segments (`segments.py`, the API's `segment_chars` / `segment_pause`): the splitter
keeps every character in order, cuts at sentence ends before clauses, words and anywhere, never
past `max_chars`; the API says each segment as the same call would say it alone (greedy, and
sampled with the same seed), joins them with the pause, streams the same audio, and names bad
arguments."""
import random
import re

import numpy as np
import pytest

from official import GREEDY
from qwen3_tts_jax import Qwen3TTS, segments
from test_audio import speech

LONG = ("The quick brown fox jumps over the lazy dog. Dr. Smith measured 3.14 meters, then left! "
        "Did he come back? Nobody knows, and nobody asked.")
PAUSE = 0.2


def _squash(s: str) -> str:
    return re.sub(r"\s+", "", s)


@pytest.mark.parametrize("text,max_chars,want", [
    ("One. Two three. Four!", 12, ["One.", "Two three.", "Four!"]),
    ("One. Two three. Four!", 100, ["One. Two three. Four!"]),
    ("One. Two. Three.", 9, ["One. Two.", "Three."]),                  # sentences packed
    ("Dr. Smith paid 3.14 dollars. Then he left.", 30,
     ["Dr. Smith paid 3.14 dollars.", "Then he left."]),              # no cut after Dr. or 3.
    ("Mr. J. K. Rowling wrote. Then stopped.", 25, ["Mr. J. K. Rowling wrote.", "Then stopped."]),
    ("He said: \"Go!\" Then he went.", 16, ["He said: \"Go!\"", "Then he went."]),
    ("alpha beta, gamma delta, epsilon zeta.", 26, ["alpha beta, gamma delta,", "epsilon zeta."]),
    ("word " * 6, 10, ["word word", "word word", "word word"]),
    ("The lazy dog ran. Then left! Did he?", 14, ["The lazy dog", "ran.", "Then left!", "Did he?"]),
    ("a" * 25, 10, ["a" * 10, "a" * 10, "a" * 5]),
    ("其实我真的有发现，我是一个特别善于观察别人情绪的人。你相信吗？", 20,
     ["其实我真的有发现，", "我是一个特别善于观察别人情绪的人。", "你相信吗？"]),
    ("line one\nline two\n\nline three", 10, ["line one", "line two", "line three"]),
    ("Hi there. It was a dark\nand stormy night.", 31,         # hard-wrapped: not a break
     ["Hi there.", "It was a dark\nand stormy night."]),
    ("First part\n\nSecond part", 20, ["First part", "Second part"]),   # a paragraph ends
    ("  padded  ", 3, ["padded"[:3], "ded"]),
    ("   ", 5, []),
])
def test_split(text, max_chars, want):
    assert segments.split(text, max_chars) == want


def test_split_keeps_every_character_in_order_within_the_limit():
    rng = random.Random(0)
    alphabet = list("abcde fgh") + [". ", "! ", "? ", ", ", "; ", "\n", "。", "，", "Dr. ", "3.5"]
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 120)))
        limit = rng.randrange(1, 40)
        parts = segments.split(text, limit)
        assert all(0 < len(p) <= limit and p == p.strip() for p in parts), (text, limit, parts)
        assert _squash("".join(parts)) == _squash(text), (text, limit, parts)
        at = 0
        for part in parts:            # each a run of the text as it is, in order
            at = text.index(part, at) + len(part)


def _streamed(text: str, limit: int, sizes) -> list[list[tuple[str, bool]]]:
    """`segments.Stream(limit)` fed `text` in pieces of the given sizes, then ended: what each
    segment was handed, in order."""
    stream, out, at = segments.Stream(limit), [], 0
    for size in sizes:
        if at >= len(text):
            break
        events = stream.push(text[at:at + size])
        at += size
        for j, piece, ends in events:
            assert j == len(out) - 1 or j == len(out), (text, limit, events)
            if j == len(out):
                out.append([])
            assert not (out[j] and out[j][-1][1]), "text after the segment ended"
            out[j].append((piece, ends))
    for j, piece, ends in stream.push(text[at:], final=True):
        if j == len(out):
            out.append([])
        out[j].append((piece, ends))
    return out


def test_stream_cuts_text_in_pieces_where_split_cuts_it_whole():
    rng = random.Random(1)
    alphabet = list("abcde fgh") + [". ", "! ", "? ", ", ", "; ", "\n", "。", "，", "Dr. ", "3.5",
                                    "\n\n", "\"", "...", "」", "a. ", "  "]
    for _ in range(400):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 200)))
        limit = rng.randrange(1, 40)
        got = _streamed(text, limit, iter(lambda: rng.choice([1, 1, 2, 3, 7, 30]), None))
        want = segments.split(text, limit)
        assert ["".join(p for p, _ in seg) for seg in got if seg != [("", True)]] == want, \
            (text, limit, got)
        assert all(seg[-1][1] for seg in got), (text, limit, got)    # each ended, once


def test_stream_hands_out_text_once_it_is_certain():
    """A segment's first sentence goes out word by word; a later sentence is held while it may
    still fit, and starts the next segment once it cannot; text is kept from the open segment's
    sentence on, not from the start."""
    s = segments.Stream(30)
    assert s.push("Hello there") == [(0, "Hello", False)]            # "there" may go on
    assert s.push(" friend. And") == [(0, " there friend.", False)]   # "And ..." may fit
    assert s.push(" then some more words") == [(0, "", True), (1, "And then some more", False)]
    assert s.push(".", final=True) == [(1, " words.", True)]
    s = segments.Stream(30)
    for i in range(300):
        s.push(f"Sentence number {i} is here. ")
    assert len(s.text) < 100
    assert segments.Stream(5).push("  ", final=True) == [(0, "", True)]


def test_expand_seeds_and_join():
    parts, owners = segments.expand(["One. Two.", "Three."], 6)
    assert (parts, owners) == (["One.", "Two.", "Three."], [0, 0, 1])
    assert segments.expand(["a. b."], None) == (["a. b."], [0])
    s = segments.seeds([5, 7], owners, 2)
    assert s[0] == 5 and s[2] == 7 and s[1] not in (5, 7) and 0 <= s[1] < 2 ** 31
    assert s == segments.seeds([5, 7], owners, 2)                 # deterministic
    assert segments.seeds(3, owners, 2) == 3 and segments.seeds(None, owners, 2) is None
    out = segments.join([np.ones(2), np.ones(3) * 2, np.ones(1) * 3], owners, 2, pause=2)
    np.testing.assert_array_equal(out[0], [1, 1, 0, 0, 2, 2, 2])
    np.testing.assert_array_equal(out[1], [3])


@pytest.fixture(scope="module")
def cv(make_checkpoint):
    return Qwen3TTS.from_pretrained(make_checkpoint("cv_proj"))


def _joined(waves, sr, pause=PAUSE):
    gap = np.zeros(round(pause * sr), np.float32)
    out = [waves[0]]
    for w in waves[1:]:
        out += [gap, w]
    return np.concatenate(out)


def _close(a, b):
    assert a.shape == b.shape
    np.testing.assert_allclose(a, b, atol=1e-4 * max(1.0, float(np.abs(b).max())))


def test_custom_voice_in_segments_is_each_segment_said_alone(cv):
    parts = segments.split(LONG, 50)
    assert len(parts) == 3
    kw = dict(speaker="ryan", language="english", max_new_tokens=14)
    (got, short), sr = cv.generate_custom_voice([LONG, "Hi."], segment_chars=50,
                                                segment_pause=PAUSE, **kw, **GREEDY)
    alone, sr2 = cv.generate_custom_voice(parts + ["Hi."], **kw, **GREEDY)
    assert sr == sr2 == 24000
    _close(got, _joined(alone[:3], sr))
    _close(short, alone[3])
    # sampled: an int seed samples segment rows as the same call over the segments would
    kw.update(do_sample=True, subtalker_dosample=True, seed=11)
    (got,), _ = cv.generate_custom_voice(LONG, segment_chars=50, segment_pause=0.0, **kw)
    alone, _ = cv.generate_custom_voice(parts, **kw)
    _close(got, np.concatenate(alone))


def test_a_text_that_fits_is_said_as_without_segments(cv):
    kw = dict(speaker=["ryan", "vivian"], max_new_tokens=[10, 12], do_sample=True, seed=[3, 4])
    got, _ = cv.generate_custom_voice(["Short one.", LONG], segment_chars=40, **kw)
    plain, _ = cv.generate_custom_voice(["Short one.", LONG], **kw)
    _close(got[0], plain[0])                          # its seed and budget, the other split
    assert got[1].shape != plain[1].shape


def test_streamed_segments_are_the_offline_audio(cv):
    kw = dict(speaker="ryan", max_new_tokens=16, do_sample=True, seed=5)
    (offline,), sr = cv.generate_custom_voice(LONG, segment_chars=50, **kw)
    chunks = list(cv.generate_custom_voice_streaming(LONG, segment_chars=50, chunk_frames=4,
                                                     first_chunk_frames=1, **kw))
    _close(np.concatenate(chunks), offline)
    assert sum(1 for c in chunks if len(c) == round(PAUSE * sr) and not c.any()) == 2


def test_cloned_voice_in_segments(make_checkpoint):
    base = Qwen3TTS.from_pretrained(make_checkpoint("base"))
    voice = base.create_voice_clone_prompt((speech(24000), 24000), "Hello there, this is me.")
    parts = segments.split(LONG, 60)
    kw = dict(language="english", max_new_tokens=12, **GREEDY)
    (got,), sr = base.generate_voice_clone(LONG, voice_clone_prompt=voice, segment_chars=60, **kw)
    alone, _ = base.generate_voice_clone(parts, voice_clone_prompt=voice, **kw)
    _close(got, _joined(alone, sr))
    chunks = base.generate_voice_clone_streaming(LONG, voice_clone_prompt=voice, segment_chars=60,
                                                 **kw)
    _close(np.concatenate(list(chunks)), got)
    # text in pieces: each segment in the streaming text mode with the ICL reference
    (want,), _ = base.generate_voice_clone(LONG, voice_clone_prompt=voice, segment_chars=60,
                                           non_streaming_mode=False, **kw)
    pieces = (LONG[i:i + 5] for i in range(0, len(LONG), 5))
    chunks = base.generate_voice_clone_streaming(pieces, voice_clone_prompt=voice,
                                                 segment_chars=60, **kw)
    _close(np.concatenate(list(chunks)), want)


@pytest.mark.parametrize("kw,needle", [
    (dict(segment_chars=0), "segment_chars must be an integer >= 1"),
    (dict(segment_chars="200"), "segment_chars must be an integer"),
    (dict(segment_chars=True), "segment_chars must be an integer"),
    (dict(segment_chars=50, segment_pause=-1), "segment_pause must be a number of seconds"),
    (dict(segment_chars=50, segment_pause=float("nan")), "segment_pause"),
    (dict(segment_pause="long"), "segment_pause"),
    (dict(text=["Fine.", " "], segment_chars=50), "text[1] is empty"),
    (dict(text=["a. b.", "c."], speaker=["ryan"] * 3, segment_chars=2), "batch size mismatch"),
])
def test_bad_segment_arguments_are_named(cv, kw, needle):
    kw = dict(dict(text=LONG, speaker="ryan", max_new_tokens=4), **kw)
    with pytest.raises(ValueError, match=re.escape(needle)):
        cv.generate_custom_voice(**kw)


def test_text_in_pieces_is_said_in_the_segments_of_the_whole_text(cv):
    """An iterator of pieces with segment_chars is cut as it arrives where `split` cuts the whole
    text: each segment read in the streaming text mode with the key its row has in the offline
    call (an int seed, a list), the pause between them."""
    kw = dict(speaker="ryan", max_new_tokens=16, do_sample=True, subtalker_dosample=True)
    for seed in (5, [6]):
        (want,), sr = cv.generate_custom_voice(LONG, segment_chars=50, non_streaming_mode=False,
                                               seed=seed, **kw)
        pieces = (LONG[i:i + 7] for i in range(0, len(LONG), 7))
        chunks = list(cv.generate_custom_voice_streaming(pieces, segment_chars=50, seed=seed,
                                                         chunk_frames=4, **kw))
        _close(np.concatenate(chunks), want)
        assert sum(1 for c in chunks if len(c) == round(PAUSE * sr) and not c.any()) == 2
    for text in (LONG, iter(["Hello ", "there."])):
        with pytest.raises(ValueError, match="segment_chars must be"):
            cv.generate_custom_voice_streaming(text, speaker="ryan", segment_chars=-3)


def test_a_call_runs_in_groups_of_max_batch_rows(cv):
    """More texts than `max_batch_rows` run as batches of that many in turn: every row keeps its
    key (an int seed's fold_in by the row's place in the whole call) and its own budget, so the
    codes are the one-batch codes; the cut rows are told by their place in the call."""
    import warnings

    from qwen3_tts_jax import BudgetReached

    texts = ["One.", "Two words.", "Three words here.", "Four.", "Five, and the last."]
    kw = dict(speaker="ryan", do_sample=True, subtalker_dosample=True, seed=3,
              max_new_tokens=[6, 7, 8, 9, 10])
    runs = {}
    for rows in (64, 2):
        cv.max_batch_rows = rows
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", BudgetReached)
            codes = cv.generate_custom_voice_codes(texts, **kw)
        told = [w.message for w in caught if isinstance(w.message, BudgetReached)]
        runs[rows] = codes, [(m.rows, m.frames) for m in told]
    cv.max_batch_rows = 64
    for a, b in zip(runs[64][0], runs[2][0]):
        np.testing.assert_array_equal(a, b)
    assert runs[64][1] == runs[2][1] and len(runs[2][1]) == 1     # one warning, every cut row
