"""Build steps and the cache keys that name their results (pure: no I/O, used by the SDK and the daemon).

An image is a base (``debian_slim``, an image id, …) and a list of steps.  A
step either adds a layer (``run``, ``copy``, and the daemon's own
``host_cas``), or only changes the config (``env``, ``cmd``, ``entrypoint``,
``user``); ``workdir`` changes the config and adds a layer only when the
directory has to be created.

Cache keys::

    key(step) = sha256(KEY_VERSION, digest(parent config), content(step))

The parent config holds the parent's layer ids, env, workdir and user, so a
step is rebuilt when anything it could see changed, and every step after a
rebuilt one is rebuilt too (its parent config names a new layer).  A step's
content is its validated wire form less ``force_build`` and the *values* of
its secrets: secrets never reach the key or the image table, so a changed
secret value does not invalidate the cache (``force_build=True`` does).
Local files enter the key as the digest of their manifest (paths, modes,
sizes, content hashes: :mod:`shoal.images.context`).

Image ids are content addresses too: ``im-`` + the digest of the config.
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
from collections.abc import Iterable
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from shoal.exception import InvalidError
from shoal.wire import ids
from shoal.wire.image_config import ImageConfig

KEY_VERSION = 1
"""Bump to invalidate every cached build step (when what a step produces changes)."""
SHELL = ["/bin/sh", "-c"]
ENV_NAME_RE = re.compile(r"\A[A-Za-z_][A-Za-z0-9_]*\Z")
DIGEST_RE = re.compile(r"\A[0-9a-f]{64}\Z")
CHOWN_RE = re.compile(r"\A[0-9]{1,5}(:[0-9]{1,5})?\Z")
MAX_ID = 65535
"""Highest uid/gid inside a sandbox (its user namespace maps 65,536 ids)."""
MAX_STEPS = 1000
MAX_ARG_BYTES = 1 << 16


def _check_env(env: dict[str, str]) -> dict[str, str]:
    for k, v in env.items():
        if not ENV_NAME_RE.match(k):
            raise ValueError(f"invalid environment variable name {k!r}: use letters, digits and _")
        if "\x00" in v:
            raise ValueError(f"environment variable {k} must not contain NUL bytes")
    return env


def _check_argv(argv: list[str], what: str) -> list[str]:
    total = 0
    for a in argv:
        if "\x00" in a:
            raise ValueError(f"{what} must not contain NUL bytes")
        total += len(a.encode()) + 1
    if total > MAX_ARG_BYTES:
        raise ValueError(f"{what} totals {total} bytes; the limit is {MAX_ARG_BYTES}")
    return argv


def _check_path(path: str, what: str) -> str:
    if "\x00" in path or not path or len(path) > 4096:
        raise ValueError(f"{what} must be a non-empty path without NUL bytes, at most 4096 bytes")
    return path


class _Step(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    force_build: bool = False
    """Build this step again even when its result is cached (the new result replaces the cached one)."""


class RunStep(_Step):
    """Run commands in a build sandbox; what they change becomes a layer."""

    op: Literal["run"] = "run"
    commands: Annotated[list[list[str]], Field(min_length=1, max_length=1000)]
    """argv lists, run one after the other; a shell command is ``["/bin/sh", "-c", cmd]``."""
    env: dict[str, str] = {}
    secret_env: dict[str, str] = {}
    """Values of ``Secret.from_dict`` secrets: seen by the commands, never part of the key."""
    secret_ids: Annotated[list[str], Field(max_length=100)] = []
    gpu: Annotated[str, Field(max_length=64)] | None = None

    @field_validator("commands")
    @classmethod
    def _commands(cls, v: list[list[str]]) -> list[list[str]]:
        for argv in v:
            if not argv:
                raise ValueError("a command must not be empty")
            _check_argv(argv, "command")
        return v

    @field_validator("env", "secret_env")
    @classmethod
    def _env(cls, v: dict[str, str]) -> dict[str, str]:
        return _check_env(v)


class CopyStep(_Step):
    """Copy an uploaded tree of local files (a *context*, named by its digest) into ``dest``."""

    op: Literal["copy"] = "copy"
    context: str
    dest: str
    """A directory: absolute, or relative to the image's working directory (Dockerfile COPY)."""
    chmod: Annotated[int, Field(ge=0, le=0o7777)] | None = None
    chown: str | None = None
    """``uid`` or ``uid:gid`` inside the sandbox (numeric)."""

    @field_validator("context")
    @classmethod
    def _context(cls, v: str) -> str:
        if not DIGEST_RE.match(v):
            raise ValueError("context must be a sha256 hex digest")
        return v

    @field_validator("dest")
    @classmethod
    def _dest(cls, v: str) -> str:
        return _check_path(v, "dest")

    @field_validator("chown")
    @classmethod
    def _chown(cls, v: str | None) -> str | None:
        if v is not None and (not CHOWN_RE.match(v) or any(int(x) > MAX_ID for x in v.split(":"))):
            raise ValueError(f"chown must be numeric 'uid' or 'uid:gid' (at most {MAX_ID}), got {v!r}")
        return v


