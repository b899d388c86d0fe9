"""Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}` with the HTTP
status; `ApiError` raised anywhere in a route becomes one."""
from __future__ import annotations

from fastapi.responses import JSONResponse


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers


def error_type(status: int) -> str:
    return {400: "invalid_request_error", 401: "invalid_request_error", 403: "permission_error",
            404: "not_found_error", 409: "conflict_error", 413: "request_too_large",
            415: "invalid_request_error", 421: "invalid_request_error", 429: "rate_limit_error",
            504: "timeout_error"}.get(status, "server_error")


def error_body(status: int, message: str, param=None, code=None) -> dict:
    return {"message": message, "type": error_type(status), "param": param, "code": code}


def error_response(status: int, message: str, param=None, code=None, headers=None):
    return JSONResponse({"error": error_body(status, message, param, code)},
                        status_code=status, headers=headers)
