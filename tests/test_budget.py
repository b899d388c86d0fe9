"""An utterance that ends at its `max_new_tokens` budget without the end token (EOS) is told
apart from one that ended on EOS, everywhere: the API warns `BudgetReached` (rows, frames), the
server says `finish_reason` ("length" or "stop") in the SSE `speech.audio.done` event, the
WebSocket `done` message and the whole-file formats' `X-Finish-Reason` header, and counts it in
/health `stats.budget_reached`; the batch tool lists the files in its summary's "cut", and the
CLI prints one warning line.

The checkpoint "cv_eos" ends greedy rows on EOS after a few frames (n of them): max_new_tokens
n + 1 lets EOS be the last token sampled ("stop", n frames), max_new_tokens n cuts the row one
frame short ("length", n - 1 frames). The boundary is exact: the same frames, told apart only
by the last token."""
import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import soundfile as sf

from qwen3_tts_jax import BudgetReached, Qwen3TTS, batch
from qwen3_tts_jax.budget import BUDGET_FLOOR, text_budget

GREEDY = dict(do_sample=False, subtalker_dosample=False)
TEXTS = ["Hello world. This is a tiny test.", "Hi.", "The lazy dog."]
SPEAKERS = ["ryan", "vivian", "dylan"]
EXE = os.path.join(os.path.dirname(sys.executable), "qwen3-tts-jax")


@pytest.fixture(scope="module")
def tts(make_checkpoint):
    return Qwen3TTS.from_pretrained(make_checkpoint("cv_eos"))


