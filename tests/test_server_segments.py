"""A long input said in segments by the server (`segment_chars` in the request or --segment-chars):
its segments run as rows at once and play in order with the pause between them; the audio is the
API's `generate_custom_voice(..., segment_chars=...)` for the same seed, streamed or whole, in the
batch route too; usage counts every segment; bad values are a 400 naming the field; a request
whose segments do not all fit the queue is refused whole (429) with nothing queued. A text
session's text, arriving in pieces, is said in the segments of the whole text."""
import base64
import json
import time
import urllib.request

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from qwen3_tts_jax import Qwen3TTS, segments  # noqa: E402
from test_server import GEN, metric, post, scrape, serving, tiny_server, ws_session  # noqa: E402
from test_server_faults import slow_chunks, start_request, wait_for  # noqa: E402

GREEDY = {"do_sample": False, "subtalker_dosample": False}
TEXT = "One sentence here. Another one there. And a third."
PAUSE = 0.1


@pytest.fixture(scope="module")
def tts(make_checkpoint):
    return Qwen3TTS.from_pretrained(make_checkpoint("cv_proj"))


@pytest.fixture(scope="module")
def server(tts):
    yield from serving(tts, segment_chars=20, segment_pause=PAUSE)


def body(**kw):
    return {"model": "tiny", "input": TEXT, "voice": "ryan", "response_format": "pcm",
            **GEN, **kw}


def pcm(data: bytes) -> np.ndarray:
    return np.frombuffer(data, "<i2").astype(np.float32) / 32767


def api(tts, **kw):
    (wave,), _ = tts.generate_custom_voice(TEXT, "ryan", segment_chars=20, segment_pause=PAUSE,
                                           **GEN, **kw)
    return wave


def test_segments_stream_in_order_as_the_api_says_them(server, tts):
    assert len(segments.split(TEXT, 20)) == 3
    health = json.loads(urllib.request.urlopen(server.url + "/health", timeout=30).read())
    assert (health["segment_chars"], health["segment_pause"]) == (20, PAUSE)
    engine = server.server_state.engine
    before = engine.stats["requests"]
    status, headers, data = post(server.url + "/v1/audio/speech", body(**GREEDY))
    assert status == 200
    assert engine.stats["requests"] == before + 3            # one row per segment
    want = api(tts, **GREEDY)
    got = pcm(data)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, np.clip(want, -1, 1), atol=3 / 32767)
    # sampled: the request's seed is the API's seed for that text
    status, _, data = post(server.url + "/v1/audio/speech", body(seed=9, do_sample=True))
    assert status == 200
    np.testing.assert_allclose(pcm(data), np.clip(api(tts, seed=[9], do_sample=True), -1, 1),
                               atol=3 / 32767)


def test_whole_file_sse_and_batch_count_every_segment(server, tts):
    status, headers, flac = post(server.url + "/v1/audio/speech",
                                 body(response_format="flac", **GREEDY))
    assert status == 200 and headers["X-Finish-Reason"] == "length"   # 15 frames each
    status, _, data = post(server.url + "/v1/audio/speech", body(stream_format="sse", **GREEDY))
    events = [json.loads(line[6:]) for line in data.decode().split("\n\n") if line]
    audio = b"".join(base64.b64decode(e["audio"]) for e in events[:-1])
    want = api(tts, **GREEDY)
    np.testing.assert_allclose(pcm(audio), np.clip(want, -1, 1), atol=3 / 32767)
    done = events[-1]
    prompts = tts.custom_voice_prompts(segments.split(TEXT, 20), "ryan")
    assert done["type"] == "speech.audio.done" and done["finish_reason"] == "length"
    assert done["usage"] == {"input_tokens": sum(len(p) for p in prompts), "output_tokens": 45,
                             "total_tokens": sum(len(p) for p in prompts) + 45}
    status, _, data = post(server.url + "/v1/audio/speech/batch",
                           {"model": "tiny", "items": [body(**GREEDY), body(segment_chars=0,
                                                                            **GREEDY)]})
    items = json.loads(data)["data"]
    assert status == 200 and items[0]["usage"]["output_tokens"] == 45
    np.testing.assert_allclose(pcm(base64.b64decode(items[0]["audio"])), np.clip(want, -1, 1),
                               atol=3 / 32767)
    assert items[1]["usage"]["output_tokens"] == 15           # 0: the input in one pass


