"""The lines of the image resolve stream (``POST /v1/images/resolve``), beyond plain log lines.

Each line is one JSON object:

* ``{"log": "..."}``: a line of build output;
* ``{"step": {"index", "total", "label", "status", "seconds"?}}``: a build step's progress,
  status ``cached`` | ``building`` | ``built`` | ``done`` | ``failed``;
* last, one of ``{"image_id": ..., "python": ...}``,
  ``{"missing_contexts": [digest, ...]}`` (upload those with ``PUT /v1/image-store/contexts/{digest}``
  and ask again), or ``{"error": {"type", "message", "image_id"?}}``.
"""

from __future__ import annotations

from typing import Any

from shoal.exception import ImageBuildError
from shoal.images.builder import MissingContexts, Progress
from shoal.server import errors


def line_for(item: str) -> dict[str, Any]:
    """The stream line for one item the builder logged."""
    if isinstance(item, Progress):
        return {"step": item.event}
    return {"log": item}


def final_for_error(exc: BaseException) -> dict[str, Any]:
    """The last line of a resolve that did not produce an image."""
    if isinstance(exc, MissingContexts):
        return {"missing_contexts": exc.contexts}
    body: dict[str, Any] = errors.body_for(exc)
    if isinstance(exc, ImageBuildError) and exc.image_id:
        body["error"]["image_id"] = exc.image_id
    return body
