"""The one error shape every endpoint answers with: {"error": {"message", "type", "param", "code"}} (OpenAI's)."""
from __future__ import annotations

import re
from enum import Enum

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

_FIELD_PREFIX = re.compile(r"^([A-Za-z_][A-Za-z0-9_.\[\]]*): ")


class ErrorType(Enum):
    INVALID_REQUEST = "invalid_request_error"
    AUTHENTICATION = "authentication_error"
    RATE_LIMIT = "rate_limit_error"
    UNAVAILABLE = "service_unavailable_error"
    SERVER = "server_error"


class ApiError(Exception):
    def __init__(self, status: int, message: str, type: ErrorType = ErrorType.INVALID_REQUEST,
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type.value, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def bad_request(message: str, code: str = "invalid_value") -> ApiError:
    """A 400 whose param is the field the message starts with ("max_tokens: must be ..." -> "max_tokens")."""
    m = _FIELD_PREFIX.match(message)
    return ApiError(400, message, param=m.group(1) if m else None, code=code)


def from_validation_error(e: ValidationError | RequestValidationError) -> ApiError:
    """First pydantic error as a 400 naming the field (loc), with pydantic's message."""
    err = e.errors()[0]
    loc = [str(x) for x in err.get("loc", ()) if x != "body"]
    msg = str(err.get("msg", "invalid request")).removeprefix("Value error, ")
    if err.get("type") == "json_invalid":
        return ApiError(400, f"request body is not valid JSON: {msg}", code="invalid_json")
    if not loc:
        return bad_request(msg)
    return ApiError(400, f"{'.'.join(loc)}: {msg}", param=loc[0], code=str(err.get("type", "invalid_value")))


def install_error_handlers(app: FastAPI) -> None:
    """Route-level failures (unknown path, wrong method, FastAPI's own validation) in the same shape."""

    async def on_api_error(_: Request, e: ApiError) -> JSONResponse:
        return e.response()

    async def on_validation(_: Request, e: RequestValidationError) -> JSONResponse:
        return from_validation_error(e).response()

    async def on_http(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return ApiError(e.status_code, str(e.detail), code=str(e.status_code)).response()

    async def on_unexpected(_: Request, e: Exception) -> JSONResponse:
        return ApiError(500, f"internal error: {type(e).__name__}", ErrorType.SERVER).response()

    app.add_exception_handler(ApiError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(Exception, on_unexpected)
