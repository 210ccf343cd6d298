"""Modal's ``modal.config``: ``config.get(key)``, ``config[key]``, ``config.override_locally(key, value)``,
``config.to_dict()``, for code written for Modal that reads its settings.

A setting is ``MODAL_<KEY>`` from the environment, else its default; shoal has no ``~/.modal.toml`` and one
profile (``_profile``: ``MODAL_PROFILE`` or ``"default"``).  ``server_url`` defaults to where this SDK reaches
its daemon (``SHOAL_URL``, or ``unix://`` and the socket path).  shoal itself is configured with ``SHOAL_*``
variables (``shoal.sdk.config``); of these settings it only reports, never acts on, the ``MODAL_`` ones.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any, NamedTuple

from shoal.exception import InvalidError
from shoal.sdk.config import ClientConfig

__all__ = ["Config", "config", "config_profiles", "logger"]


def _bool(value: str) -> bool:
    return value.strip().lower() not in ("", "0", "false", "no", "off")


def _server_url() -> str:
    client = ClientConfig()
    return client.url or f"unix://{client.socket_path}"


class _Setting(NamedTuple):
    default: Any = None
    transform: Callable[[str], Any] = str


_SETTINGS: dict[str, _Setting] = {
    "server_url": _Setting(None),
    "token_id": _Setting(),
    "token_secret": _Setting(),
    "loglevel": _Setting("WARNING", str.upper),
    "log_format": _Setting("STRING", str.upper),
    "log_pattern": _Setting(),
    "environment": _Setting(),
    "dev_suffix": _Setting(""),
    "traceback": _Setting(False, _bool),
    "build_validation": _Setting("error"),
    "image_builder_version": _Setting(),
    "force_build": _Setting(False, _bool),
    "ignore_cache": _Setting(False, _bool),
    "disable_api_proxy": _Setting(False, _bool),
    "sandbox_v2": _Setting(True, _bool),
    "payload_format": _Setting("pickle"),
    "max_throttle_wait": _Setting(None, lambda v: int(v) if v else None),
    "logs_timeout": _Setting(10.0, float),
    "serve_timeout": _Setting(None, float),
    "sandbox_channel_idle_timeout": _Setting(30.0, float),
    "volume_block_read_timeout": _Setting(60.0, float),
}

_profile = os.environ.get("MODAL_PROFILE") or "default"


class Config:
    """The process-wide settings object (``modal.config.config``)."""

    def get(self, key: str, *, profile: str | None = None, use_env: bool = True) -> Any:
        """A setting's value: ``MODAL_<KEY>`` (when ``use_env``), else its default; KeyError for an unknown key."""
        setting = _SETTINGS[key]
        name = f"MODAL_{key.upper()}"
        if use_env and name in os.environ:
            try:
                return setting.transform(os.environ[name])
            except ValueError as exc:
                raise InvalidError(f"Invalid value for {key} config ({os.environ[name]!r}): {exc}") from None
        if key == "server_url":
            return _server_url()
        return setting.default

    def override_locally(self, key: str, value: str) -> None:
        """Set a setting for this process (its ``MODAL_<KEY>`` variable); nothing is written to a file."""
        os.environ[f"MODAL_{key.upper()}" if key in _SETTINGS else key.upper()] = value

    def __getitem__(self, key: str) -> Any:
        return self.get(key)

    def __repr__(self) -> str:
        return repr(self.to_dict())

    def to_dict(self, *, include_internal: bool = False) -> dict[str, Any]:
        """Every setting with its current value."""
        return {key: self.get(key) for key in sorted(_SETTINGS)}


config = Config()
logger = logging.getLogger("shoal")


def config_profiles() -> list[str]:
    """The profiles there are: shoal has one."""
    return [_profile]
