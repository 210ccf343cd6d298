"""``shoal.install_as_modal()``: code written for Modal runs on shoal with its ``import modal`` lines as they are."""

from __future__ import annotations

import importlib
import sys

from shoal.exception import InvalidError

MODAL_MODULES = (
    "app",
    "config",
    "container_process",
    "exception",
    "experimental",
    "file_io",
    "file_pattern_matcher",
    "image",
    "io_streams",
    "output",
    "sandbox",
    "secret",
    "snapshot",
    "stream_type",
    "types",
    "volume",
)
"""The ``modal.<module>`` names that shoal serves, each by its own module of the same name."""


def install_as_modal() -> None:
    """Make ``import modal`` and ``import modal.<module>`` give shoal and its modules.

    Call it before anything imports ``modal`` (for example first thing in ``main``); each module is registered
    once, so identities hold: ``modal.exception.NotFoundError is shoal.exception.NotFoundError``, and an
    ``except modal.exception.NotFoundError`` catches shoal's own error.  A ``modal.<module>`` that shoal does
    not have is a ``ModuleNotFoundError``.

    Examples:
        import shoal
        shoal.install_as_modal()
        import modal                      # shoal
        from modal.container_process import ContainerProcess
    """
    shoal = importlib.import_module("shoal")
    present = sys.modules.get("modal")
    if present is not None and present is not shoal:
        where = getattr(present, "__file__", None) or repr(present)
        raise InvalidError(
            f"a module named modal is already imported ({where}): call shoal.install_as_modal() before anything"
            " imports modal, or uninstall the modal package"
        )
    sys.modules["modal"] = shoal
    for name in MODAL_MODULES:
        sys.modules[f"modal.{name}"] = importlib.import_module(f"shoal.{name}")
