"""``Image`` builder methods (Modal's signatures) and resolving an image with build steps.

Each builder method returns a new lazy ``Image`` with one more step; nothing
runs until a sandbox needs the image (or ``image.build(app)``).  Then the
steps go to the daemon, which builds what is not cached and streams the log;
local files are hashed here, and uploaded only when the daemon asks for them.

Modal's ``copy=False`` for ``add_local_*`` attaches files at sandbox start
without a layer; shoal always copies them into a cached layer (``copy=True``
behaviour), which also allows build steps after them.
"""

from __future__ import annotations

import contextlib
import copy as copy_module
import glob
import importlib.util
import os
import posixpath
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Self

from shoal.exception import InvalidError, NotFoundError, UnimplementedError
from shoal.sdk._local_files import IgnoreFn, LocalTree, Source
from shoal.sdk.secret import Secret
from shoal.wire import dockerfile, recipe
from shoal.wire.ignore import (
    AUTO_DOCKERIGNORE,
    NON_PYTHON_FILES,
    FilePatternMatcher,
    Ignore,
    as_matcher,
    dockerignore_for,
)


@dataclass
class PendingStep:
    """A step as the SDK holds it: its wire form, less what needs I/O at resolve time."""

    wire: dict[str, Any]
    secrets: Sequence[Secret] = ()
    files: LocalTree | None = None
    """For copy steps: the local files (their digest becomes ``wire["context"]``)."""
    extra: list[PendingStep] = field(default_factory=list)

    @property
    def op(self) -> str:
        """The step's kind."""
        return str(self.wire["op"])


