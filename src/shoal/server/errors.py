"""The server's side of the error boundary: exception class → HTTP status.

Error bodies are ``{"error": {"type": "<class name>", "message": "..."}}``; the
client maps the type name back to the same class (``shoal.sdk.transport``).
"""

from __future__ import annotations

import json

from shoal import exception as exc

STATUS: dict[type[exc.Error], int] = {
    exc.InvalidError: 400,
    exc.AuthError: 401,
    exc.PermissionDeniedError: 403,
    exc.NotFoundError: 404,
    exc.AlreadyExistsError: 409,
    exc.ConflictError: 409,
    exc.ResourceExhaustedError: 429,
    exc.UnimplementedError: 501,
    exc.ServiceError: 503,
    exc.TimeoutError: 504,
}


HTTP_ERRORS: dict[int, type[exc.Error]] = {
    400: exc.InvalidError,
    401: exc.AuthError,
    403: exc.PermissionDeniedError,
    404: exc.NotFoundError,
    405: exc.InvalidError,
    409: exc.ConflictError,
    411: exc.InvalidError,
    413: exc.InvalidError,
    415: exc.InvalidError,
    429: exc.ResourceExhaustedError,
}
"""For aiohttp's own refusals (no such route, wrong method, body too large): the shoal class that names them
in the error body.  Their HTTP status stays as aiohttp chose it."""


def from_http(status: int, reason: str) -> exc.Error:
    """The shoal exception for an HTTP error the server framework raised (a 4xx; anything else is internal)."""
    cls = HTTP_ERRORS.get(status, exc.InvalidError if 400 <= status < 500 else exc.InternalError)
    return cls(reason)


def status_for(error: exc.Error) -> int:
    """The HTTP status for a shoal exception (most specific class wins)."""
    for cls in type(error).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500


def body_for(error: BaseException) -> dict[str, dict[str, str]]:
    """The JSON error body."""
    name = type(error).__name__ if isinstance(error, exc.Error) else "InternalError"
    return {"error": {"type": name, "message": str(error)}}


def from_body(status: int, body: bytes) -> exc.Error:
    """The shoal exception another node's error answer carries (a call this node made in the cluster)."""
    try:
        err = json.loads(body)["error"]
        name, message = str(err["type"]), str(err["message"])
    except (ValueError, KeyError, TypeError):
        name, message = "", body.decode(errors="replace")[:500] or f"HTTP {status}"
    return (exc.ERRORS.get(name) or from_http(status, "").__class__)(message)