class EnvStep(_Step):
    """Set environment variables (config only)."""

    op: Literal["env"] = "env"
    vars: dict[str, str]

    @field_validator("vars")
    @classmethod
    def _vars(cls, v: dict[str, str]) -> dict[str, str]:
        return _check_env(v)


class WorkdirStep(_Step):
    """Set the working directory of later steps and of sandboxes; created if missing (like WORKDIR)."""

    op: Literal["workdir"] = "workdir"
    path: str

    @field_validator("path")
    @classmethod
    def _path(cls, v: str) -> str:
        return _check_path(v, "workdir")


class CmdStep(_Step):
    """Set the default command (config only)."""

    op: Literal["cmd"] = "cmd"
    argv: list[str]

    @field_validator("argv")
    @classmethod
    def _argv(cls, v: list[str]) -> list[str]:
        return _check_argv(v, "cmd")


class EntrypointStep(_Step):
    """Set the entrypoint (config only)."""

    op: Literal["entrypoint"] = "entrypoint"
    argv: list[str]

    @field_validator("argv")
    @classmethod
    def _argv(cls, v: list[str]) -> list[str]:
        return _check_argv(v, "entrypoint")


class UserStep(_Step):
    """Run later build steps as this user (Dockerfile USER; config only)."""

    op: Literal["user"] = "user"
    user: Annotated[str, Field(min_length=1, max_length=256, pattern=r"^[A-Za-z0-9_.\-]+(:[A-Za-z0-9_.\-]+)?$")]


class HostCasStep(_Step):
    """The daemon's own step: trust the host's extra CA certificates (never accepted from clients)."""

    op: Literal["host_cas"] = "host_cas"
    certs: list[tuple[str, str]]
    """(file name, sha256) of each certificate."""


Step = Annotated[
    RunStep | CopyStep | EnvStep | WorkdirStep | CmdStep | EntrypointStep | UserStep,
    Field(discriminator="op"),
]
"""A step as clients send it."""
AnyStep = RunStep | CopyStep | EnvStep | WorkdirStep | CmdStep | EntrypointStep | UserStep | HostCasStep
CONFIG_ONLY = ("env", "cmd", "entrypoint", "user")
"""Ops that change the config and never add a layer."""


# ---------------------------------------------------------------------------------------------- keys and ids


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def config_digest(cfg: ImageConfig) -> str:
    """A digest of everything an image's config says (unset fields left out, so new ones keep old digests)."""
    return _digest({k: v for k, v in cfg.to_json().items() if v not in (None, [], {})})


def image_id_for(cfg: ImageConfig) -> str:
    """The content-addressed id of the image with this config."""
    return ids.from_digest("image", bytes.fromhex(config_digest(cfg)))


def key_content(step: AnyStep) -> dict[str, Any]:
    """What of a step its cache key covers: everything but ``force_build`` and secret values."""
    content = step.model_dump(exclude={"force_build", "secret_env"})
    if isinstance(step, RunStep):
        content["secret_env_names"] = sorted(step.secret_env)
    return content


def step_key(parent: ImageConfig, step: AnyStep) -> str:
    """The cache key of ``step`` applied on an image with config ``parent``."""
    return _digest({"v": KEY_VERSION, "parent": config_digest(parent), "step": key_content(step)})


def layer_id_for(key: str, nonce: str = "") -> str:
    """The id of the layer a step with cache key ``key`` builds (a forced rebuild adds a nonce)."""
    return ids.from_digest("image", hashlib.sha256(f"layer:{key}:{nonce}".encode()).digest())


