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


async def validation_handler(request: Request, exc: RequestValidationError) -> JSONResponse:
    if request.headers.get("inference-header-content-length"):
        return error_response(request, 400, "the binary tensor extension is not supported; "
                                            "send JSON tensors (binary_data=False)")
    first = exc.errors()[0] if exc.errors() else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    field = ".".join(loc) or None
    return error_response(request, 400, f"invalid field {field!r}: {first.get('msg', 'invalid')}"
                          if field else "request body is not valid JSON of the expected shape",
                          field, "invalid_request")
