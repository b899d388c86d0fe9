"""POST /v1/audio/speech/batch over real HTTP: several speech requests in one body, queued together
(all or none), each answered in order with its own audio or its own error. One bad item never
fails the others; a full queue refuses the whole batch before anything runs; a client that
leaves cancels every item; an item past its deadline is a 504 entry while the others stand.
"""
import base64
import io
import json
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest
import soundfile as sf

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from qwen3_tts_jax import Qwen3TTS  # noqa: E402
from qwen3_tts_jax.server.app import ServerOptions, create_app  # noqa: E402
from qwen3_tts_jax.server.wire import wav_header  # noqa: E402
from test_server import GEN, SHAPES, Running, get, post, serving, speech  # noqa: E402
from test_server_faults import slow_chunks, wait_for  # noqa: E402

GREEDY = {"do_sample": False, "subtalker_dosample": False}


@pytest.fixture(scope="module")
def tts(make_checkpoint):
    return Qwen3TTS.from_pretrained(make_checkpoint("cv_proj"))


@pytest.fixture(scope="module")
def server(tts):
    yield from serving(tts, max_batch_items=4)


def batch(server, body, **kw):
    status, headers, data = post(server.url + "/v1/audio/speech/batch", body, **kw)
    return status, headers, json.loads(data)


def test_items_come_back_in_order_as_single_requests_would(server):
    """Each item's audio is the audio of the same request sent alone (greedy), in its own
    format; the fields outside `items` are every item's defaults, an item's own win."""
    items = [{"input": "Hello world.", "response_format": "pcm"},
             {"input": "A second, longer sentence here.", "voice": "vivian"},
             {"input": "Third.", "response_format": "wav"}]
    shared = {"model": "tiny", "voice": "ryan", "response_format": "wav", **GREEDY, **GEN}
    status, _, body = batch(server, {**shared, "items": items})
    assert status == 200, body
    assert body["object"] == "list" and [d["index"] for d in body["data"]] == [0, 1, 2]
    for item, got in zip(items, body["data"]):
        single = {**shared, **item}
        code, _, want = post(server.url + "/v1/audio/speech", single)
        assert code == 200
        assert got["response_format"] == single["response_format"]
        audio = base64.b64decode(got["audio"])
        if single["response_format"] == "wav":      # sent alone it streams: sizes unknown
            assert audio[:44] == wav_header(24000, len(audio) - 44)
            audio, want = audio[44:], want[44:]
        assert audio == want, item
        frames = got["usage"]["output_tokens"]
        assert 0 < frames <= GEN["max_new_tokens"] - 1
        assert got["finish_reason"] == ("length" if frames == GEN["max_new_tokens"] - 1
                                        else "stop")
        assert got["usage"]["total_tokens"] == got["usage"]["input_tokens"] + \
            got["usage"]["output_tokens"]
    wav, sr = sf.read(io.BytesIO(base64.b64decode(body["data"][2]["audio"])))
    assert sr == 24000 and len(wav) == body["data"][2]["usage"]["output_tokens"] * 1920


def test_a_bad_item_fails_alone(server):
    engine = server.server_state.engine
    before = engine.stats["requests"]
    good = speech(response_format="pcm", **GREEDY, **GEN)
    items = [good, {**good, "voice": "nobody"}, "just text",
             {**good, "do_sample": True, "temperature": -1.0},
             {**good, "stream_format": "sse"}]
    status, _, body = batch(server, {"items": items[:4]})
    assert status == 200, body
    data = body["data"]
    assert "audio" in data[0] and "error" not in data[0]
    for i, param, words in ((1, "voice", "unknown voice 'nobody'"),
                            (2, None, "items[2] must be a JSON object"),
                            (3, "temperature", "temperature must be > 0")):
        err = data[i]["error"]
        assert (data[i]["index"], err["status"], err["param"]) == (i, 400, param), err
        assert words in err["message"] and err["type"] == "invalid_request_error"
    assert engine.stats["requests"] == before + 1          # only the good item ran
    status, _, body = batch(server, {"items": [good, items[4]]})
    assert status == 200 and body["data"][1]["error"]["param"] == "stream_format"


