"""What a stranger or a web page may send, checked before a route runs (ASGI middleware): the API
key (`ApiKeyCheck`), the browser's cross-site requests and DNS rebinding (`BrowserGuard`), the
CORS origins of `--allowed-origins` (`cors_origins`, for starlette's CORSMiddleware), and the
key kept out of the logs (`RedactApiKey`). docs/serving.md, "Limits, and what the client gets"."""
from __future__ import annotations

import ipaddress
import logging
import re
import secrets
import urllib.parse

from starlette.datastructures import Headers

from .errors import error_response

JSON_PATHS = ("/v1/audio/speech", "/v1/audio/speech/batch")  # POST endpoints taking JSON
# Answered without the API key: load balancers' probes, and the playground's static page, which
# holds no data and asks for the key itself before it calls the API.
OPEN_PATHS = ("/health", "/")
OPEN_PREFIXES = ("/static/",)


async def _refuse(scope, receive, send, status: int, message: str, code: str, headers=None):
    """An OpenAI-shaped error from an ASGI middleware; a WebSocket handshake is refused instead
    (uvicorn answers 403)."""
    if scope["type"] == "websocket":
        await receive()                        # the websocket.connect message
        await send({"type": "websocket.close", "code": 1008})
        return
    await error_response(status, message, code=code, headers=headers)(scope, receive, send)


class ApiKeyCheck:
    """ASGI middleware: every path but /health and the playground page (/, /static/...; /v1/...,
    /docs and /openapi.json included) needs `Authorization: Bearer <key>` (what OpenAI's clients
    send for `api_key`), else 401 in OpenAI's error shape. A WebSocket may instead pass
    `?api_key=<key>` (browsers cannot set its headers); without it the handshake is refused
    (403). /health stays open for load balancers' probes."""

    def __init__(self, app, key: str):
        if not key or not key.strip():
            raise ValueError("the API key is empty: give a key, or leave --api-key and "
                             "QWEN3_TTS_JAX_API_KEY unset for no authentication")
        self.app, self.key = app, key.encode()

    def _ok(self, scope) -> bool:
        given = [v[7:] for k, v in scope.get("headers", ())
                 if k.lower() == b"authorization" and v[:7].lower() == b"bearer "]
        if scope["type"] == "websocket":
            query = urllib.parse.parse_qs(scope.get("query_string", b"").decode("latin-1"))
            given += [v.encode() for v in query.get("api_key", [])]
        return any(secrets.compare_digest(g.strip(), self.key) for g in given)

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if (scope["type"] in ("http", "websocket") and path not in OPEN_PATHS
                and not path.startswith(OPEN_PREFIXES) and not self._ok(scope)):
            message = ("a valid API key is needed: send the header `Authorization: Bearer "
                       "<key>` (OpenAI clients: api_key=<key>)")
            return await _refuse(scope, receive, send, 401, message, "invalid_api_key",
                                 {"WWW-Authenticate": "Bearer"})
        await self.app(scope, receive, send)


