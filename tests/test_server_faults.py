"""The HTTP server against misbehaving and hostile clients, over real HTTP on loopback: bodies and
uploads capped while they arrive, audio length from the header before decoding (a decompression
bomb), the input-length limit per field, malformed JSON, browser safety (Host, Origin, content
type, the API key kept out of logs), honest ends of cut streams, and disconnects that cancel
generation for every format. Each fault is injected, and both what the client gets and what the
server keeps (its /health counters, an idle engine) are checked. Bounded: seconds each, plus the
tiny model's compiles (the shapes of tests/test_server.py)."""
import base64
import http.client
import io
import json
import logging
import os
import select
import socket
import subprocess
import threading
import time

import numpy as np
import pytest
import soundfile as sf

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from qwen3_tts_jax import Qwen3TTS, engine as engine_mod  # noqa: E402
from qwen3_tts_jax.server import guards  # noqa: E402
from qwen3_tts_jax.server.app import Server, ServerOptions, create_app  # noqa: E402
from qwen3_tts_jax.server.guards import RedactApiKey  # noqa: E402
from qwen3_tts_jax.voice import VoiceClonePromptItem  # noqa: E402
from test_server import GEN, SHAPES, Running, get, multipart, post, serving, speech  # noqa: E402

LIMIT = 200                        # --max-input-chars of these servers


@pytest.fixture(scope="module")
def tts(make_checkpoint):
    return Qwen3TTS.from_pretrained(make_checkpoint("cv_proj"))


@pytest.fixture(scope="module")
def server(tts):
    yield from serving(tts, max_input_chars=LIMIT)


@pytest.fixture(scope="module")
def base_server(make_checkpoint, tmp_path_factory):
    """A Base model (voice registration) with a small upload cap; nothing here encodes a voice."""
    base = Qwen3TTS.from_pretrained(make_checkpoint("base"))
    s = Running(create_app(base, ServerOptions(
        voices_dir=str(tmp_path_factory.mktemp("voices")), max_input_chars=LIMIT,
        max_upload_bytes=256 << 10)))
    yield s
    s.stop()


def raw(port: int, head: str, body: bytes = b"", timeout: float = 30) -> tuple[int, dict, bytes]:
    """Send a raw HTTP/1.1 request (head without the blank line) and read one response."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head.encode() + b"\r\n\r\n" + body)
        r = http.client.HTTPResponse(sock)
        r.begin()
        return r.status, dict(r.getheaders()), r.read()


def error_of(data: bytes) -> dict:
    return json.loads(data)["error"]


def slow_send(port: int, head: str, prefix: bytes, total: int, piece: int = 32 << 10,
              pause: float = 0.005) -> tuple[int, int, bytes]:
    """Send a chunked body of `total` bytes in small pieces, pausing, and stop at the first byte
    of a response: (bytes sent when the response came, status, body)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sent = 0
    try:
        sock.sendall(head.encode() + b"\r\nTransfer-Encoding: chunked\r\n\r\n")
        data = prefix
        while sent < total:
            if select.select([sock], [], [], 0)[0]:
                break                                      # the server answered already
            part = data or b"a" * piece
            data = b""
            try:
                sock.sendall(b"%x\r\n" % len(part) + part + b"\r\n")
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(part)
            time.sleep(pause)
        r = http.client.HTTPResponse(sock)
        r.begin()
        return sent, r.status, r.read()
    finally:
        sock.close()


def wait_for(condition, timeout: float, what: str):
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