@pytest.mark.parametrize("field, value", [
    ("segment_chars", -1), ("segment_chars", "20"), ("segment_chars", True),
    ("segment_chars", 2.5), ("segment_pause", -1), ("segment_pause", "long"),
    ("segment_pause", 11)])
def test_bad_segment_fields_are_named(server, field, value):
    status, _, data = post(server.url + "/v1/audio/speech", body(**{field: value}))
    assert status == 400 and json.loads(data)["error"]["param"] == field


def test_more_segments_than_the_queue_takes_is_413_before_any_is_built(server, monkeypatch):
    from qwen3_tts_jax import prompts

    built = []
    real = prompts.for_mode
    monkeypatch.setattr(prompts, "for_mode", lambda *a, **k: built.append(1) or real(*a, **k))
    status, _, data = post(server.url + "/v1/audio/speech",
                           body(input="word " * 100, segment_chars=5))
    error = json.loads(data)["error"]
    assert status == 413 and error["param"] == "segment_chars" and "100 segments" in \
        error["message"], error
    assert not built


def test_segments_that_do_not_fit_the_queue_are_refused_whole(tts):
    """Two requests already wait (planted) in a queue of 4: a request of 3 segments is a 429 and
    queues none of them; once the queue is empty it runs."""
    s = tiny_server(tts, max_queue=4, segment_chars=20)
    try:
        engine = s.server_state.engine
        engine._waiting = 2
        status, headers, data = post(s.url + "/v1/audio/speech", body(**GREEDY))
        assert status == 429 and headers["Retry-After"] == "1", data
        assert engine.stats["requests"] == 0 and engine.waiting == 2
        engine._waiting = 0
        status, _, _ = post(s.url + "/v1/audio/speech", body(**GREEDY))
        assert status == 200 and engine.stats["requests"] == 3
    finally:
        s.stop()


def test_metrics_count_a_segmented_request_once(server):
    """One first audio and one duration per request, not per segment; every segment's audio."""
    before = scrape(server.url)
    status, _, data = post(server.url + "/v1/audio/speech", body(**GREEDY))
    assert status == 200
    after = scrape(server.url)
    d = lambda name, **labels: metric(after, name, **labels) - metric(before, name, **labels)
    assert d("qwen3_tts_time_to_first_audio_seconds_count", route="speech") == 1
    assert d("qwen3_tts_request_duration_seconds_count", route="speech") == 1
    assert d("qwen3_tts_audio_seconds_total") == pytest.approx(45 * 1920 / 24000)


def test_a_client_that_leaves_cancels_every_segment(server, monkeypatch):
    running = slow_chunks(monkeypatch)
    engine = server.server_state.engine
    before = engine.stats["cancelled"]
    sock = start_request(server.port, body(**GREEDY))
    assert running.wait(120), "the request did not start"
    sock.close()
    wait_for(lambda: engine.stats["cancelled"] >= before + 3 and engine.active == 0, 30,
             "every segment cancelled")
    monkeypatch.undo()
    status, _, _ = post(server.url + "/v1/audio/speech", body(**GREEDY))
    assert status == 200


