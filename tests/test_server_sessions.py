"""The engine's limits and faults as HTTP clients see them: a prompt too long for memory is a
413 before anything is allocated, idle WebSocket sessions hold no queue place and have their own
cap and idle timeout, a disconnect cancels a session before its first chunk, a dead worker is a
503 (and restarts), a stalled one turns /health into 503, and SIGTERM drains `serve` within
--shutdown-timeout."""
import json
import os
import signal
import subprocess
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("websockets")

from qwen3_tts_jax import Qwen3TTS  # noqa: E402
from qwen3_tts_jax import engine as engine_mod  # noqa: E402
from qwen3_tts_jax.server.app import ServerOptions, create_app  # noqa: E402
from test_server import GEN, SHAPES, TOKENS, Running, free_port, get, post, speech  # noqa: E402


@pytest.fixture(scope="module")
def tts(make_checkpoint):
    return Qwen3TTS.from_pretrained(make_checkpoint("cv_proj"))


@pytest.fixture(scope="module")
def server(tts):
    s = Running(create_app(tts, ServerOptions(
        model_name="tiny", max_new_tokens=TOKENS, max_input_chars=10 ** 6, max_queue=1,
        max_sessions=2, session_idle_timeout=120.0, stall_timeout=1.0, batch_window_ms=20,
        **SHAPES)))
    yield s
    s.stop()


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def health(server):
    """(status code, body) of GET /health."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(server.url + "/health", timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def connect(server):
    from websockets.sync.client import connect as ws_connect

    return ws_connect(server.url.replace("http", "ws") + "/v1/audio/speech/stream")


def wait_for(cond, timeout=60, what="condition"):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


# ---------------------------------------------------------------------------------- memory
def test_a_prompt_too_long_for_memory_is_413_before_it_is_batched(server):
    """40,000 characters of instructions (tens of thousands of prompt positions: the default
    bound, from the free memory, is far below) are refused at once, naming the limit, and the
    process's memory does not grow (it used to allocate ~24 GB and be killed)."""
    limit = server.server_state.max_prompt_tokens
    assert 16 <= limit < 15_000, limit
    assert get(server.url + "/health")["max_prompt_tokens"] == limit
    before, t = rss_bytes(), time.monotonic()
    words = " ".join(["a"] * 20_000)                # 39,999 characters, ~20,000 tokens
    code, _, data = post(server.url + "/v1/audio/speech",
                         speech(instructions=words, response_format="wav", **GEN))
    err = json.loads(data)["error"]
    assert code == 413 and f"at most {limit}" in err["message"], err
    assert err["code"] == "prompt_too_long" and time.monotonic() - t < 30
    assert rss_bytes() - before < 300 * 2 ** 20
    # a session's instructions count too
    with connect(server) as ws:
        ws.send(json.dumps({"voice": "ryan", "instructions": words, **GEN}))
        msg = json.loads(ws.recv(timeout=60))
    assert msg["type"] == "error" and msg["status"] == 413, msg


# ---------------------------------------------------------------------------------- sessions
def test_idle_sessions_hold_no_queue_place_and_have_their_own_cap(server):
    """With max_queue 1 and max_sessions 2: two sessions that sent their settings and no text
    leave HTTP requests served; a third session gets a 429 error message; once one closes, a
    new session is taken."""
    with connect(server) as a, connect(server) as b:
        for ws in (a, b):
            ws.send(json.dumps({"voice": "ryan", "seed": 1, **GEN}))
        wait_for(lambda: server.server_state.sessions_open == 2, what="sessions open")
        for _ in range(2):
            code, _, data = post(server.url + "/v1/audio/speech",
                                 speech(response_format="pcm", seed=1, **GEN))
            assert code == 200 and len(data) == (TOKENS - 1) * 1920 * 2
        with connect(server) as c:
            msg = json.loads(c.recv(timeout=30))
        assert msg["type"] == "error" and msg["status"] == 429 and "limit is 2" in msg["message"]
    wait_for(lambda: server.server_state.sessions_open == 0, what="sessions closed")
    with connect(server) as ws:
        ws.send(json.dumps({"voice": "ryan", "seed": 1, **GEN}))
        ws.send(json.dumps({"type": "end", "text": "Hello world."}))
        audio = b""
        while isinstance(msg := ws.recv(timeout=120), bytes):
            audio += msg
    assert json.loads(msg)["type"] == "done" and audio


def test_an_idle_session_is_closed_with_an_error(tts):
    """No message within --session-idle-timeout (3 s here): the client gets a 408 error message,
    the session's row is released; a client that sends nothing at all too."""
    server = Running(create_app(tts, ServerOptions(model_name="tiny", max_new_tokens=TOKENS,
                                                   session_idle_timeout=3.0, **SHAPES)))
    try:
        t = time.monotonic()
        with connect(server) as ws:
            ws.send(json.dumps({"voice": "ryan", **GEN}))
            ws.send(json.dumps({"type": "text", "text": "Hello "}))
            while isinstance(msg := ws.recv(timeout=120), bytes):
                pass
        msg = json.loads(msg)
        assert msg["type"] == "error" and msg["status"] == 408 and "3 s" in msg["message"], msg
        assert 2.5 < time.monotonic() - t
        wait_for(lambda: server.server_state.engine.active == 0, what="row released")
        with connect(server) as ws:       # nothing sent at all
            msg = json.loads(ws.recv(timeout=60))
        assert msg["status"] == 408
        assert server.server_state.sessions_open == 0
    finally:
        server.stop()