def failed_image_id(key: str) -> str:
    """The id a failed build of the step with ``key`` would have had (``ImageBuildError.image_id``)."""
    return ids.from_digest("image", hashlib.sha256(f"image:{key}".encode()).digest())


# ---------------------------------------------------------------------------------------------- config


def resolve_dir(cfg: ImageConfig, path: str) -> str:
    """``path`` made absolute against the image's working directory, normalised (no ``..`` left)."""
    import posixpath

    joined = posixpath.join(cfg.workdir or "/", path)
    out = posixpath.normpath(joined)
    return "/" + out.lstrip("/")


def apply_config(cfg: ImageConfig, step: AnyStep) -> ImageConfig:
    """The config after ``step`` (layers not included: the builder appends those)."""
    new = ImageConfig.from_json(cfg.to_json())
    if isinstance(step, EnvStep):
        new.env = {**cfg.env, **step.vars}
    elif isinstance(step, WorkdirStep):
        new.workdir = resolve_dir(cfg, step.path)
    elif isinstance(step, CmdStep):
        new.cmd = list(step.argv)
    elif isinstance(step, EntrypointStep):
        new.entrypoint = list(step.argv)
    elif isinstance(step, UserStep):
        new.user = None if step.user in ("root", "0", "root:root", "0:0") else step.user
    return new


def describe(step: AnyStep) -> str:
    """One line for progress output and ``shoal image ls``."""
    if isinstance(step, RunStep):
        shown = [c[2] if c[:2] == SHELL and len(c) == 3 else shlex.join(c) for c in step.commands]
        return "RUN " + " && ".join(shown)
    if isinstance(step, CopyStep):
        return f"COPY {step.context[:12]} {step.dest}"
    if isinstance(step, EnvStep):
        return "ENV " + " ".join(f"{k}={shlex.quote(v)}" for k, v in step.vars.items())
    if isinstance(step, WorkdirStep):
        return f"WORKDIR {step.path}"
    if isinstance(step, CmdStep):
        return "CMD " + json.dumps(step.argv)
    if isinstance(step, EntrypointStep):
        return "ENTRYPOINT " + json.dumps(step.argv)
    if isinstance(step, UserStep):
        return f"USER {step.user}"
    return f"trust the host's CA certificates ({len(step.certs)})"


# ---------------------------------------------------------------------------------------------- command builders


def flatten(args: Iterable[str | list[str]], what: str) -> list[str]:
    """``("a", ["b", "c"])`` → ``["a", "b", "c"]``; TypeError for anything but strings."""
    out: list[str] = []
    for a in args:
        items = a if isinstance(a, list | tuple) else [a]
        for item in items:
            if not isinstance(item, str):
                raise TypeError(f"{what} must be strings (or lists of strings), got {type(item).__name__}")
            out.append(item)
    return out


def shell(command: str) -> list[str]:
    """argv that runs ``command`` with ``/bin/sh -c`` (Dockerfile's shell form)."""
    return [*SHELL, command]


def pip_options(
    find_links: str | None,
    index_url: str | None,
    extra_index_url: str | None,
    pre: bool,
    extra_options: str,
) -> str:
    """pip's index options as shell words (``extra_options`` is passed as written, like Modal)."""
    words = []
    if find_links:
        words.append(f"--find-links {shlex.quote(find_links)}")
    if index_url:
        words.append(f"--index-url {shlex.quote(index_url)}")
    if extra_index_url:
        words.append(f"--extra-index-url {shlex.quote(extra_index_url)}")
    if pre:
        words.append("--pre")
    if extra_options:
        words.append(extra_options)
    return " ".join(words)


def pip_install_command(packages: list[str], options: str) -> str:
    """``python -m pip install`` of ``packages`` (sorted, as Modal does, so the order does not bust the cache)."""
    for p in packages:
        if not p.strip():
            raise InvalidError("package names must not be empty")
    cmd = "python -m pip install --no-cache-dir " + " ".join(shlex.quote(p) for p in sorted(packages))
    return f"{cmd} {options}".rstrip()


def pip_requirements_command(path: str, options: str) -> str:
    """``python -m pip install -r`` of a requirements file already in the image."""
    return f"python -m pip install --no-cache-dir -r {shlex.quote(path)} {options}".rstrip()


UV_DIR = "/.uv"


