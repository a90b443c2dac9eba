"""Errors in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, for every failure:
a body that does not validate is a 400 naming the field (never FastAPI's 422), an unknown route
a 404, and an unexpected exception a 500 that is logged, never a traceback to the client."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

log = logging.getLogger(__name__)

TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
         405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
         503: "service_unavailable_error"}  # fmt: skip


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers

    def body(self) -> dict:
        kind = TYPES.get(
            self.status, "server_error" if self.status >= 500 else "invalid_request_error"
        )
        return {"error": {"message": self.message, "type": kind, "param": self.param,
                          "code": self.code}}  # fmt: skip

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """The first problem of a body that did not validate, as (message, param)."""
    errors = exc.errors()
    if not errors:
        return "the request body is invalid", None
    e = errors[0]
    if e.get("type") == "json_invalid":
        return f"the body is not valid JSON: {e.get('ctx', {}).get('error', e.get('msg'))}", None
    loc = [str(p) for p in e.get("loc", ()) if p != "body"]
    # union members show up as an extra path element (`str`, `list[...]`): keep the field path
    path = [p for p in loc if not (p[:1].islower() and ("[" in p or p in _TYPE_NAMES))]
    param = ".".join(path) or None
    msg = e.get("msg", "invalid value")
    if e.get("type") == "missing":
        return f"{param}: this field is required", param
    if param is None:
        return f"the request body is invalid: {msg}", None
    return f"{param}: {msg}", param


_TYPE_NAMES = {"str", "int", "float", "bool", "dict", "list", "function-after", "function-plain"}


def install(app: FastAPI) -> None:
    """Exception handlers that answer every error in OpenAI's shape."""

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = validation_message(exc)
        return APIError(400, message, param).response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        else:
            message = str(exc.detail)
        return APIError(exc.status_code, message, headers=exc.headers).response()

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("%s %s failed", request.method, request.url.path)
        return APIError(500, f"internal error: {type(exc).__name__}: {exc}").response()
