"""How the coordinator's API says what went wrong: its error answers and their OpenAPI docs.

Validation errors (422) keep FastAPI's ``detail`` list (without the submitted values: an
answer never echoes what was sent) and add ``message``, one ``"{field}: {why}"`` per
problem, for people and scripts that just print it. A body that is not JSON, or not a JSON
object, is answered with what is wrong and how to send it; a number beyond what the
database stores is a 422, not a 500. :func:`add_error_handlers` installs all of this on
an application; :func:`field_error` and :func:`not_found` are for the routes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final, NoReturn

from fastapi import FastAPI, HTTPException, Request, status
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

__all__ = [
    "RESPONSES_401",
    "RESPONSES_403",
    "RESPONSES_404",
    "Responses",
    "add_error_handlers",
    "exception_reason",
    "field_error",
    "not_found",
]

# The OpenAPI descriptions of the answers most routes share.
Responses = dict[int | str, dict[str, Any]]
RESPONSES_401: Final[Responses] = {401: {"description": "Missing or unknown API token"}}
RESPONSES_403: Final[Responses] = {403: {"description": "The user's role may not do this"}}
RESPONSES_404: Final[Responses] = {404: {"description": "No such object"}}

_LOC_PREFIXES: Final = frozenset({"body", "query", "path", "header", "cookie"})


def _field_name(loc: Sequence[Any]) -> str:
    parts = [str(p) for p in loc]
    if parts and parts[0] in _LOC_PREFIXES:
        parts = parts[1:]
    return ".".join(parts) or "body"


def _json_error(error: dict[str, Any], document: Any) -> dict[str, Any]:
    """FastAPI's "JSON decode error" (``loc`` ends in a character offset) said plainly."""
    loc = error.get("loc", ())
    pos = loc[1] if len(loc) > 1 and isinstance(loc[1], int) else 0
    doc = document if isinstance(document, str) else ""
    line = doc.count("\n", 0, pos) + 1
    column = pos - (doc.rfind("\n", 0, pos) + 1) + 1
    why = (error.get("ctx") or {}).get("error", "")
    return {"type": "json_invalid", "loc": ["body"],
            "msg": f"the request body is not valid JSON (line {line}, column {column}): {why}"}


def _not_an_object(error: dict[str, Any], request: Request) -> dict[str, Any] | None:
    """The body as a whole is missing or not a JSON object: say so, and how to send one."""
    kind = error.get("type")
    if (tuple(error.get("loc", ())) != ("body",)
            or kind not in ("missing", "model_attributes_type", "dict_type")):
        return None
    if kind == "missing":
        why = "the request body is missing: send a JSON object"
    elif "json" in request.headers.get("content-type", "").lower():
        why = "the request body must be a JSON object ({...})"
    else:  # FastAPI hands a body not sent as JSON to the model as raw bytes
        why = "the request body must be a JSON object sent with 'Content-Type: application/json'"
    return {"type": kind, "loc": ["body"], "msg": why}


def _public_error(error: dict[str, Any]) -> dict[str, Any]:
    # Never echo ``input``: a 50 MB field would come back as a 50 MB answer, and a password
    # sent in the wrong field would be written back. ``ctx`` keeps only plain values (limits
    # like ``max_length``); the reason is in ``msg`` anyway.
    out: dict[str, Any] = {"type": error.get("type", ""), "loc": list(error.get("loc", ())),
                           "msg": error.get("msg", "")}
    ctx = {k: v for k, v in (error.get("ctx") or {}).items()
           if isinstance(v, (str, int, float, bool)) or v is None}
    if ctx:
        out["ctx"] = ctx
    return out


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors: list[dict[str, Any]] = []
    for error in exc.errors():
        if error.get("type") == "json_invalid":
            errors.append(_json_error(error, exc.body))
        else:
            errors.append(_not_an_object(error, request) or _public_error(error))
    message = "; ".join(f"{_field_name(e['loc'])}: {e['msg']}" for e in errors)
    return JSONResponse(
        status_code=status.HTTP_422_UNPROCESSABLE_CONTENT,
        content={"detail": jsonable_encoder(errors), "message": message},
    )


_UNREADABLE_BODY: Final = "There was an error parsing the body"  # FastAPI's words


async def _http_error(request: Request, exc: Exception) -> Response:
    # FastAPI answers 400 with only _UNREADABLE_BODY when reading a JSON body fails other
    # than by a syntax error; the cause (chained) says what was wrong with it.
    assert isinstance(exc, StarletteHTTPException)
    cause = exc.__cause__
    if exc.status_code == 400 and exc.detail == _UNREADABLE_BODY and cause is not None:
        if isinstance(cause, UnicodeDecodeError):
            why = "it is not UTF-8 text"
        elif isinstance(cause, ValueError) and "digits" in str(cause):
            why = "a number in it has more than 4300 digits"
        else:
            why = type(cause).__name__
        exc = StarletteHTTPException(400, f"the request body is not valid JSON: {why}",
                                     headers=exc.headers)
    return await http_exception_handler(request, exc)


def field_error(field: str, message: str) -> NoReturn:
    """Reject a request body field after parsing, in the same shape as FastAPI's own 422."""
    raise RequestValidationError([{"type": "value_error", "loc": ("body", field), "msg": message}])


def not_found(what: str) -> NoReturn:
    raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"{what} not found")


def exception_reason(exc: BaseException) -> str:
    """``"Type: message"`` of an exception from a boundary (Flower, a launcher), for an answer
    or the audit log."""
    text_ = str(exc).strip()
    return f"{type(exc).__name__}: {text_}" if text_ else type(exc).__name__


async def _out_of_range(_request: Request, _exc: Exception) -> JSONResponse:
    # An id or number in the path or query beyond what the database stores (found by
    # fuzzing: 2**63 reached SQLite and answered 500).
    message = "a number in the request is out of range: ids and counts are below 2**63"
    return JSONResponse(status_code=422, content={
        "detail": [{"loc": ["path"], "msg": message, "type": "value_error.number"}],
        "message": message})


def add_error_handlers(app: FastAPI) -> None:
    """Answer validation errors, unreadable bodies and out-of-range numbers as above."""
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(OverflowError, _out_of_range)