def uv_pip_install_commands(packages: list[str], requirements: list[str], options: str, uv_version: str | None) -> str:
    """Install uv into its own directory (not the image's site-packages) and ``uv pip install`` with it."""
    pin = f"uv=={uv_version}" if uv_version else "uv"
    args = " ".join(shlex.quote(p) for p in sorted(packages))
    reqs = " ".join(f"--requirement {shlex.quote(r)}" for r in requirements)
    install = f"{UV_DIR}/bin/uv pip install --python $(command -v python) --compile-bytecode {args} {reqs} {options}"
    return f"python -m pip install --no-cache-dir --quiet --target {UV_DIR} {shlex.quote(pin)} && " + " ".join(
        install.split()
    )


UV_PROJECT_DIR = "/.uv-project"
"""Where ``uv_sync`` puts the project's ``pyproject.toml`` and ``uv.lock`` in the image."""


def uv_sync_commands(
    project: str, groups: list[str], extras: list[str], frozen: bool, options: str, uv_version: str | None
) -> str:
    """Install uv (as ``uv_pip_install_commands`` does), export the project's locked dependencies as a
    requirements file and install them into the image's Python (the project itself is not installed)."""
    pin = f"uv=={uv_version}" if uv_version else "uv"
    selectors = [f"--group {shlex.quote(g)}" for g in groups] + [f"--extra {shlex.quote(e)}" for e in extras]
    export = (
        f"{UV_DIR}/bin/uv export --project {project} --no-emit-project --no-hashes --quiet"
        f" --output-file {project}/requirements.txt {'--frozen ' if frozen else ''}{' '.join(selectors)} {options}"
    )
    install = (
        f'{UV_DIR}/bin/uv pip install --python "$UV_PYTHON" --compile-bytecode --requirement {project}/requirements.txt'
    )
    return " ".join(
        (
            f"python -m pip install --no-cache-dir --quiet --target {UV_DIR} {shlex.quote(pin)} &&"
            ' export UV_PYTHON="$(command -v python)" UV_PYTHON_DOWNLOADS=never UV_NO_CACHE=1 &&'
            f" {export} && {install}"
        ).split()
    )


POETRY_PROJECT_DIR = "/.poetry-project"
"""Where ``poetry_install_from_file`` puts the project's ``pyproject.toml`` and ``poetry.lock`` in the image."""
POETRY_CACHE = "/tmp/.shoal-poetry-cache"


def poetry_install_commands(
    project: str,
    *,
    poetry_version: str | None,
    use_lock: bool,
    old_installer: bool,
    with_: list[str],
    without: list[str],
    only: list[str],
) -> str:
    """Install Poetry into the image's Python with pip (as Modal does; ``poetry_version`` None: the image has
    it), then ``poetry install --no-root`` the project's dependencies into that Python (no virtualenv)."""
    words = [
        f"cd {project} &&",
        f"export POETRY_VIRTUALENVS_CREATE=false POETRY_NO_INTERACTION=1 POETRY_CACHE_DIR={POETRY_CACHE} &&",
    ]
    if not use_lock:
        words.append("rm -f poetry.lock &&")  # one an earlier step left here must not be used
    if poetry_version is not None:
        pin = "poetry" if poetry_version == "latest" else f"poetry=={poetry_version}"
        words.append(f"python -m pip install --no-cache-dir {shlex.quote(pin)} &&")
    if old_installer:
        words.append("poetry config --local experimental.new-installer false &&")
    install = ["poetry install --no-root --compile"]
    for flag, groups in (("--with", with_), ("--without", without), ("--only", only)):
        if groups:
            install.append(f"{flag} {shlex.quote(','.join(groups))}")
    words.append(" ".join(install))
    return f"( {' '.join(words)} ); rc=$?; rm -rf {POETRY_CACHE}; exit $rc"


def apt_install_command(packages: list[str]) -> str:
    """``apt-get update && apt-get install -y``; apt's caches and lists are removed afterwards (tens of MB that
    would go stale in the layer)."""
    for p in packages:
        if not p.strip() or p.startswith("-"):
            raise InvalidError(f"invalid package name {p!r}")
    names = " ".join(shlex.quote(p) for p in sorted(packages))
    return (
        "apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "
        f"{names} && apt-get clean && rm -rf /var/lib/apt/lists/*"
    )