# ---------------------------------------------------------------------------------- 1. body caps
def test_json_body_is_capped_while_it_arrives(server):
    """A body twice the 1 MiB cap, sent slowly without a Content-Length, gets 413 before it is all
    sent; a Content-Length over the cap is refused before any body is read."""
    cap = 1 << 20
    head = (f"POST /v1/audio/speech HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
            "Content-Type: application/json")
    sent, status, body = slow_send(server.port, head, b'{"model": "tiny", "input": "', 2 * cap)
    assert status == 413 and error_of(body)["type"] == "request_too_large", body
    assert sent < 2 * cap, sent                 # refused while the body was still coming
    assert sent <= cap + (256 << 10), sent      # ... soon after the cap
    t0 = time.perf_counter()
    status, _, body = raw(server.port, head + f"\r\nContent-Length: {2 * cap}")   # no body sent
    assert status == 413 and "at most 1048576" in error_of(body)["message"], body
    assert time.perf_counter() - t0 < 10
    assert get(server.url + "/health")["status"] == "ok"


def test_upload_is_capped_while_it_arrives(base_server):
    """A voice upload over the cap (here 256 KiB + 1 MiB for the other fields), sent slowly,
    gets 413 before it is all sent."""
    total = 4 << 20
    boundary = "----faults"
    prefix = (f'--{boundary}\r\nContent-Disposition: form-data; name="name"\r\n\r\nbig\r\n'
              f'--{boundary}\r\nContent-Disposition: form-data; name="audio_sample"; '
              'filename="big.wav"\r\nContent-Type: application/octet-stream\r\n\r\n').encode()
    head = (f"POST /v1/audio/voices HTTP/1.1\r\nHost: 127.0.0.1:{base_server.port}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}")
    sent, status, body = slow_send(base_server.port, head, prefix, total)
    assert status == 413 and error_of(body)["code"] == "body_too_large", body
    assert sent < (1 << 20) + (512 << 10), sent
    assert get(base_server.url + "/v1/audio/voices")["data"] == []