@pytest.mark.parametrize("body, status, param, words", [
    ({"model": "tiny"}, 400, "items", "`items` is required"),
    ({"items": []}, 400, "items", "`items` is required"),
    ({"items": "Hello."}, 400, "items", "`items` is required"),
    ({"items": [{}] * 5}, 413, "items", "at most 4 in one batch"),
    ([{"input": "Hi."}], 400, None, "must be a JSON object with `items`"),
])
def test_the_body_is_checked(server, body, status, param, words):
    code, _, got = batch(server, body)
    assert code == status and got["error"]["param"] == param and words in \
        got["error"]["message"], got


def test_a_full_queue_refuses_the_whole_batch(server):
    """Nothing of a batch that does not fit in the queue is queued: 429 with Retry-After."""
    engine = server.server_state.engine
    release = threading.Event()
    engine.call(lambda: release.wait(60))              # the worker busy: requests wait
    limit = engine.max_queue
    try:
        engine.max_queue = 2
        before = dict(engine.stats)
        good = speech(response_format="pcm", **GEN)
        status, headers, body = batch(server, {"items": [good] * 3})
        assert status == 429 and headers["Retry-After"] == "1", body
        assert "this batch has 3 (the limit is 2)" in body["error"]["message"]
        assert engine.waiting == 0 and engine.stats["requests"] == before["requests"]
        assert engine.stats["rejected_queue_full"] == before["rejected_queue_full"] + 1
    finally:
        engine.max_queue = limit
        release.set()
    assert batch(server, {"items": [good] * 3})[0] == 200


def test_a_client_that_leaves_cancels_every_item(server, monkeypatch):
    running = slow_chunks(monkeypatch)
    engine = server.server_state.engine
    before = engine.stats["cancelled"]
    data = json.dumps({"items": [speech(response_format="pcm", **GEN)] * 3}).encode()
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=60)
    sock.sendall(f"POST /v1/audio/speech/batch HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
                 f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
                 .encode() + data)
    assert running.wait(120), "the batch did not start"
    time.sleep(0.5)
    sock.close()
    wait_for(lambda: engine.stats["cancelled"] >= before + 3 and engine.active == 0, 30,
             "every item cancelled")
    assert get(server.url + "/health")["status"] == "ok"


def test_an_item_out_of_time_is_a_504_entry(make_checkpoint):
    """The item that cannot finish within --request-timeout is a 504 entry; the short one in
    the same batch comes back with its audio, and the server goes on."""
    endless = Qwen3TTS.from_pretrained(make_checkpoint("cv_noeos"))
    s = Running(create_app(endless, ServerOptions(
        model_name="tiny", max_new_tokens=4000, frames_per_token=0, defaults=dict(GREEDY),
        **SHAPES)))
    try:
        short = {"model": "tiny", "input": "Hi.", "voice": "ryan", "response_format": "pcm",
                 "max_new_tokens": 5}
        assert batch(s, {"items": [short]})[0] == 200     # compiles its shapes (one bucket)
        s.server_state.options.request_timeout = 3.0      # read as each request is parsed
        status, _, body = batch(s, {"items": [short, {**short, "max_new_tokens": 4000}]})
        assert status == 200, body
        first, second = body["data"]
        assert "audio" in first, first
        assert first["finish_reason"] == "length" and len(base64.b64decode(first["audio"])) == \
            4 * 1920 * 2
        assert second["error"]["status"] == 504 and "3 s" in second["error"]["message"], second
        engine, deadline = s.server_state.engine, time.time() + 60
        while engine.active or engine.waiting:           # the long item cancelled, dropped
            assert time.time() < deadline, "the engine is still busy"
            time.sleep(0.05)
        assert get(s.url + "/health")["status"] == "ok"
    finally:
        s.stop()


def test_items_are_counted_in_metrics(server):
    pytest.importorskip("prometheus_client")
    batch(server, {"items": [speech(response_format="pcm", **GEN)]})
    with urllib.request.urlopen(server.url + "/metrics") as r:
        text = r.read().decode()
    assert 'route="batch"' in text


def test_a_page_cannot_post_a_batch_as_text(server):
    """Like /v1/audio/speech: a body a web page can send cross-site without a preflight
    (text/plain) is refused before it is read (guards.BrowserGuard)."""
    data = json.dumps({"items": [speech(**GEN)]}).encode()
    req = urllib.request.Request(server.url + "/v1/audio/speech/batch", data=data,
                                 headers={"Content-Type": "text/plain"})
    try:
        urllib.request.urlopen(req, timeout=30)
        raise AssertionError("accepted")
    except urllib.error.HTTPError as e:
        assert e.code == 415 and json.loads(e.read())["error"]["code"] == \
            "unsupported_media_type"