def test_a_disconnect_cancels_a_session_before_its_first_chunk(server):
    """A client that sent settings and some text (not ended) and went away: the session is
    cancelled, its place and row freed, without any audio sent."""
    engine = server.server_state.engine
    cancelled = engine.stats["cancelled"]
    requests = engine.stats["requests"]
    with connect(server) as ws:
        ws.send(json.dumps({"voice": "ryan", **GEN}))
        ws.send(json.dumps({"type": "text", "text": "Hello there, how are"}))
        wait_for(lambda: engine.stats["requests"] > requests, what="submitted")
    wait_for(lambda: engine.stats["cancelled"] > cancelled and engine.active == 0
             and server.server_state.sessions_open == 0, what="cancelled")


# ---------------------------------------------------------------------------------- liveness
def test_worker_death_is_503_then_served_and_a_stall_turns_health_503(server, monkeypatch):
    """A BaseException in the worker (SystemExit from a step): the request in flight gets 503,
    the worker restarts, /health is ok and counts the restart, the next request is served.
    A step that blocks past --stall-timeout (1 s here) turns /health into 503 with the reason;
    it recovers when the step goes on."""
    real = engine_mod.Cohort.step
    mode = {"die": True, "block": None}

    def step(self):
        if mode["die"]:
            mode["die"] = False
            raise SystemExit("planted worker death")
        if mode["block"] is not None:
            mode["block"].wait(60)
        return real(self)

    monkeypatch.setattr(engine_mod.Cohort, "step", step)
    restarts = server.server_state.engine.stats["worker_restarts"]
    code, headers, data = post(server.url + "/v1/audio/speech",
                               speech(response_format="wav", seed=1, **GEN))
    assert code == 503 and "planted worker death" in json.loads(data)["error"]["message"]
    status, body = health(server)
    assert status == 200 and body["stats"]["worker_restarts"] == restarts + 1
    code, _, data = post(server.url + "/v1/audio/speech",
                         speech(response_format="pcm", seed=1, **GEN))
    assert code == 200 and len(data) == (TOKENS - 1) * 1920 * 2
    mode["block"] = threading.Event()
    result = {}
    sender = threading.Thread(target=lambda: result.update(r=post(
        server.url + "/v1/audio/speech", speech(response_format="pcm", seed=1, **GEN))))
    sender.start()
    try:
        wait_for(lambda: health(server)[0] == 503, what="/health 503")
        assert "no progress" in health(server)[1]["reason"]
    finally:
        mode["block"].set()
        mode["block"] = None
        sender.join(120)
    assert result["r"][0] == 200 and health(server)[0] == 200


def test_sigterm_drains_within_the_shutdown_timeout(tmp_path):
    """`serve` on a tiny checkpoint, a request in flight, SIGTERM: the process ends within
    --shutdown-timeout (5 s), plus at most 5 s for the engine's step in progress (and some for
    the interpreter's exit), and the request either finished or got an error (never hangs)."""
    from test_cli import EXE

    port = free_port()
    p = subprocess.Popen([EXE, "serve", "--random-weights", "--port", str(port), "--quiet",
                          "--voices-dir", str(tmp_path / "v"), "--max-new-tokens", "400",
                          "--shutdown-timeout", "5"],
                         env=dict(os.environ, JAX_PLATFORMS="cpu"), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    result = {}
    try:
        deadline = time.time() + 240
        while True:
            assert p.poll() is None and time.time() < deadline, p.communicate()[0]
            try:
                if get(url + "/health")["status"] == "ok":
                    break
            except OSError:
                time.sleep(0.2)
        body = {"model": "m", "input": "Hello there.", "voice": "ryan", "response_format": "wav",
                "seed": 1}

        def send():
            try:
                result["r"] = post(url + "/v1/audio/speech", body, timeout=120)
            except Exception as e:  # noqa: BLE001 - a cut connection is an acceptable end
                result["r"] = e

        sender = threading.Thread(target=send)
        sender.start()
        wait_for(lambda: get(url + "/health")["stats"]["requests"] >= 1, what="request in")
        t = time.monotonic()
        p.send_signal(signal.SIGTERM)
        rc = p.wait(60)
        took = time.monotonic() - t
        sender.join(60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    # uvicorn re-raises the signal once it has shut down: the status says SIGTERM ended it
    assert rc in (0, -signal.SIGTERM) and took < 5 + 5 + 10, (rc, took, p.stdout.read()[-3000:])
    assert not sender.is_alive() and "r" in result
    r = result["r"]
    assert isinstance(r, Exception) or r[0] in (200, 503), r