def _loopback(host: str) -> bool:
    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _host_port(value: str, default_port: int) -> tuple[str, int | None]:
    """A Host header ("name", "name:port", "[::1]:port") -> (name, port); port None if invalid."""
    value = value.strip().lower()
    if value.startswith("["):
        name, _, rest = value[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif value.count(":") == 1:
        name, port = value.split(":")
    else:
        name, port = value, ""
    if not port:
        return name, default_port
    return name, int(port) if port.isdigit() else None


def _origin(value: str) -> tuple[str, str, int] | None:
    """"scheme://host[:port]" -> (scheme, host, port) with the scheme's default port; None for
    anything else ("null", a path, another scheme)."""
    try:
        u = urllib.parse.urlsplit(value.strip().lower())
        if u.scheme not in ("http", "https") or not u.hostname or u.path not in ("", "/"):
            return None
        return u.scheme, u.hostname, u.port or (443 if u.scheme == "https" else 80)
    except ValueError:
        return None


def parse_origins(origins) -> tuple[tuple[str, str, int], ...] | None:
    """`--allowed-origins` entries -> normalized origins; None for "*" (any origin). A ValueError
    names an entry that is not an origin."""
    out = []
    for entry in origins:
        if entry.strip() == "*":
            return None
        o = _origin(entry)
        if o is None:
            raise ValueError(f"allowed origin {entry!r} is not an origin: give scheme://host[:port]"
                             f" (e.g. https://app.example.com or http://localhost:3000), or *")
        out.append(o)
    return tuple(out)


def cors_origins(allowed: tuple[tuple[str, str, int], ...] | None) -> list[str]:
    """`parse_origins`' result as the Origin headers a browser sends (the scheme's default port
    left out), for the CORS middleware; ["*"] for any."""
    if allowed is None:
        return ["*"]
    out = []
    for scheme, host, port in allowed:
        name = f"[{host}]" if ":" in host else host
        out.append(f"{scheme}://{name}" + ("" if port == (443 if scheme == "https" else 80)
                                          else f":{port}"))
    return out


class BrowserGuard:
    """ASGI middleware for what a web page can make a browser send (the server may hold an API
    key, or none when it listens on loopback only):
      - DNS rebinding: on a loopback connection the Host header must be a loopback name with the
        server's port (or the host of an allowed origin, for a proxy in front), else 421;
      - a WebSocket handshake with an Origin that is neither allowed nor the server's own is
        refused (403);
      - a POST to a JSON endpoint with another content type (text/plain, a form: what a page can
        send cross-site without a CORS preflight) is 415 unless its Origin is allowed; a request
        with no content type and no Origin (a script) passes;
      - any other POST (the multipart voice upload) with an Origin not allowed is 403."""

    def __init__(self, app, allowed_origins=()):
        self.app = app
        self.allowed = parse_origins(allowed_origins)          # None: any
        self.hosts = {(h, p) for _, h, p in self.allowed or ()}

    def _origin_ok(self, origin: str, host: str | None) -> bool:
        o = _origin(origin)
        if o is None:
            return False
        if self.allowed is None or o in self.allowed:
            return True
        return host is not None and _host_port(host, o[2]) == o[1:]      # same origin

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        host, origin = headers.get("host"), headers.get("origin")
        local = scope.get("server") or (None, None)
        if host is not None and local[1] and isinstance(local[0], str) and _loopback(local[0]):
            default = 443 if scope.get("scheme") in ("https", "wss") else 80
            name, port = _host_port(host, default)
            if not ((_loopback(name) and port == local[1]) or (name, port) in self.hosts):
                return await _refuse(
                    scope, receive, send, 421, f"this server answers to localhost:{local[1]} "
                    f"(it listens on loopback), not to Host {host[:100]!r}; a proxy in front "
                    "must pass the Host through or be listed in --allowed-origins",
                    "host_not_allowed")
        if scope["type"] == "websocket":
            if origin is not None and not self._origin_ok(origin, host):
                return await _refuse(scope, receive, send, 403, "", "origin_not_allowed")
        elif scope["method"] == "POST":
            allowed = origin is not None and self._origin_ok(origin, host)
            if scope["path"] in JSON_PATHS:
                kind = (headers.get("content-type") or "").split(";")[0].strip().lower()
                is_json = kind == "application/json" or kind.endswith("+json")
                if not is_json and (kind or origin is not None) and not allowed:
                    return await _refuse(
                        scope, receive, send, 415, f"{scope['path']} takes a JSON body: send "
                        f"`Content-Type: application/json` (got {kind[:80] or 'none'!r}; from a "
                        "browser page, other content types need its origin in "
                        "--allowed-origins)", "unsupported_media_type")
            elif origin is not None and not allowed:
                return await _refuse(
                    scope, receive, send, 403, f"requests from the web origin {origin[:100]!r} "
                    "are not allowed here (--allowed-origins)", "origin_not_allowed")
        await self.app(scope, receive, send)


class RedactApiKey(logging.Filter):
    """Log filter: `api_key=...` in a logged path (uvicorn's access lines and WebSocket lines
    print the query string) becomes `api_key=[redacted]`."""
    PATTERN = re.compile(r"(api_key=)[^&\s\"']*", re.IGNORECASE)

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(self.PATTERN.sub(r"\1[redacted]", a) if isinstance(a, str)
                                else a for a in record.args)
        if isinstance(record.msg, str):
            record.msg = self.PATTERN.sub(r"\1[redacted]", record.msg)
        return True


def redact_api_keys_in_logs() -> None:
    """Install `RedactApiKey` on uvicorn's loggers (once)."""
    for name in ("uvicorn.access", "uvicorn.error"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactApiKey) for f in logger.filters):
            logger.addFilter(RedactApiKey())
