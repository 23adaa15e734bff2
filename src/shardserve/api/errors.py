"""Errors as both protocols shape them: OpenAI's ``{"error": {...}}`` under ``/v1`` and the Open
Inference Protocol's ``{"error": "..."}`` under ``/v2``. Messages never echo request input."""

from __future__ import annotations

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 403: "PermissionDeniedError",
          404: "NotFoundError", 408: "RequestTimeout", 413: "RequestTooLarge",
          415: "UnsupportedMediaType", 429: "RateLimitError", 500: "InternalServerError",
          503: "ServiceUnavailableError", 504: "GatewayTimeout"}


class APIError(HTTPException):
    """An error answer. An ``HTTPException`` so that it also passes FastAPI's body parsing
    unchanged (raised from ``receive`` by the request guard)."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(status, message, headers)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_body(path: str, status: int, message: str, param: str | None = None,
               code: str | None = None) -> dict:
    if path.startswith("/v2"):  # one string: it must name the field itself
        named = param is None or message.startswith(param) or f" {param} " in f" {message} "
        return {"error": message if named else f"{param}: {message}"}
    return {"error": {"message": message, "type": _TYPES.get(status, "APIError"),
                      "param": param, "code": code}}


def error_response(request: Request, status: int, message: str, param: str | None = None,
                   code: str | None = None, headers: dict[str, str] | None = None
                   ) -> JSONResponse:
    return JSONResponse(error_body(request.url.path, status, message, param, code),
                        status_code=status, headers=headers)


async def api_error_handler(request: Request, exc: APIError) -> JSONResponse:
    return error_response(request, exc.status, exc.message, exc.param, exc.code, exc.headers)


def invalid_body(errors: list) -> APIError:
    """A 400 naming the first field pydantic refused (``errors()`` of a validation error)."""
    first = errors[0] if errors else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    field = ".".join(loc) or None
    return APIError(400, f"invalid field {field!r}: {first.get('msg', 'invalid')}" if field
                    else "request body is not valid JSON of the expected shape", field,
                    "invalid_request")


async def validation_handler(request: Request, exc: RequestValidationError) -> JSONResponse:
    e = invalid_body(exc.errors())
    return error_response(request, e.status, e.message, e.param, e.code)
