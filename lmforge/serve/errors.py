"""Errors in the OpenAI shape: {"error": {"message", "type", "param", "code"}} with the right status.

Bad input is always a 4xx naming the field; an unexpected failure is a 500 with a generic message
(the traceback goes to the server log, never to the client).
"""

from __future__ import annotations

import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmforge.errors import InputError, LMForgeError, UnsupportedError

logger = logging.getLogger("lmforge.serve")

class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error_body(error.message, error.type, error.param, error.code), status_code=error.status,
                        headers=error.headers)


def from_lmforge_error(exc: LMForgeError) -> APIError:
    """A library error caused by the request (bad sampling value, prompt too long, ...) → 400."""
    message = str(exc)
    field = re.match(r"(?:SamplingParams|EngineConfig)\.(\w+)", message)  # the request field names match
    param = field[1] if field else None
    if isinstance(exc, UnsupportedError):
        return APIError(400, message, param=param, code="unsupported")
    if isinstance(exc, InputError) and "max_model_len" in message:
        return APIError(400, message, param="messages", code="context_length_exceeded")
    return APIError(400, message, param=param)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(LMForgeError)
    async def library_error(request: Request, exc: LMForgeError) -> JSONResponse:
        return error_response(from_lmforge_error(exc))

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        # The body's field path, without pydantic's union-member labels such as "str" or "list[int]".
        location = [str(part) for part in first.get("loc", ())
                    if part != "body" and not re.fullmatch(r"(str|int|float|bool|list|dict)(\[.*\])?", str(part))]
        param = ".".join(location) or None
        message = f"{param}: {first.get('msg', 'invalid value')}" if param else first.get("msg", "invalid request body")
        return error_response(APIError(400, message, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        message = f"no route {request.method} {request.url.path}" if exc.status_code == 404 else str(exc.detail)
        return error_response(APIError(exc.status_code, message, type=kind))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unexpected error serving %s %s", request.method, request.url.path)
        return error_response(APIError(500, "internal server error; see the server log", type="server_error"))