def _env_dict(env: dict[str, str | None] | None, what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in (env or {}).items():
        if v is None:
            continue
        if not isinstance(k, str) or not isinstance(v, str):
            raise InvalidError(f"{what}: environment values must be str; {k!r} has {type(v).__name__}")
        out[k] = v
    return out


def _secrets(secrets: Sequence[Secret] | None) -> Sequence[Secret]:
    for s in secrets or ():
        if not isinstance(s, Secret):
            raise InvalidError(f"secrets must be shoal.Secret objects, got {type(s).__name__}")
    return list(secrets or ())


def _gpu(gpu: Any) -> str | None:
    if gpu is None:
        return None
    if isinstance(gpu, list):
        gpu = gpu[0] if gpu else None
    return None if gpu is None else str(gpu)


def run_step(
    commands: list[list[str]],
    *,
    env: dict[str, str | None] | None = None,
    secrets: Sequence[Secret] | None = None,
    gpu: Any = None,
    force_build: bool = False,
) -> PendingStep:
    """A ``run`` step."""
    wire: dict[str, Any] = {"op": "run", "commands": commands, "force_build": force_build}
    plain = _env_dict(env, "env")
    if plain:
        wire["env"] = plain
    if (g := _gpu(gpu)) is not None:
        wire["gpu"] = g
    return PendingStep(wire, secrets=_secrets(secrets))


def copy_step(sources: list[Source], dest: str, *, force_build: bool = False, **extra: Any) -> PendingStep:
    """A ``copy`` step of local files."""
    return PendingStep({"op": "copy", "dest": dest, "force_build": force_build, **extra}, files=LocalTree(sources))


class ImageBuilder:
    """The builder methods of ``Image`` (each returns a new ``Image``)."""

    _ref: dict[str, Any]
    _steps: list[PendingStep]
    _object_id: str | None

    def _with(self, *steps: PendingStep) -> Self:
        new = copy_module.copy(self)
        new._steps = [*self._steps, *steps]
        new._object_id = None
        return new

    # ------------------------------------------------------------------------------------ packages

    def pip_install(
        self,
        *packages: str | list[str],
        find_links: str | None = None,
        index_url: str | None = None,
        extra_index_url: str | None = None,
        pre: bool = False,
        extra_options: str = "",
        force_build: bool = False,
        env: dict[str, str | None] | None = None,
        secrets: Sequence[Secret] | None = None,
        gpu: Any = None,
    ) -> Self:
        """Install Python packages with pip (a cached layer).

        Examples:
            image = shoal.Image.debian_slim().pip_install("pandas", "numpy==1.26.4")
        """
        pkgs = recipe.flatten(packages, "pip_install packages")
        if not pkgs:
            return self
        options = recipe.pip_options(find_links, index_url, extra_index_url, pre, extra_options)
        cmd = recipe.pip_install_command(pkgs, options)
        return self._with(run_step([recipe.shell(cmd)], env=env, secrets=secrets, gpu=gpu, force_build=force_build))

    def uv_pip_install(
        self,
        *packages: str | list[str],
        requirements: list[str] | None = None,
        find_links: str | None = None,
        index_url: str | None = None,
        extra_index_url: str | None = None,
        pre: bool = False,
        extra_options: str = "",
        force_build: bool = False,
        uv_version: str | None = None,
        env: dict[str, str | None] | None = None,
        secrets: Sequence[Secret] | None = None,
        gpu: Any = None,
    ) -> Self:
        """Install Python packages with uv (uv itself goes to ``/.uv``, not into the image's packages)."""
        pkgs = recipe.flatten(packages, "uv_pip_install packages")
        reqs = list(requirements or [])
        if not pkgs and not reqs:
            return self
        steps: list[PendingStep] = []
        remote_reqs = []
        for i, r in enumerate(reqs):
            local = Path(os.path.expanduser(r))
            if not local.is_file():
                raise InvalidError(f"requirements file {r} not found")
            name = f"{i}-{local.name}"
            steps.append(copy_step([Source(local, name)], "/.uv-requirements", force_build=force_build))
            remote_reqs.append(f"/.uv-requirements/{name}")
        options = recipe.pip_options(find_links, index_url, extra_index_url, pre, extra_options)
        cmd = recipe.uv_pip_install_commands(pkgs, remote_reqs, options, uv_version)
        steps.append(run_step([recipe.shell(cmd)], env=env, secrets=secrets, gpu=gpu, force_build=force_build))
        return self._with(*steps)

    def pip_install_from_requirements(
        self,
        requirements_txt: str,
        find_links: str | None = None,
        *,
        index_url: str | None = None,
        extra_index_url: str | None = None,
        pre: bool = False,
        extra_options: str = "",
        force_build: bool = False,
        env: dict[str, str | None] | None = None,
        secrets: Sequence[Secret] | None = None,
        gpu: Any = None,
    ) -> Self:
        """Install the packages a local requirements file lists (the file is copied in, then ``pip install -r``)."""
        local = Path(os.path.expanduser(requirements_txt))
        if not local.is_file():
            raise InvalidError(f"requirements file {requirements_txt} not found")
        options = recipe.pip_options(find_links, index_url, extra_index_url, pre, extra_options)
        cmd = recipe.pip_requirements_command("/.requirements.txt", options)
        return self._with(
            copy_step([Source(local, ".requirements.txt")], "/", force_build=force_build),
            run_step([recipe.shell(cmd)], env=env, secrets=secrets, gpu=gpu, force_build=force_build),
        )

    def pip_install_from_pyproject(
        self,
        pyproject_toml: str,
        optional_dependencies: list[str] | None = None,
        *,
        find_links: str | None = None,
        index_url: str | None = None,
        extra_index_url: str | None = None,
        pre: bool = False,
        extra_options: str = "",
        force_build: bool = False,
        env: dict[str, str | None] | None = None,
        secrets: Sequence[Secret] | None = None,
        gpu: Any = None,
    ) -> Self:
        """Install a local ``pyproject.toml``'s ``[project.dependencies]`` (and the ``optional_dependencies``
        sections named) with pip; the file is read here, the project itself is not installed."""
        project = _read_pyproject(pyproject_toml).get("project", {})
        if "dependencies" not in project:
            raise InvalidError(
                f"{pyproject_toml} has no [project.dependencies] section (PEP 621); for [tool.poetry.dependencies]"
                " use a requirements file (pip_install_from_requirements)"
            )
        deps = list(project["dependencies"])
        optional = project.get("optional-dependencies", {})
        for name in optional_dependencies or []:
            if name not in optional:
                raise InvalidError(f"{pyproject_toml} has no optional-dependencies section {name!r}")
            deps += optional[name]
        return self.pip_install(
            *deps,
            find_links=find_links,
            index_url=index_url,
            extra_index_url=extra_index_url,
            pre=pre,
            extra_options=extra_options,
            force_build=force_build,
            env=env,
            secrets=secrets,
            gpu=gpu,
        )

    def uv_sync(
        self,
        uv_project_dir: str = "./",
        *,
        force_build: bool = False,
        groups: list[str] | None = None,
        extras: list[str] | None = None,
        frozen: bool = True,
        extra_options: str = "",
        uv_version: str | None = None,
        env: dict[str, str | None] | None = None,
        secrets: Sequence[Secret] | None = None,
        gpu: Any = None,
    ) -> Self:
        """Install a local uv project's locked dependencies (``pyproject.toml`` and, if present, ``uv.lock``;
        ``frozen``: exactly as locked) into the image's Python; the project itself is not installed."""
        for value, name in ((groups, "groups"), (extras, "extras")):
            if value is not None and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
                raise InvalidError(f"uv_sync: {name} must be None or a list of strings")
        project = Path(os.path.expanduser(uv_project_dir))
        pyproject = project / "pyproject.toml"
        if "workspace" in _read_pyproject(str(pyproject)).get("tool", {}).get("uv", {}):
            raise InvalidError("uv_sync: uv workspaces are not supported")
        sources = [Source(pyproject, "pyproject.toml")]
        lock = project / "uv.lock"
        if lock.is_file():
            sources.append(Source(lock, "uv.lock"))
        cmd = recipe.uv_sync_commands(
            recipe.UV_PROJECT_DIR,
            list(groups or []),
            list(extras or []),
            frozen and lock.is_file(),
            extra_options,
            uv_version,
        )
        return self._with(
            copy_step(sources, recipe.UV_PROJECT_DIR, force_build=force_build),
            run_step([recipe.shell(cmd)], env=env, secrets=secrets, gpu=gpu, force_build=force_build),
        )

    def poetry_install_from_file(
        self,
        poetry_pyproject_toml: str,
        poetry_lockfile: str | None = None,
        *,
        ignore_lockfile: bool = False,
        force_build: bool = False,
        with_: list[str] = [],  # noqa: B006 (Modal's signature; never mutated)
        without: list[str] = [],  # noqa: B006
        only: list[str] = [],  # noqa: B006
        poetry_version: str | None = "latest",
        old_installer: bool = False,
        env: dict[str, str | None] | None = None,
        secrets: Sequence[Secret] | None = None,
        gpu: Any = None,
    ) -> Self:
        """Install a local Poetry project's dependencies (not the project itself) into the image's Python.

        The lockfile is ``poetry_lockfile`` or the ``poetry.lock`` beside the
        ``pyproject.toml``; it must exist unless ``ignore_lockfile``.  Poetry
        is installed with pip first (``poetry_version``: "latest", a version,
        or None when the image has it); ``with_``/``without``/``only`` pick
        dependency groups as ``poetry install`` does.

        Examples:
            image = shoal.Image.debian_slim().poetry_install_from_file("pyproject.toml", with_=["dev"])
        """
        for value, name in ((with_, "with_"), (without, "without"), (only, "only")):
            if not (isinstance(value, list | tuple) and all(isinstance(v, str) and v.strip() for v in value)):
                raise InvalidError(f"poetry_install_from_file: {name} must be a list of group names")
            if any("," in v for v in value):
                raise InvalidError(f"poetry_install_from_file: {name} holds a group name with a comma")
        if poetry_version is not None and (not isinstance(poetry_version, str) or not poetry_version.strip()):
            raise InvalidError("poetry_install_from_file: poetry_version must be 'latest', a version, or None")
        pyproject = Path(os.path.expanduser(poetry_pyproject_toml))
        _read_pyproject(poetry_pyproject_toml)  # InvalidError now if it is missing or not TOML
        sources = [Source(pyproject, "pyproject.toml")]
        if not ignore_lockfile:
            lock = Path(os.path.expanduser(poetry_lockfile)) if poetry_lockfile else pyproject.parent / "poetry.lock"
            if not lock.is_file():
                where = "given" if poetry_lockfile else "inferred"
                raise NotFoundError(
                    f"poetry.lock not found at {where} location: {lock.absolute()}. If a lockfile is not needed,"
                    " pass ignore_lockfile=True."
                )
            sources.append(Source(lock, "poetry.lock"))
        cmd = recipe.poetry_install_commands(
            recipe.POETRY_PROJECT_DIR,
            poetry_version=poetry_version,
            use_lock=not ignore_lockfile,
            old_installer=bool(old_installer),
            with_=list(with_),
            without=list(without),
            only=list(only),
        )
        return self._with(
            copy_step(sources, recipe.POETRY_PROJECT_DIR, force_build=force_build),
            run_step([recipe.shell(cmd)], env=env, secrets=secrets, gpu=gpu, force_build=force_build),
        )

    def apt_install(
        self,
        *packages: str | list[str],
        force_build: bool = False,
        env: dict[str, str | None] | None = None,
        secrets: Sequence[Secret] | None = None,
        gpu: Any = None,
    ) -> Self:
        """Install Debian packages with apt-get (a cached layer)."""
        pkgs = recipe.flatten(packages, "apt_install packages")
        if not pkgs:
            return self
        cmd = recipe.apt_install_command(pkgs)
        return self._with(run_step([recipe.shell(cmd)], env=env, secrets=secrets, gpu=gpu, force_build=force_build))

    def run_commands(
        self,
        *commands: str | list[str],
        env: dict[str, str | None] | None = None,
        secrets: Sequence[Secret] | None = None,
        volumes: dict[str | PurePosixPath, Any] | None = None,
        gpu: Any = None,
        force_build: bool = False,
    ) -> Self:
        """Run shell commands, one after the other (a cached layer).

        Examples:
            image = shoal.Image.debian_slim().run_commands("mkdir /data", "echo hi > /data/x")
        """
        if volumes:
            raise InvalidError("run_commands(volumes=...) is not supported by shoal's builder")
        cmds = recipe.flatten(commands, "run_commands commands")
        if not cmds:
            return self
        argvs = [recipe.shell(c) for c in cmds]
        return self._with(run_step(argvs, env=env, secrets=secrets, gpu=gpu, force_build=force_build))

    # ------------------------------------------------------------------------------------ config

    def env(self, vars: dict[str, str]) -> Self:
        """Set environment variables for later build steps and for sandboxes."""
        if not isinstance(vars, dict):
            raise InvalidError("Image.env expects a dict of str to str")
        for k, v in vars.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise InvalidError(f"Image.env: values must be str; {k!r} has {type(v).__name__}")
        return self._with(PendingStep({"op": "env", "vars": dict(vars)}))

    def workdir(self, path: str | PurePosixPath) -> Self:
        """Set the working directory of later build steps and of sandboxes (created if missing)."""
        return self._with(PendingStep({"op": "workdir", "path": str(path)}))

    def cmd(self, cmd: list[str]) -> Self:
        """Set the default command, which a sandbox created without one runs."""
        if not isinstance(cmd, list) or not all(isinstance(c, str) for c in cmd):
            raise InvalidError("Image.cmd expects a list of strings")
        return self._with(PendingStep({"op": "cmd", "argv": list(cmd)}))

    def entrypoint(self, entrypoint_commands: list[str]) -> Self:
        """Set the entrypoint (the default command's arguments follow it)."""
        if not isinstance(entrypoint_commands, list) or not all(isinstance(c, str) for c in entrypoint_commands):
            raise InvalidError("Image.entrypoint expects a list of strings")
        return self._with(PendingStep({"op": "entrypoint", "argv": list(entrypoint_commands)}))

    # ------------------------------------------------------------------------------------ local files

    def add_local_file(self, local_path: str | Path, remote_path: str, *, copy: bool = False) -> Self:
        """Copy a local file into the image; a ``remote_path`` ending in ``/`` keeps the file's name."""
        local = Path(local_path).expanduser()
        if not local.is_file():
            raise InvalidError(f"add_local_file: {local_path} is not a file")
        remote = str(remote_path)
        if not remote.startswith("/"):
            raise InvalidError(f"add_local_file: remote_path must be absolute, got {remote!r}")
        if remote.endswith("/"):
            remote = remote + local.name
        target = PurePosixPath(remote)
        return self._with(copy_step([Source(local.resolve(), target.name)], str(target.parent)))

    def add_local_dir(
        self,
        local_path: str | Path,
        remote_path: str,
        *,
        copy: bool = False,
        ignore: Ignore = (),
    ) -> Self:
        """Copy a local directory's contents to ``remote_path``; ``ignore``: dockerignore patterns or a function
        of the path relative to the directory.

        Examples:
            image = shoal.Image.debian_slim().add_local_dir("./src", "/app", ignore=["**/__pycache__", "*.log"])
        """
        local = Path(local_path).expanduser()
        if not local.is_dir():
            raise InvalidError(f"add_local_dir: {local_path} is not a directory")
        remote = str(remote_path)
        if not remote.startswith("/"):
            raise InvalidError(f"add_local_dir: remote_path must be absolute, got {remote!r}")
        src = Source(local.resolve(), "", as_matcher(ignore) if ignore else None)
        return self._with(copy_step([src], remote))

    def add_local_python_source(self, *modules: str, copy: bool = False, ignore: Ignore = NON_PYTHON_FILES) -> Self:
        """Copy local Python packages or modules (found as ``import`` would) into ``/root``, which goes on
        ``PYTHONPATH``."""
        sources = []
        for module in modules:
            if not isinstance(module, str) or not module:
                raise InvalidError("add_local_python_source expects module names")
            try:
                spec = importlib.util.find_spec(module)
            except (ImportError, ValueError) as exc:
                raise InvalidError(f"add_local_python_source: cannot find module {module!r}: {exc}") from None
            if spec is None:
                raise InvalidError(f"add_local_python_source: module {module!r} not found locally")
            rel = module.replace(".", "/")
            if spec.submodule_search_locations:
                for location in spec.submodule_search_locations:
                    path = Path(location)
                    sources.append(Source(path, rel, as_matcher(ignore) if ignore else None))
            elif spec.origin and spec.origin.endswith(".py"):
                sources.append(Source(Path(spec.origin), rel + ".py"))
            else:
                raise InvalidError(f"add_local_python_source: {module!r} is not Python source ({spec.origin})")
        if not sources:
            return self
        return self._with(copy_step(sources, "/root"), PendingStep({"op": "env", "vars": {"PYTHONPATH": "/root"}}))

    # ------------------------------------------------------------------------------------ Dockerfiles

    def pipe(self, func: Callable[..., Self], *args: Any, **kwargs: Any) -> Self:
        """``func(image, *args, **kwargs)``: chain a function of your own that adds steps.

        Examples:
            def with_tools(image, *tools):
                return image.apt_install(*tools)

            image = shoal.Image.debian_slim().pipe(with_tools, "git", "curl")
        """
        result = func(self, *args, **kwargs)
        if not isinstance(result, ImageBuilder):
            raise InvalidError(f"the function given to Image.pipe must return an Image, got {type(result).__name__}")
        return result

    def imports(self) -> contextlib.AbstractContextManager[None]:
        """Imports of packages that only the image has: an ``ImportError`` inside the block is ignored here.

        Examples:
            with image.imports():
                import torch  # installed in the image, maybe not on this machine
        """
        return contextlib.suppress(ImportError)

    def dockerfile_commands(
        self,
        *dockerfile_commands: str | list[str],
        context_files: dict[str, str] | None = None,
        env: dict[str, str | None] | None = None,
        secrets: Sequence[Secret] | None = None,
        gpu: Any = None,
        context_dir: str | Path | None = None,
        force_build: bool = False,
        ignore: Ignore | Any = AUTO_DOCKERIGNORE,
        build_args: dict[str, str] | None = None,
    ) -> Self:
        """Extend the image with Dockerfile instructions (RUN, ENV, WORKDIR, COPY, ADD of local files, CMD,
        ENTRYPOINT, USER, ARG).  COPY sources come from ``context_files`` ({path in the context: local
        path}) or ``context_dir`` (default: the current directory).

        Examples:
            image = shoal.Image.debian_slim().dockerfile_commands("ENV APP=/app", "COPY . $APP", "RUN ls $APP")
        """
        lines = recipe.flatten(dockerfile_commands, "dockerfile_commands")
        if not lines:
            return self
        ops = dockerfile.parse("\n".join(lines), build_args, allow_from=False)
        ctx_dir = Path(context_dir).expanduser() if context_dir is not None else Path.cwd()
        steps = _dockerfile_steps(
            ops, ctx_dir, context_files or {}, _ignore_for(ignore, ctx_dir, None), env, secrets, gpu, force_build
        )
        return self._with(*steps)

    @classmethod
    def from_dockerfile(
        cls,
        path: str | Path,
        *,
        force_build: bool = False,
        context_dir: str | Path | None = None,
        env: dict[str, str | None] | None = None,
        secrets: Sequence[Secret] | None = None,
        gpu: Any = None,
        add_python: str | None = None,
        build_args: dict[str, str] | None = None,
        ignore: Ignore | Any = AUTO_DOCKERIGNORE,
        registry_secret: Secret | None = None,
    ) -> Self:
        """An image built from a Dockerfile.  Its FROM is an image id (``im-…``) or a registry image
        (``Image.from_registry``, logged in with ``registry_secret``'s ``REGISTRY_USERNAME`` and
        ``REGISTRY_PASSWORD`` when given); the build context defaults to the Dockerfile's directory.

        Examples:
            image = shoal.Image.from_dockerfile("./Dockerfile", build_args={"VERSION": "1.2"})
        """
        dockerfile_path = Path(path).expanduser()
        try:
            text = dockerfile_path.read_text()
        except OSError as exc:
            raise InvalidError(f"cannot read the Dockerfile {path}: {exc.strerror}") from None
        ops = dockerfile.parse(text, build_args)
        ctx_dir = Path(context_dir).expanduser() if context_dir is not None else dockerfile_path.resolve().parent
        base_op, rest = ops[0], ops[1:]
        base: Self = _from_image(
            cls, base_op.argv[0], add_python=add_python, force_build=force_build, secret=registry_secret
        )
        matcher = _ignore_for(ignore, ctx_dir, dockerfile_path)
        return base._with(*_dockerfile_steps(rest, ctx_dir, {}, matcher, env, secrets, gpu, force_build))


def _from_image(cls: Any, ref: str, *, add_python: str | None, force_build: bool, secret: Any = None) -> Any:
    """The base a Dockerfile's FROM names (``secret``: the registry login; an image id needs none)."""
    if ref.startswith("im-"):
        if add_python:
            raise InvalidError("add_python applies to registry images, not to FROM an image id")
        return cls._with_id(ref)
    from_registry = getattr(cls, "from_registry", None)
    if from_registry is None:
        raise UnimplementedError(f"FROM {ref}: this shoal version cannot pull registry images yet")
    kwargs: dict[str, Any] = {"force_build": force_build}
    if secret is not None:
        kwargs["secret"] = secret
    if add_python:
        kwargs["add_python"] = add_python
    return from_registry(ref, **kwargs)


def _ignore_for(ignore: Any, context_dir: Path, dockerfile_path: Path | None) -> IgnoreFn | None:
    if ignore is AUTO_DOCKERIGNORE:
        matcher = dockerignore_for(context_dir, dockerfile_path)
        return matcher if matcher.patterns else None
    return as_matcher(ignore) if ignore else None


def _dockerfile_steps(
    ops: list[dockerfile.Op],
    context_dir: Path,
    context_files: dict[str, str],
    ignore: IgnoreFn | None,
    env: dict[str, str | None] | None,
    secrets: Sequence[Secret] | None,
    gpu: Any,
    force_build: bool,
) -> list[PendingStep]:
    steps: list[PendingStep] = []
    extra_env = _env_dict(env, "env")
    for op in ops:
        if op.kind == "run":
            step_env = {**op.env, **extra_env}
            steps.append(run_step([op.argv], env=dict(step_env), secrets=secrets, gpu=gpu, force_build=force_build))
        elif op.kind == "env":
            steps.append(PendingStep({"op": "env", "vars": op.env}))
        elif op.kind == "workdir":
            steps.append(PendingStep({"op": "workdir", "path": op.argv[0]}))
        elif op.kind in ("cmd", "entrypoint"):
            steps.append(PendingStep({"op": op.kind, "argv": op.argv}))
        elif op.kind == "user":
            steps.append(PendingStep({"op": "user", "user": op.argv[0]}))
        elif op.kind == "copy":
            sources, dest = _copy_sources(op, context_dir, context_files, ignore)
            extra: dict[str, Any] = {}
            if op.chmod is not None:
                extra["chmod"] = op.chmod
            if op.chown is not None:
                extra["chown"] = op.chown
            steps.append(copy_step(sources, dest, force_build=force_build, **extra))
        else:
            raise InvalidError(f"Dockerfile line {op.line}: {op.kind.upper()} is not allowed here")
    return steps


def _copy_sources(
    op: dockerfile.Op, context_dir: Path, context_files: dict[str, str], ignore: IgnoreFn | None
) -> tuple[list[Source], str]:
    """COPY's sources as local files, and the directory they go to (Docker's rules for ``dest``)."""
    files = {posixpath.normpath(k.lstrip("/")): Path(v).expanduser() for k, v in context_files.items()}
    root = context_dir.resolve()
    matched: list[Path] = []
    for src in op.sources:
        rel = posixpath.normpath(src.lstrip("/")) if src.strip("/") else "."
        if rel == ".." or rel.startswith("../"):
            raise InvalidError(f"Dockerfile line {op.line}: {src} is outside the build context")
        if rel in files:
            matched.append(files[rel])
            continue
        hits = sorted(glob.glob(str(root / rel))) if glob.has_magic(rel) else [str(root / rel)]
        found = []
        for hit in hits:
            p = Path(hit)
            if not (p.exists() or p.is_symlink()):
                continue
            inside = p.resolve() if not p.is_symlink() else p.parent.resolve() / p.name
            if inside != root and root not in inside.parents:
                raise InvalidError(f"Dockerfile line {op.line}: {src} is outside the build context")
            if ignore is not None and p != root and ignore(p.relative_to(root)):
                continue
            found.append(p)
        if not found:
            raise InvalidError(f"Dockerfile line {op.line}: {src} not found in the build context ({root})")
        matched.extend(found)
    dest = op.dest
    single_file = len(matched) == 1 and not matched[0].is_dir()
    if single_file and not dest.endswith("/"):
        name = posixpath.basename(dest.rstrip("/")) or matched[0].name
        return [Source(matched[0], name)], posixpath.dirname(dest.rstrip("/")) or "."
    sources = [Source(m, "", ignore, root) if m.is_dir() and not m.is_symlink() else Source(m, m.name) for m in matched]
    return sources, dest


__all__ = ["FilePatternMatcher", "ImageBuilder", "PendingStep"]


def _read_pyproject(path: str) -> dict[str, Any]:
    local = Path(os.path.expanduser(path))
    try:
        with open(local, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise InvalidError(f"{path} not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise InvalidError(f"{path} is not valid TOML: {exc}") from None
