"""The one place where exceptions become HTTP responses: always JSON {"code", "message"}."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import OperationalError, ProgrammingError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from retrieval.catalog.schema import one_line
from retrieval.errors import (
    BadQuery,
    CatalogMismatch,
    CatalogSchemaMismatch,
    CatalogUnreadable,
    ClipsearchError,
    ConfigError,
    CorruptShard,
    EmptyIndex,
    ImageError,
    LabelSetError,
    ModelMismatch,
    NotFound,
    PathNotAllowed,
    WeightsUnavailable,
)
from retrieval.images import ALLOWED_FORMATS

log = logging.getLogger(__name__)

# Domain exception -> HTTP status. The first matching class wins (subclasses first).
STATUS: list[tuple[type[ClipsearchError], int]] = [
    (BadQuery, 400),
    (ImageError, 422),
    (LabelSetError, 422),
    (NotFound, 404),
    (PathNotAllowed, 403),
    (EmptyIndex, 503),
    (ModelMismatch, 503),
    (CorruptShard, 503),
    (CatalogMismatch, 503),
    (CatalogSchemaMismatch, 503),
    (CatalogUnreadable, 503),
    (WeightsUnavailable, 503),
    (ConfigError, 500),
]
# ImageError reasons that mean "the upload is too big", not "the upload is broken".
_TOO_LARGE_REASONS = frozenset({"too_large"})

_HTTP_CODES = {
    400: "invalid_body",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "too_many_requests",
    503: "unavailable",
}


class ApiError(Exception):
    """An HTTP-level refusal raised by the API itself (auth, limits, readiness)."""

    def __init__(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers


# A message may quote the input: keep it short, and encodable (a lone surrogate is not).
MAX_MESSAGE_CHARS = 2000


def error_body(code: str, message: str) -> dict[str, str]:
    text = message.encode("utf-8", "backslashreplace").decode("utf-8")
    if len(text) > MAX_MESSAGE_CHARS:
        text = text[:MAX_MESSAGE_CHARS] + "..."
    return {"code": code, "message": text}


def _json(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(error_body(code, message), status_code=status, headers=headers)


# What a person is told about a picture the decoder refused (the page shows it as it is):
# no reason codes, library or exception names; the stable reason is in the error's code.
_IMAGE_MESSAGES = {
    "empty": "The file is empty.",
    "truncated": "The file is cut short: the picture's data ends early (an incomplete download "
    "or copy?).",
    "not_an_image": "The file is not a picture, or not in a format this server reads ({allowed}).",
    "unsupported_format": "{detail}.",
    "too_large": "The picture is too large to decode here: {detail}.",
    "decode_failed": "The picture could not be decoded: its data is damaged, or it uses a "
    "feature of its format that this server cannot decode.",
    "unreadable": "The file could not be read.",
}


def image_message(exc: ImageError) -> str:
    """The sentence for a refused picture: what is wrong with it, in a user's words."""
    template = _IMAGE_MESSAGES.get(exc.reason, "The picture could not be read.")
    allowed = ", ".join(sorted(ALLOWED_FORMATS))
    return template.format(detail=exc.detail, allowed=allowed)


def domain_status(exc: ClipsearchError) -> tuple[int, str]:
    if isinstance(exc, ImageError):
        # The reason is the stable, more useful code for clients ("truncated", ...).
        return (413 if exc.reason in _TOO_LARGE_REASONS else 422), f"image_{exc.reason}"
    status = next((s for cls, s in STATUS if isinstance(exc, cls)), 500)
    return status, exc.code


async def _domain(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ClipsearchError)
    status, code = domain_status(exc)
    if status >= 500:
        log.error("service error: %s", exc)
    message = image_message(exc) if isinstance(exc, ImageError) else str(exc)
    return _json(status, code, message)


async def _api(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return _json(exc.status, exc.code, exc.message, exc.headers)


async def _http(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
    return _json(exc.status_code, code, message, getattr(exc, "headers", None))


async def _validation(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    parts = []
    for error in exc.errors()[:5]:
        where = ".".join(str(p) for p in error.get("loc", ()) if p != "body") or "body"
        parts.append(f"{where}: {error.get('msg', 'invalid')}")
    return _json(422, "validation_error", "; ".join(parts) or "invalid request")


async def _database(_: Request, exc: Exception) -> JSONResponse:
    # The catalog went away or broke under a request (deleted, reset, locked, unreachable): the
    # generation poller turns the server unready and says why; this request gets a 503 and the
    # log one line, not a traceback per request.
    message = f"The catalog cannot be read: {one_line(exc)}"
    log.warning("%s", message)
    return _json(503, "catalog_unreadable", message)


async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error", exc_info=exc)
    return _json(500, "internal_error", "Internal server error; see the server log.")


class UnexpectedErrors:
    """Pure ASGI middleware: an exception that escapes a route becomes a logged JSON 500, and
    the connection stays open.

    Starlette's own outermost handler answers too, but then re-raises, and uvicorn drops the
    keep-alive connection of a request that raised. A response already started cannot be
    replaced: that exception goes on, and the server closes the connection.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            if started:
                raise
            response = await _unexpected(Request(scope), exc)
            await response(scope, receive, send)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ClipsearchError, _domain)
    app.add_exception_handler(ApiError, _api)
    app.add_exception_handler(StarletteHTTPException, _http)
    app.add_exception_handler(RequestValidationError, _validation)
    for database_error in (OperationalError, ProgrammingError):
        app.add_exception_handler(database_error, _database)
    app.add_exception_handler(Exception, _unexpected)
    # Added before any other middleware, so the innermost: the others (metrics) see its 500.
    app.add_middleware(UnexpectedErrors)