@pytest.fixture(scope="module")
def natural(tts):
    """Each text's frames when EOS ends it (greedy, a budget far above them)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", BudgetReached)
        codes = tts.generate_custom_voice_codes(TEXTS, speaker=SPEAKERS, max_new_tokens=40,
                                                **GREEDY)
    n = [len(c) for c in codes]
    assert all(2 <= k < 39 for k in n), n
    return n


def _caught(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn()
    return out, [w.message for w in caught if isinstance(w.message, BudgetReached)]


def test_api_warns_the_rows_cut_at_their_budget(tts, natural):
    for b, n in enumerate(natural):
        codes, told = _caught(lambda: tts.generate_custom_voice_codes(
            TEXTS[b], speaker=SPEAKERS[b], max_new_tokens=n + 1, **GREEDY))
        assert len(codes[0]) == n and told == []          # EOS was the last token: "stop"
        codes, told = _caught(lambda: tts.generate_custom_voice_codes(
            TEXTS[b], speaker=SPEAKERS[b], max_new_tokens=n, **GREEDY))
        assert len(codes[0]) == n - 1
        assert [(w.rows, w.frames) for w in told] == [([0], [n - 1])]
        assert "max_new_tokens" in str(told[0]) and "EOS" in str(told[0])
    # one batch, one budget: only the rows that needed more are named
    m = min(natural) + 1
    codes, told = _caught(lambda: tts.generate_custom_voice_codes(
        TEXTS, speaker=SPEAKERS, max_new_tokens=m, **GREEDY))
    cut = [b for b, n in enumerate(natural) if n >= m]
    assert [len(c) for c in codes] == [min(n, m - 1) for n in natural]
    if cut:
        assert [(w.rows, w.frames) for w in told] == [(cut, [m - 1] * len(cut))]
    else:
        assert told == []


def test_api_streaming_warns_at_its_end(tts, natural):
    n = natural[1]
    for m, want in ((n + 1, []), (n, [([0], [n - 1])])):
        chunks, told = _caught(lambda: list(tts.generate_custom_voice_streaming(
            TEXTS[1], speaker=SPEAKERS[1], max_new_tokens=m, first_chunk_frames=1, **GREEDY)))
        assert sum(len(c) for c in chunks) == min(n, m - 1) * 1920
        assert [(w.rows, w.frames) for w in told] == want
    # text arriving in pieces (the engine's one-row session)
    chunks, told = _caught(lambda: list(tts.generate_custom_voice_streaming(
        iter(["Hi", "."]), speaker=SPEAKERS[1], max_new_tokens=2, **GREEDY)))
    assert [(w.rows, w.frames) for w in told] == [([0], [1])]


def test_warning_can_be_an_error(tts):
    with warnings.catch_warnings():
        warnings.simplefilter("error", BudgetReached)
        with pytest.raises(BudgetReached, match="max_new_tokens=2"):
            tts.generate_custom_voice_codes(TEXTS[0], speaker="ryan", max_new_tokens=2, **GREEDY)


def test_server_says_how_each_request_ended(tts, natural):
    pytest.importorskip("fastapi")
    from test_server import Running, get, post, ws_session

    from qwen3_tts_jax.server.app import ServerOptions, create_app

    server = Running(create_app(tts, ServerOptions(model_name="tiny", max_new_tokens=40,
                                                   defaults=dict(GREEDY), batch_window_ms=5)))
    try:
        url = server.url + "/v1/audio/speech"
        body = {"model": "tiny", "input": TEXTS[0], "voice": SPEAKERS[0]}
        n = natural[0]
        for m, reason in ((n + 1, "stop"), (n, "length")):
            status, _, data = post(url, dict(body, response_format="pcm", stream_format="sse",
                                             max_new_tokens=m))
            assert status == 200
            done = json.loads(data.decode().strip().splitlines()[-1][6:])
            assert done["type"] == "speech.audio.done", done
            assert (done["finish_reason"], done["usage"]["output_tokens"]) == (reason,
                                                                               min(n, m - 1))
            status, headers, _ = post(url, dict(body, response_format="flac", max_new_tokens=m))
            assert status == 200 and headers["X-Finish-Reason"] == reason
        assert get(server.url + "/health")["stats"]["budget_reached"] == 2
        pytest.importorskip("websockets")
        for m, reason in ((40, "stop"), (2, "length")):
            _, last = ws_session(server, {"voice": "vivian", "max_new_tokens": m},
                                 [("text", "Hi"), ("end", ".")])
            assert last["type"] == "done" and last["finish_reason"] == reason, last
        assert get(server.url + "/health")["stats"]["budget_reached"] == 3
    finally:
        server.stop()


@pytest.mark.parametrize("continuous", [True, False])
def test_batch_lists_the_files_cut(tts, natural, tmp_path, continuous):
    m = min(natural) + 1
    reqs = [batch.Request(line=i + 1, text=t, name=f"r{i}", speaker=s)
            for i, (t, s) in enumerate(zip(TEXTS, SPEAKERS))]
    summary = batch.run(tts, reqs, str(tmp_path), batch_size=4, progress=False,
                        gen={"max_new_tokens": m, **GREEDY}, continuous=continuous)
    assert summary["done"] == 3 and not summary["failed"], summary
    cut = [f"line {i + 1} (r{i}): {tmp_path / f'r{i}.wav'} is {(m - 1) * 0.08:.2f} s"
           for i, n in enumerate(natural) if n >= m]
    assert summary["cut"] == cut


def test_cli_prints_one_warning_line(make_checkpoint, tmp_path):
    r = subprocess.run([EXE, "custom-voice", "--model", make_checkpoint("cv_noeos"), "--speaker",
                        "ryan", "--text", "Hi.", "--greedy", "--max-new-tokens", "5",
                        "--output", str(tmp_path / "a.wav"), "--no-compile-cache", "-q"],
                       env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    lines = [x for x in r.stderr.splitlines() if "max_new_tokens=5" in x]
    assert lines == ["qwen3-tts-jax: warning: utterance 0 of 1 reached max_new_tokens=5 without "
                     "the end token (EOS): the audio is cut at 4 frames (0.32 s). The model "
                     "sometimes never ends (a runaway); if the text needs longer, raise "
                     "max_new_tokens"], r.stderr
    assert np.isfinite(os.path.getsize(tmp_path / "a.wav"))


# ------------------------------------------------------------------ the text's budget
def test_text_budget():
    assert text_budget(0) == BUDGET_FLOOR + 1
    assert text_budget(10) == BUDGET_FLOOR + 150 + 1
    assert text_budget(3, frames_per_token=2.5) == BUDGET_FLOOR + 8 + 1


@pytest.fixture(scope="module")
def endless(make_checkpoint):
    """A checkpoint whose EOS is never chosen: every utterance runs to its budget."""
    return Qwen3TTS.from_pretrained(make_checkpoint("cv_noeos"))


def test_server_bounds_a_request_by_its_text(endless):
    """Without max_new_tokens of its own a request gets `text_budget` of its text (at most the
    cap); with one, that one. A text session gets the cap until its text ends, then its text's
    budget."""
    pytest.importorskip("fastapi")
    from test_server import Running, get, post, ws_session

    from qwen3_tts_jax.server.app import ServerOptions, create_app

    server = Running(create_app(endless, ServerOptions(
        model_name="tiny", max_new_tokens=150, frames_per_token=2.0, defaults=dict(GREEDY),
        batch_window_ms=5)))
    try:
        assert get(server.url + "/health")["frames_per_token"] == 2.0
        url = server.url + "/v1/audio/speech"
        for text in ("Hi.", "The lazy dog sleeps in the sun all day long."):
            k = len(endless.tokenizer.encode(text))
            want = min(150, text_budget(k, 2.0)) - 1
            body = {"model": "tiny", "input": text, "voice": "ryan", "response_format": "pcm",
                    "stream_format": "sse"}
            for extra, frames in (({}, want), ({"max_new_tokens": 20}, 19)):
                status, _, data = post(url, dict(body, **extra))
                assert status == 200, data
                done = json.loads(data.decode().strip().splitlines()[-1][6:])
                assert (done["finish_reason"], done["usage"]["output_tokens"]) == ("length",
                                                                                   frames), text
        pytest.importorskip("websockets")
        text = "Hello there, friend."
        k = len(endless.tokenizer.encode(text))
        _, last = ws_session(server, {"voice": "vivian"}, [("text", "Hello there, "),
                                                           ("end", "friend.")])
        assert (last["finish_reason"], last["frames"]) == ("length", text_budget(k, 2.0) - 1)
        _, last = ws_session(server, {"voice": "vivian", "max_new_tokens": 30},
                             [("end", text)])
        assert (last["finish_reason"], last["frames"]) == ("length", 29)
    finally:
        server.stop()


@pytest.mark.parametrize("continuous", [True, False])
def test_batch_bounds_each_request_by_its_text(endless, tmp_path, continuous):
    texts = ["Hi.", "The lazy dog sleeps in the sun all day long."]
    reqs = [batch.Request(line=i + 1, text=t, name=f"r{i}", speaker="ryan")
            for i, t in enumerate(texts)]
    summary = batch.run(endless, reqs, str(tmp_path), batch_size=2, progress=False,
                        gen=dict(GREEDY), continuous=continuous, frames_per_token=2.0)
    assert summary["done"] == 2 and len(summary["cut"]) == 2, summary
    budgets = [text_budget(len(endless.tokenizer.encode(t)), 2.0) for t in texts]
    for r, m in zip(reqs, budgets):         # each its own, also in one padded batch
        info = sf.info(str(tmp_path / f"{r.name}.wav"))
        assert info.frames == (m - 1) * 1920, (r.name, info.frames / 1920, m)


def test_cli_bounds_the_text_and_checks_the_flag(make_checkpoint, tmp_path, endless):
    text = "Hi there."
    r = subprocess.run([EXE, "custom-voice", "--model", make_checkpoint("cv_noeos"), "--speaker",
                        "ryan", "--text", text, "--greedy", "--frames-per-token", "3",
                        "--output", str(tmp_path / "a.wav"), "--no-compile-cache", "-q"],
                       env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    want = text_budget(len(endless.tokenizer.encode(text)), 3.0) - 1
    assert sf.info(str(tmp_path / "a.wav")).frames == want * 1920
    assert f"cut at {want} frames" in r.stderr
    for bad in ("-1", "inf", "x"):
        r = subprocess.run([EXE, "custom-voice", "--random-weights", "--speaker", "ryan",
                            "--text", "Hi.", "--frames-per-token", bad, "--output",
                            str(tmp_path / "b.wav")], capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and "--frames-per-token: takes a number >= 0" in r.stderr, (
            bad, r.stderr)


def test_smaller_budgets_run_the_warmed_shapes(endless):
    """The server's cohorts start with the KV cache of its cap (`BatchEngine.min_frames`): a
    request whose budget is smaller (its text's, or its own) traces nothing after the warm-up."""
    pytest.importorskip("fastapi")
    import jax

    from test_server import Running, post

    from qwen3_tts_jax.server.app import ServerOptions, create_app

    traced = []
    listener = lambda event, duration, **kw: traced.append(kw) \
        if event == "/jax/core/compile/jaxpr_trace_duration" else None   # noqa: E731
    jax.monitoring.register_event_duration_secs_listener(listener)
    server = Running(create_app(endless, ServerOptions(
        model_name="tiny", max_new_tokens=100, frames_per_token=2.0, defaults=dict(GREEDY),
        batch_buckets=(1,), max_batch_size=1, warmup=(1,))))
    try:
        url = server.url + "/v1/audio/speech"
        for extra, frames in (({}, text_budget(len(endless.tokenizer.encode("a")), 2.0) - 1),
                              ({"max_new_tokens": 20}, 19)):
            traced.clear()
            status, _, data = post(url, {"model": "tiny", "input": "a", "voice": "ryan",
                                         "response_format": "pcm", **extra})
            assert status == 200 and len(data) == frames * 1920 * 2, (status, len(data))
            assert traced == [], extra
    finally:
        server.stop()
        jax.monitoring.unregister_event_duration_listener(listener)


def test_api_budgets_per_utterance(tts, natural):
    """max_new_tokens as a list: each utterance its own budget in one batch. A row's codes are
    those it gets alone, and only the rows cut at their own budget are told, with theirs."""
    budgets = [natural[0] + 1, natural[1], natural[2] + 5]     # row 1 one frame short
    codes, told = _caught(lambda: tts.generate_custom_voice_codes(
        TEXTS, speaker=SPEAKERS, max_new_tokens=budgets, **GREEDY))
    assert [len(c) for c in codes] == [natural[0], natural[1] - 1, natural[2]]
    assert [(w.rows, w.frames) for w in told] == [([1], [natural[1] - 1])]
    assert f"max_new_tokens={natural[1]} " in str(told[0])
    alone = tts.generate_custom_voice_codes(TEXTS[1], speaker=SPEAKERS[1],
                                            max_new_tokens=natural[1], **GREEDY)
    assert np.array_equal(codes[1], alone[0])
    # two rows cut at different budgets: both named, with their budgets
    _, told = _caught(lambda: tts.generate_custom_voice_codes(
        TEXTS, speaker=SPEAKERS, max_new_tokens=[natural[0], natural[1], 40], **GREEDY))
    assert told[0].rows == [0, 1] and f"max_new_tokens=({natural[0]}, {natural[1]})" in str(
        told[0])
    # streaming: a list of one value is that utterance's budget
    chunks = list(tts.generate_custom_voice_streaming(
        TEXTS[0], speaker=SPEAKERS[0], max_new_tokens=[natural[0] + 1], first_chunk_frames=1,
        **GREEDY))
    assert sum(len(c) for c in chunks) == natural[0] * 1920


def test_api_budget_lists_and_auto_are_checked(tts):
    from qwen3_tts_jax.settings import SettingError

    for bad, what in (([], "empty list"), ([40, 1], "got 1"), ([40, "x"], "got 'x'"),
                      ("many", "or 'auto', got 'many'"), ([40, True], "got True")):
        with pytest.raises(SettingError, match=what) as e:
            tts.generate_custom_voice_codes(TEXTS[:2], speaker="ryan", max_new_tokens=bad)
        assert e.value.param == "max_new_tokens"
    with pytest.raises(ValueError, match="2 text.* 3 max_new_tokens"):
        tts.generate_custom_voice_codes(TEXTS[:2], speaker="ryan", max_new_tokens=[40, 40, 40])
    items = tts.custom_voice_prompts(TEXTS[0], "ryan")
    with pytest.raises(ValueError, match="'auto' needs the texts"):
        tts.generate_prompts_codes(items, max_new_tokens="auto")


def test_api_auto_bounds_each_text(endless):
    """max_new_tokens="auto": a runaway (this checkpoint never ends) stops at its own text's
    budget, in a batch, streamed, and with its text in pieces (once the text has ended)."""
    texts = ["Hi.", "The lazy dog sleeps in the sun all day long."]
    want = [text_budget(len(endless.tokenizer.encode(t))) - 1 for t in texts]
    assert want[0] < want[1] < endless.generate_defaults.max_new_tokens - 1
    codes, told = _caught(lambda: endless.generate_custom_voice_codes(
        texts, speaker="ryan", max_new_tokens="auto", **GREEDY))
    assert [len(c) for c in codes] == want
    assert [(w.rows, w.frames) for w in told] == [([0, 1], want)]
    chunks, told = _caught(lambda: list(endless.generate_custom_voice_streaming(
        texts[0], speaker="ryan", max_new_tokens="auto", **GREEDY)))
    assert sum(len(c) for c in chunks) == want[0] * 1920 and told[0].frames == [want[0]]
    chunks, told = _caught(lambda: list(endless.generate_custom_voice_streaming(
        iter(["Hi", "."]), speaker="ryan", max_new_tokens="auto", **GREEDY)))
    assert sum(len(c) for c in chunks) == want[0] * 1920 and told[0].frames == [want[0]]


def test_server_refuses_budget_lists(endless):
    pytest.importorskip("fastapi")
    from test_server import Running, post

    from qwen3_tts_jax.server.app import ServerOptions, create_app

    server = Running(create_app(endless, ServerOptions(model_name="tiny", max_new_tokens=50)))
    try:
        for bad in ([20, 20], "auto"):
            status, _, data = post(server.url + "/v1/audio/speech", {
                "model": "tiny", "input": "Hi.", "voice": "ryan", "response_format": "pcm",
                "max_new_tokens": bad})
            err = json.loads(data)["error"]
            assert status == 400 and err["param"] == "max_new_tokens", data
            assert "must be an integer" in err["message"]
    finally:
        server.stop()