def test_a_text_session_is_said_in_the_segments_of_its_whole_text(server, tts):
    """Text sent in pieces over the WebSocket (cut mid-word and mid-sentence) is cut where
    `segments.split` cuts the whole text: the audio is the API's for the whole text in segments
    (streaming text mode, same seed), pauses included; `done` counts every segment's text
    tokens and frames; the first message's `segment_chars: 0` says it in one pass."""
    pytest.importorskip("websockets")
    from qwen3_tts_jax import prompts

    pieces = [("text", TEXT[:7]), ("text", TEXT[7:23]), ("text", TEXT[23:40]),
              ("end", TEXT[40:])]
    first = {"voice": "ryan", "seed": 9, "do_sample": True, **GEN}
    audio, done = ws_session(server, first, pieces)
    parts = segments.split(TEXT, 20)
    assert done == {"type": "done", "frames": 45, "segments": 3, "finish_reason": "length",
                    "input_tokens": sum(len(prompts.input_ids(tts.tokenizer, p)) - 8
                                        for p in parts)}, done
    want = api(tts, seed=[9], do_sample=True, non_streaming_mode=False)
    assert pcm(audio).shape == want.shape
    np.testing.assert_allclose(pcm(audio), np.clip(want, -1, 1), atol=3 / 32767)
    audio, done = ws_session(server, {**first, "segment_chars": 0}, pieces, pause=0)
    assert (done["segments"], done["frames"]) == (1, 15), done


def _session(server, first: dict, text: str):
    from websockets.sync.client import connect

    ws = connect(server.url.replace("http", "ws") + "/v1/audio/speech/stream")
    ws.send(json.dumps(first))
    ws.send(json.dumps({"type": "end", "text": text}))
    return ws


def test_a_failing_segment_ends_the_session_with_its_error(server, monkeypatch):
    """A failure planted in a text session's second segment: the client has the first
    segment's audio and the pause, then an error message (500) naming it; the third segment
    never starts, no row is left running, and the next session is served."""
    pytest.importorskip("websockets")
    from qwen3_tts_jax import engine as engine_mod

    real = engine_mod.Cohort.step

    def step(self):
        if any(job is not None and job.feed is not None and "Another" in job.feed.text
               for job in self.rows):
            raise RuntimeError("planted failure")
        return real(self)

    monkeypatch.setattr(engine_mod.Cohort, "step", step)
    engine = server.server_state.engine
    before = engine.stats["requests"]
    audio, msg = b"", None
    with _session(server, {"voice": "ryan", "seed": 1, **GEN, **GREEDY}, TEXT) as ws:
        while msg is None:
            data = ws.recv(timeout=120)
            audio, msg = (audio + data, None) if isinstance(data, bytes) else (audio,
                                                                               json.loads(data))
    assert msg["type"] == "error" and msg["status"] == 500 and "planted failure" in \
        msg["message"], msg
    assert len(audio) == 2 * (15 * 1920 + round(PAUSE * 24000))      # segment 0 and the pause
    wait_for(lambda: engine.active == 0 and server.server_state.sessions_open == 0, 60,
             "the session's end")
    assert engine.stats["requests"] == before + 2                   # the third never started
    monkeypatch.undo()
    audio, done = ws_session(server, {"voice": "ryan", **GEN, **GREEDY}, [("end", TEXT)])
    assert done["type"] == "done" and done["segments"] == 3, done


@pytest.mark.parametrize("segment_chars", [20, 0])
def test_a_client_that_leaves_after_the_end_stops_the_session(server, monkeypatch,
                                                               segment_chars):
    """A client that sent all its text and goes away during the first segment (each chunk made
    slow): the server, still listening, cancels that segment's row, and the later ones (in
    segments) never start."""
    pytest.importorskip("websockets")
    slow_chunks(monkeypatch, 0.5)
    engine = server.server_state.engine
    before, cancelled = engine.stats["requests"], engine.stats["cancelled"]
    first = {"voice": "ryan", "segment_chars": segment_chars, **GEN, **GREEDY}
    with _session(server, first, TEXT) as ws:
        assert isinstance(ws.recv(timeout=120), bytes)           # the first audio
    wait_for(lambda: engine.stats["cancelled"] > cancelled and engine.active == 0
             and server.server_state.sessions_open == 0, 60, "the cancellation")
    time.sleep(1.0)
    assert engine.stats["requests"] == before + 1
