"""Errors in OpenAI's shape, for every way a request can go wrong, and the body-size
limit that refuses an oversized request before anything parses it."""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from cluster.api_models import ErrorResponse

log = logging.getLogger(__name__)
RETRY_AFTER_S = 1
# The statuses the API answers besides 200, documented on every route.
ERROR_STATUSES = {400: "Invalid request", 401: "Missing or wrong API key", 404: "Unknown model",
                  413: "Request body too large", 500: "Internal error", 503: "Overloaded or unavailable; retry"}
ERROR_RESPONSES = {code: {"model": ErrorResponse, "description": d} for code, d in ERROR_STATUSES.items()}


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param


def error_body(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": status}}


def error_response(status: int, message: str, type_: str = "invalid_request_error",
                   param: str | None = None, headers: dict | None = None) -> JSONResponse:
    if status == 503:
        headers = {**(headers or {}), "Retry-After": str(RETRY_AFTER_S)}
    return JSONResponse(error_body(status, message, type_, param), status, headers=headers)


def overloaded(message: str) -> APIError:
    return APIError(503, message, "server_overloaded")


def install_error_handlers(app: FastAPI) -> None:
    """Every error the app can raise, in OpenAI's shape (never FastAPI's `{"detail": ...}`)."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError):
        return error_response(e.status, e.message, e.type, e.param)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError):
        errors = e.errors()
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":
            return error_response(400, "the body is not valid JSON", param=None)
        # Union members show in the location ("prompt.constrained-str"): keep field names.
        loc = ".".join(str(x) for x in first.get("loc", ())[1:] if isinstance(x, int) or x.isidentifier()) or None
        msg = first.get("msg", "invalid request")
        return error_response(400, f"invalid request: {loc}: {msg}" if loc else f"invalid request: {msg}", param=loc)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException):
        # Starlette's own refusals: unknown route, wrong method, unreadable body.
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return error_response(e.status_code, str(e.detail), kind, headers=e.headers)   # 405 keeps Allow

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, e: Exception):
        log.exception("unhandled error")
        return error_response(500, f"internal error: {e!r}", "server_error")


class EdgeChecks:
    """ASGI middleware for what is decided before a body is read: the API key on /v1/
    routes (401), overload on the generation routes (503 + Retry-After, so a refusal costs
    no parsing), and the body-size limit (413, by Content-Length when given, else by
    counting chunks as they arrive). Plain ASGI: it adds nothing per streamed chunk."""

    def __init__(self, app, max_bytes: int, api_key: str | None, overloaded, generation_paths: tuple[str, ...]):
        self.app, self.max_bytes, self.overloaded = app, max_bytes, overloaded
        self.authorization = f"Bearer {api_key}".encode() if api_key else None
        self.generation_paths = generation_paths

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"].removeprefix(scope.get("root_path", ""))   # under a Serve route prefix
        headers = dict(scope.get("headers") or ())
        if self.authorization and path.startswith("/v1/") and headers.get(b"authorization") != self.authorization:
            return await _send_error(send, 401, "missing or wrong API key (send 'Authorization: Bearer <key>')",
                                     "authentication_error")
        if scope["method"] == "POST" and path in self.generation_paths and self.overloaded():
            return await _send_error(send, 503, "the server is at its limit of requests in flight; retry later",
                                     "server_overloaded")
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await _send_error(send, 413, self._too_large())
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:       # the app's error handlers answer it
                    raise StarletteHTTPException(413, self._too_large())
            return message

        await self.app(scope, counted, send)

    def _too_large(self) -> str:
        return f"the request body is larger than the limit of {self.max_bytes} bytes (max_body_bytes)"


async def _send_error(send, status: int, message: str, type_: str = "invalid_request_error") -> None:
    body = json.dumps(error_body(status, message, type_)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 503:
        headers.append((b"retry-after", str(RETRY_AFTER_S).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
