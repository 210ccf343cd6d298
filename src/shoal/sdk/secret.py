"""``Secret``: environment variables given to a sandbox and its processes."""

from __future__ import annotations

import os
from pathlib import Path

from shoal.exception import InvalidError, UnimplementedError


class Secret:
    """A set of environment variables.

    Examples:
        sb = shoal.Sandbox.create(secrets=[shoal.Secret.from_dict({"API_KEY": "xxx"})], app=app)
    """

    def __init__(self, env: dict[str, str], *, name: str | None = None) -> None:
        self._env = env
        self._name = name

    def __repr__(self) -> str:
        return f"Secret(keys={sorted(self._env)})" if self._name is None else f"Secret.from_name({self._name!r})"

    @staticmethod
    def from_dict(env_dict: dict[str, str | None] | None = None) -> Secret:
        """A secret from a dict (``None`` values are dropped)."""
        env_dict = env_dict or {}
        if not isinstance(env_dict, dict):
            raise InvalidError("Secret.from_dict expects a dict of str to str")
        out: dict[str, str] = {}
        for k, v in env_dict.items():
            if v is None:
                continue
            if not isinstance(k, str) or not isinstance(v, str):
                raise InvalidError(f"Secret.from_dict values must be str (or None); {k!r} has {type(v).__name__}")
            out[k] = v
        return Secret(out)

    @staticmethod
    def from_local_environ(env_keys: list[str]) -> Secret:
        """A secret copied from this process's environment."""
        missing = [k for k in env_keys if k not in os.environ]
        if missing:
            raise InvalidError(f"Secret.from_local_environ: not set in the local environment: {', '.join(missing)}")
        return Secret({k: os.environ[k] for k in env_keys})

    @staticmethod
    def from_dotenv(path: str | os.PathLike[str] | None = None, *, filename: str = ".env") -> Secret:
        """A secret from a ``.env`` file: ``path``'s directory (or the cwd) and its parents are searched."""
        start = Path(path) if path is not None else Path.cwd()
        if start.is_file():
            start = start.parent
        for d in [start, *start.parents]:
            candidate = d / filename
            if candidate.is_file():
                return Secret(_parse_dotenv(candidate.read_text()))
        return Secret({})

    @staticmethod
    def from_name(name: str, *, environment_name: str | None = None, required_keys: list[str] | None = None) -> Secret:
        """A named secret stored by the daemon."""
        raise UnimplementedError("named secrets (Secret.from_name) are not supported by this shoal version yet")

    def _as_env(self) -> dict[str, str]:
        return dict(self._env)


def _parse_dotenv(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        line = line.removeprefix("export ").strip()
        key, sep, value = line.partition("=")
        if not sep:
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
            if raw.strip().split("=", 1)[1].strip().startswith('"'):
                value = value.encode().decode("unicode_escape")
        elif " #" in value:
            value = value.split(" #", 1)[0].rstrip()
        out[key.strip()] = value
    return out
