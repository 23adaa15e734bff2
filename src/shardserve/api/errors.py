"""Errors as both protocols shape them: OpenAI's ``{"error": {...}}`` under ``/v1`` and the Open
Inference Protocol's ``{"error": "..."}`` under ``/v2``. Messages never echo request input."""

from __future__ import annotations

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

_TYPES = {400: "BadRequestError", 404: "NotFoundError", 413: "RequestTooLarge",
          429: "RateLimitError", 503: "ServiceUnavailableError"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers


def error_body(path: str, status: int, message: str, param: str | None = None,
               code: str | None = None) -> dict:
    if path.startswith("/v2"):
        return {"error": message}
    return {"error": {"message": message, "type": _TYPES.get(status, "APIError"),
                      "param": param, "code": code}}


def error_response(request: Request, status: int, message: str, param: str | None = None,
                   code: str | None = None, headers: dict[str, str] | None = None
                   ) -> JSONResponse:
    return JSONResponse(error_body(request.url.path, status, message, param, code),
                        status_code=status, headers=headers)


async def api_error_handler(request: Request, exc: APIError) -> JSONResponse:
    return error_response(request, exc.status, exc.message, exc.param, exc.code, exc.headers)


async def validation_handler(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    field = ".".join(loc) or None
    return error_response(request, 400, f"invalid field {field!r}: {first.get('msg', 'invalid')}"
                          if field else "request body is not valid JSON of the expected shape",
                          field, "invalid_request")