# ---------------------------------------------------------------------------------- 2. audio bombs
def flac_of_silence(seconds: int, rate: int = 8000) -> bytes:
    buf = io.BytesIO()
    with sf.SoundFile(buf, "w", rate, 1, format="FLAC", subtype="PCM_16") as f:
        block = np.zeros(rate * 600, np.int16)
        for _ in range(seconds // 600):
            f.write(block)
    return buf.getvalue()


def test_audio_bomb_is_refused_from_its_header(base_server, monkeypatch):
    """Two hours of silence as FLAC (about 180 KB, under the upload cap): 413 naming its length,
    and libsndfile never decodes a sample of it; the same with the header's length erased
    (unknown); a transcript over --max-input-chars is a 413 naming `transcript`."""
    bomb = flac_of_silence(7200)
    assert len(bomb) < 256 << 10
    unknown = bytearray(bomb)                    # STREAMINFO's 36-bit total samples := 0
    x = int.from_bytes(unknown[18:26], "big") & ~((1 << 36) - 1)
    unknown[18:26] = x.to_bytes(8, "big")
    reads = []
    original = sf.SoundFile.read
    monkeypatch.setattr(sf.SoundFile, "read", lambda self, *a, **k: reads.append(1) or
                        original(self, *a, **k))
    for data, needle in ((bomb, "7200.0 s long; the limit is 60 s"),
                         (bytes(unknown), "unknown length")):
        t0 = time.perf_counter()
        code, out = multipart(base_server.url + "/v1/audio/voices", {"name": "bomb"},
                              {"audio_sample": ("bomb.flac", data)})
        assert code == 413 and needle in out["error"]["message"], out
        assert out["error"]["param"] == "audio_sample" and out["error"]["code"] == \
            "audio_too_long", out
        assert time.perf_counter() - t0 < 10
    assert reads == []                           # refused from the header alone
    code, out = multipart(base_server.url + "/v1/audio/voices",
                          {"name": "long", "transcript": "x" * (LIMIT + 1)},
                          {"audio_sample": ("bomb.flac", bomb)})
    assert code == 413 and out["error"]["param"] == "transcript", out
    assert f"at most {LIMIT}" in out["error"]["message"]
    assert get(base_server.url + "/v1/audio/voices")["data"] == []


def test_read_file_bounds_what_it_decodes(tmp_path):
    """`audio.read_file` with a limit reads at most the limit's frames even where the header
    gives no length, and refuses a header whose channels x rate promise too much work."""
    from qwen3_tts_jax import audio

    ok = np.sin(np.arange(16000 * 3) / 9).astype(np.float32)
    sf.write(tmp_path / "ok.wav", ok, 16000)
    samples, sr = audio.read_file(str(tmp_path / "ok.wav"), "x", 60)
    assert sr == 16000 and samples.shape == (48000, 1)
    with pytest.raises(audio.AudioTooLong, match="3.0 s long; the limit is 2 s"):
        audio.read_file(str(tmp_path / "ok.wav"), "x", 2)
    sf.write(tmp_path / "wide.wav", np.zeros((10, 8), np.float32), 192000)
    with pytest.raises(audio.AudioTooLong, match="8 channel"):
        audio.read_file(str(tmp_path / "wide.wav"), "x", 60)
    with pytest.raises(audio.AudioError, match="cannot read x: ") as e:
        audio.read_file(io.BytesIO(b"not audio"), "x", 60)
    assert "BytesIO" not in str(e.value)


# ---------------------------------------------------------------------------------- 3. lengths
def test_input_limit_counts_each_field_and_their_sum(server, make_checkpoint):
    """Each text field is within --max-input-chars (413 naming it); a prompt's fields together
    within twice it (a voice registered under a larger limit)."""
    for field in ("input", "instructions"):
        code, _, data = post(server.url + "/v1/audio/speech",
                             speech(**{field: "x" * (LIMIT + 1)}))
        err = error_of(data)
        assert code == 413 and err["param"] == field and f"at most {LIMIT}" in err["message"]
    base = Qwen3TTS.from_pretrained(make_checkpoint("base"))
    srv = Server(base, ServerOptions(max_input_chars=LIMIT))
    item = VoiceClonePromptItem(np.zeros((4, 16), np.int32), np.zeros(8, np.float32), False,
                                True, "y" * (LIMIT + 5))
    srv.voices.voices["old"] = [item]
    from qwen3_tts_jax.server.app import ApiError

    with pytest.raises(ApiError) as e:
        srv.parse_speech(speech(voice="old", input="z" * LIMIT))
    assert e.value.status == 413 and "together" in e.value.message and e.value.param == "input"


def test_unknown_voice_does_not_list_registered_voices(make_checkpoint):
    """Registered (cloned) voices are not listed in errors; preset speakers are."""
    from qwen3_tts_jax.server.app import ApiError

    srv = Server(Qwen3TTS.from_pretrained(make_checkpoint("base")), ServerOptions())
    srv.voices.voices["private_voice"] = [None]
    for voice in ("nobody", None):
        with pytest.raises(ApiError) as e:
            srv.parse_speech(speech(voice=voice))
        assert e.value.status == 400 and "private_voice" not in e.value.message
        assert "GET /v1/audio/voices" in e.value.message


# ---------------------------------------------------------------------------------- 4. malformed
@pytest.mark.parametrize("body,needle", [
    (b"[" * 100_000 + b"]" * 100_000, "JSON nested too deeply"),
    (b'{"model": "tiny", "input": "\xff\xfe"}', "not UTF-8"),
    (b"hello", "not valid JSON"),
    (b'{"model": "tiny", "max_new_tokens": ' + b"9" * 5000 + b"}", "not valid JSON"),
    (json.dumps(speech(input="a\ud800b")).encode(), "unpaired surrogate"),
])
def test_malformed_json_is_400(server, body, needle):
    code, _, data = post(server.url + "/v1/audio/speech", body, raw=True)
    assert code == 400 and needle in error_of(data)["message"], data[:300]


# ---------------------------------------------------------------------------------- 5. browsers
def test_content_type_and_origin_of_posts(tts, server):
    """JSON endpoints: another content type is 415 unless its Origin is allowed; no content type
    and no Origin (a script) passes; the multipart upload with a foreign Origin is 403."""
    port = server.port
    body = json.dumps({"model": "tiny"}).encode()      # passes the guard -> 400 (no input)

    def send(headers: dict, path="/v1/audio/speech", port=port):
        head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: {len(body)}"
        head += "".join(f"\r\n{k}: {v}" for k, v in headers.items())
        return raw(port, head, body)

    for headers, status in [
            ({"Content-Type": "text/plain"}, 415),
            ({"Content-Type": "application/x-www-form-urlencoded"}, 415),
            ({"Content-Type": "multipart/form-data; boundary=x"}, 415),
            ({"Content-Type": "text/plain", "Origin": "http://evil.example"}, 415),
            ({"Origin": "http://evil.example"}, 415),
            ({}, 400),
            ({"Content-Type": "application/json"}, 400),
            ({"Content-Type": "application/json; charset=utf-8", "Origin": "null"}, 400),
            ({"Content-Type": "text/plain", "Origin": f"http://127.0.0.1:{port}"}, 400)]:
        code, _, data = send(headers)
        assert code == status, (headers, code, data)
        if status == 415:
            assert "Content-Type: application/json" in error_of(data)["message"]
    code, _, data = send({"Content-Type": "multipart/form-data; boundary=x",
                          "Origin": "http://evil.example"}, "/v1/audio/voices")
    assert code == 403 and error_of(data)["code"] == "origin_not_allowed", data
    code, _, data = send({"Content-Type": "multipart/form-data; boundary=x"}, "/v1/audio/voices")
    assert code == 400, data                   # CustomVoice: no registration, but let through
    allowed = Running(create_app(tts, ServerOptions(
        model_name="tiny", allowed_origins=("https://app.example",), **SHAPES)))
    try:
        code, _, _ = send({"Content-Type": "text/plain", "Origin": "https://app.example"},
                          port=allowed.port)
        assert code == 400
        code, _, _ = send({"Content-Type": "text/plain", "Origin": "https://app.example:444"},
                          port=allowed.port)
        assert code == 415
    finally:
        allowed.stop()
    with pytest.raises(ValueError, match="not an origin"):
        create_app(tts, ServerOptions(allowed_origins=("app.example",)))


def test_cors_for_allowed_origins(tts, server):
    """With --allowed-origins, a listed page's CORS preflight is answered (without the key: a
    preflight carries none) and every answer to it carries Access-Control-Allow-Origin, a 401
    included, so the page can read it; an origin not listed gets neither. Without the flag no
    CORS at all (the preflight is 405, nothing allows a foreign page to read)."""
    def ask(port, method, path, origin, extra=""):
        head = (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nOrigin: {origin}"
                + extra)
        code, headers, data = raw(port, head)
        return code, {k.lower(): v for k, v in headers.items()}, data

    preflight = ("\r\nAccess-Control-Request-Method: POST"
                 "\r\nAccess-Control-Request-Headers: authorization, content-type")
    code, h, _ = ask(server.port, "OPTIONS", "/v1/audio/speech", "https://app.example", preflight)
    assert code == 405 and "access-control-allow-origin" not in h
    s = Running(create_app(tts, ServerOptions(
        model_name="tiny", api_key="s3cret", allowed_origins=("https://APP.example:443",
                                                              "http://localhost:3000"),
        **SHAPES)))
    try:
        for origin in ("https://app.example", "http://localhost:3000"):
            code, h, _ = ask(s.port, "OPTIONS", "/v1/audio/speech", origin, preflight)
            assert code == 200 and h["access-control-allow-origin"] == origin, h
            assert {"authorization", "content-type"} <= {
                x.strip().lower() for x in h["access-control-allow-headers"].split(",")}
            assert "POST" in h["access-control-allow-methods"]
        for origin in ("https://evil.example", "http://localhost:3001", "null"):
            code, h, _ = ask(s.port, "OPTIONS", "/v1/audio/speech", origin, preflight)
            assert code == 400 and "access-control-allow-origin" not in h, (origin, h)
        code, h, data = ask(s.port, "GET", "/v1/models", "https://app.example")
        assert code == 401 and h["access-control-allow-origin"] == "https://app.example"
        assert error_of(data)["code"] == "invalid_api_key"
        code, h, data = ask(s.port, "GET", "/v1/models", "https://app.example",
                            "\r\nAuthorization: Bearer s3cret")
        assert code == 200 and h["access-control-allow-origin"] == "https://app.example"
        assert json.loads(data)["data"][0]["id"] == "tiny"
        code, h, _ = ask(s.port, "GET", "/v1/models", "https://evil.example",
                         "\r\nAuthorization: Bearer s3cret")
        assert "access-control-allow-origin" not in h
    finally:
        s.stop()
    assert guards.cors_origins(guards.parse_origins(["*"])) == ["*"]
    assert guards.cors_origins(guards.parse_origins(
        ["http://[::1]:8080", "https://x.example:8443", "http://x.example:80"])) == [
        "http://[::1]:8080", "https://x.example:8443", "http://x.example"]


def test_host_header_on_loopback(server):
    """DNS rebinding: on loopback only a loopback name with the server's port is answered."""
    port = server.port
    for host, status in [(f"127.0.0.1:{port}", 200), (f"localhost:{port}", 200),
                         (f"[::1]:{port}", 200), (f"evil.example:{port}", 421),
                         ("evil.example", 421), (f"127.0.0.1:{port + 1}", 421),
                         ("localhost", 421)]:
        code, _, data = raw(port, f"GET /health HTTP/1.1\r\nHost: {host}")
        assert code == status, (host, code, data)
        if status == 421:
            assert error_of(data)["code"] == "host_not_allowed"
    for host, status in [(f"evil.example:{port}", 403), (f"localhost:{port}", 101)]:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(f"GET /v1/audio/speech/stream HTTP/1.1\r\nHost: {host}\r\n"
                         "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: "
                         "13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n".encode())
            assert sock.recv(200).split(b" ")[1] == str(status).encode(), host


def test_websocket_origin(tts, server):
    """A WebSocket handshake from a foreign page is refused; the server's own origin, no Origin
    (not a browser) and an allowed origin get through (to the session's own error here)."""
    pytest.importorskip("websockets")
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    def session(run, origin):
        url = run.url.replace("http", "ws") + "/v1/audio/speech/stream"
        with connect(url, origin=origin) as ws:
            ws.send(json.dumps({"voice": "bob"}))
            return json.loads(ws.recv(timeout=60))

    for origin in ("http://evil.example", "null", f"http://127.0.0.1:{server.port + 1}"):
        with pytest.raises(InvalidStatus, match="403"):
            session(server, origin)
    for origin in (None, f"http://127.0.0.1:{server.port}"):    # not a browser; same origin
        assert "unknown voice" in session(server, origin)["message"]
    allowed = Running(create_app(tts, ServerOptions(
        model_name="tiny", allowed_origins=("https://app.example", "http://localhost:3000"),
        **SHAPES)))
    try:
        assert "unknown voice" in session(allowed, "http://localhost:3000")["message"]
        with pytest.raises(InvalidStatus, match="403"):
            session(allowed, "http://localhost:3001")
    finally:
        allowed.stop()


def test_api_key_guards_docs_and_stays_out_of_logs(tts):
    """With a key: /docs and /openapi.json need it too (/health does not); `?api_key=` never
    reaches uvicorn's log lines; an empty key is an error, not "no authentication"."""
    for key in ("", "  "):
        with pytest.raises(ValueError, match="API key is empty"):
            create_app(tts, ServerOptions(api_key=key))
    s = Running(create_app(tts, ServerOptions(model_name="tiny", api_key="s3cret", **SHAPES)))
    lines = []

    class Keep(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    handler = Keep(logging.INFO)
    loggers = [logging.getLogger(n) for n in ("uvicorn.error", "uvicorn.access")]
    levels = [lg.level for lg in loggers]
    try:
        for path in ("/docs", "/openapi.json", "/v1/models", "/nothing"):
            code, _, data = raw(s.port, f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{s.port}")
            assert code == 401 and error_of(data)["code"] == "invalid_api_key", (path, data)
            code, _, data = raw(s.port, f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{s.port}\r\n"
                                        "Authorization: Bearer s3cret")
            assert code == (404 if path == "/nothing" else 200), (path, code)
        assert get(s.url + "/health")["status"] == "ok"
        # the playground's page and files hold no data: open, so that the page can ask for the key
        for path, want in (("/", 200), ("/static/app.js", 200), ("/staticx", 401),
                           ("/static/../openapi.json", 404)):   # StaticFiles: no way out
            code, _, _ = raw(s.port, f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{s.port}")
            assert code == want, (path, code)
        for lg in loggers:
            lg.addHandler(handler)
            lg.setLevel(logging.INFO)
        pytest.importorskip("websockets")
        from websockets.sync.client import connect

        with connect(s.url.replace("http", "ws") + "/v1/audio/speech/stream?api_key=s3cret"
                     "&x=1") as ws:
            ws.send(json.dumps({"voice": "bob"}))
            assert "unknown voice" in json.loads(ws.recv(timeout=60))["message"]
        wait_for(lambda: any("WebSocket" in line for line in lines), 10, "the WebSocket log")
    finally:
        for lg, level in zip(loggers, levels):
            lg.removeHandler(handler)
            lg.setLevel(level)
        s.stop()
    assert not any("s3cret" in line for line in lines), lines
    assert any("api_key=[redacted]&x=1" in line for line in lines), lines
    record = logging.LogRecord("uvicorn.access", logging.INFO, "", 0, '%s - "%s %s HTTP/%s" %d',
                               ("1.2.3.4:5", "GET", "/v1/models?api_key=abc&b=2", "1.1", 200),
                               None)
    assert RedactApiKey().filter(record) and "abc" not in record.getMessage()
    record = logging.LogRecord("uvicorn.error", logging.INFO, "", 0, "GET /x?api_key=abc", (), None)
    assert RedactApiKey().filter(record) and record.getMessage() == "GET /x?api_key=[redacted]"


def test_serve_refuses_an_empty_key_and_bad_origins():
    from test_cli import EXE

    env = dict(os.environ, QWEN3_TTS_JAX_API_KEY="", JAX_PLATFORMS="cpu")
    r = subprocess.run([EXE, "serve", "--random-weights", "--port", "0"], capture_output=True,
                       text=True, timeout=300, env=env)
    assert r.returncode == 2 and "API key is empty" in r.stderr and "NOISE" not in r.stderr, \
        r.stderr[-2000:]
    r = subprocess.run([EXE, "serve", "--random-weights", "--allowed-origins", "ftp://x"],
                       capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert r.returncode == 2 and "--allowed-origins" in r.stderr and "ftp://x" in r.stderr, \
        r.stderr[-2000:]


# ---------------------------------------------------------------------------------- 6. endings
@pytest.fixture
def cut_after_first_chunk(monkeypatch):
    """Generation fails (or runs out of time) after the cohort's first chunk."""
    def plant(kind: str):
        original = engine_mod.Cohort.step
        calls = []

        def step(self):
            if calls and kind == "failure":
                raise RuntimeError("planted failure")
            alive = original(self)
            calls.append(1)
            if kind == "deadline":
                for job in self.rows:
                    if job is not None:
                        job.deadline = 0.0
            return alive

        monkeypatch.setattr(engine_mod.Cohort, "step", step)
    return plant


def test_sse_stream_cut_ends_with_an_error_event(server, cut_after_first_chunk):
    cut_after_first_chunk("failure")
    before = get(server.url + "/health")["stats"]["truncated"]
    status, _, body = post(server.url + "/v1/audio/speech",
                           speech(response_format="pcm", stream_format="sse", seed=1, **GEN))
    events = [json.loads(line[6:]) for line in body.decode().splitlines()
              if line.startswith("data: ")]
    assert status == 200 and events[0]["type"] == "speech.audio.delta", events[:1]
    assert base64.b64decode(events[0]["audio"])
    last = events[-1]
    assert last["type"] == "error" and last["error"]["code"] == "generation_failed", last
    assert "planted failure" in last["error"]["message"]
    assert get(server.url + "/health")["stats"]["truncated"] == before + 1


@pytest.mark.parametrize("fmt", ["pcm", "wav"])
def test_raw_stream_cut_is_not_a_clean_end(server, cut_after_first_chunk, fmt):
    """A raw stream that runs out of time mid-way closes without the chunked terminator: the
    client sees an incomplete body, not a short but complete file."""
    cut_after_first_chunk("deadline")
    before = get(server.url + "/health")["stats"]["truncated"]
    with socket.create_connection(("127.0.0.1", server.port), timeout=120) as sock:
        body = json.dumps(speech(response_format=fmt, seed=1, **GEN)).encode()
        sock.sendall(f"POST /v1/audio/speech HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
                     .encode() + body)
        r = http.client.HTTPResponse(sock)
        r.begin()
        assert r.status == 200
        with pytest.raises(http.client.IncompleteRead) as e:
            r.read()
    assert len(e.value.partial) >= 3 * 1920 * 2          # the first chunk came
    wait_for(lambda: get(server.url + "/health")["stats"]["truncated"] == before + 1, 10,
             "the truncated count")


# ---------------------------------------------------------------------------------- 7. disconnects
def slow_chunks(monkeypatch, seconds: float = 1.0) -> threading.Event:
    """Every engine chunk takes `seconds` longer; the Event is set at the first one."""
    original = engine_mod.Cohort.step
    running = threading.Event()

    def slow(self):
        running.set()
        time.sleep(seconds)
        return original(self)

    monkeypatch.setattr(engine_mod.Cohort, "step", slow)
    return running


def start_request(port: int, body: dict) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    data = json.dumps(body).encode()
    sock.sendall(f"POST /v1/audio/speech HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                 f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
                 .encode() + data)
    return sock


@pytest.mark.parametrize("fmt", ["mp3", "flac", "pcm"])
def test_disconnect_cancels_a_running_request(server, monkeypatch, fmt):
    """The client leaves 0.5 s into generation (slowed: 1 s a chunk): the job is cancelled for
    whole-file formats too, and the engine is idle soon after."""
    if fmt not in server.server_state.formats:
        pytest.skip(f"this libsndfile cannot write {fmt}")
    running = slow_chunks(monkeypatch)
    engine = server.server_state.engine
    before = engine.stats["cancelled"]
    sock = start_request(server.port, speech(response_format=fmt, seed=1, **GEN))
    assert running.wait(120), "the request did not start"
    time.sleep(0.5)
    sock.close()
    wait_for(lambda: engine.stats["cancelled"] > before, 30, "the cancellation")
    wait_for(lambda: engine.active == 0 and engine.waiting == 0, 30, "an idle engine")
    assert get(server.url + "/health")["stats"]["cancelled"] > before


def test_disconnect_cancels_a_queued_request(server):
    """A whole-file request whose client leaves while it waits in the queue never starts."""
    engine = server.server_state.engine
    release = threading.Event()
    engine.call(lambda: release.wait(60))
    try:
        before = dict(engine.stats)
        sock = start_request(server.port, speech(response_format="flac", seed=1, **GEN))
        wait_for(lambda: engine.waiting == 1, 30, "the request to queue")
        time.sleep(0.5)
        sock.close()
        time.sleep(0.5)                  # the server sees the disconnect
    finally:
        release.set()
    wait_for(lambda: engine.stats["cancelled"] == before["cancelled"] + 1, 30, "the cancellation")
    wait_for(lambda: engine.waiting == 0 and engine.active == 0, 30, "an idle engine")
    assert engine.stats["cohorts"] == before["cohorts"] and engine.stats["frames"] == \
        before["frames"]
    assert post(server.url + "/v1/audio/speech",
                speech(response_format="pcm", seed=1, **GEN))[0] == 200
