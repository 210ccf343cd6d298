"""``Image.from_registry(tag, add_python="3.X")``: a self-contained Python laid over any Linux image.

Modal adds a python-build-standalone build; this host cannot reach one (decision 0065), so the layer is made
from the Debian suite's Python that ``debian_slim(python_version=)`` already bootstraps: the interpreter, its
standard library and pip (with setuptools and wheel) under ``/usr/local``, and every shared library they load,
glibc's loader included, in ``/usr/local/lib/shoal-pythonX.Y``.  The interpreter is pointed at that loader and
searches that directory first (``patchelf``: ELF interpreter and ``DT_RPATH``, which also covers the extension
modules it loads), so it runs on images whose C library is another version, musl, or none at all (busybox).
Nothing else in the image changes; programs the interpreter starts use the image's own libraries.

Built once per version (in a staging directory, from the base layer's files, never following a link out of
it), published as a layer, and reused by every image that asks for that version.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

from shoal.exception import InvalidError
from shoal.images.store import LayerStore, shift_tree
from shoal.wire import ids

RECIPE_VERSION = 1
PREFIX = "usr/local"
LIB_DIRS = ("lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu", "lib64", "lib", "usr/lib")
"""Where the suite's shared libraries live, searched in this order (relative to its root)."""
_MAX_LINKS = 40


def libdir(version: str) -> str:
    """The directory (in the image) holding the interpreter's shared libraries and loader."""
    return f"/{PREFIX}/lib/shoal-python{version}"


def recipe(version: str, base_layer: str) -> dict[str, object]:
    """What identifies the layer: the Python version and the base layer it is taken from."""
    return {"kind": "add_python", "python": version, "from": base_layer, "v": RECIPE_VERSION}


def layer_id(version: str, base_layer: str) -> str:
    """The layer's deterministic id."""
    digest = hashlib.sha256(json.dumps(recipe(version, base_layer), sort_keys=True).encode()).digest()
    return ids.from_digest("image", digest)


def build(store: LayerStore, version: str, base_layer: str, uid_offset: int, log: Callable[[str], None]) -> str:
    """Make sure the layer for ``version`` exists (from the base layer ``base_layer``); returns its id.  Blocks."""
    lid = layer_id(version, base_layer)
    if store.exists(lid):
        return lid
    with store.lock(lid):
        if store.exists(lid):
            return lid
        if not shutil.which("patchelf"):
            raise InvalidError("patchelf is not installed: run `make setup` (or apt-get install patchelf)")
        log(f"adding Python {version} to the image (made once from Debian's, with the libraries it loads)")
        staged = store.staging(lid)
        try:
            assemble(store.path(base_layer), staged, version)
        except BaseException:
            shutil.rmtree(staged, ignore_errors=True)
            raise
        shift_tree(staged, uid_offset)
        store.publish(lid, staged, {"recipe": recipe(version, base_layer)})
        return lid


def resolve(root: Path, path: str) -> Path | None:
    """``path`` (absolute in the image rooted at ``root``) with every link resolved inside that root, or None if
    it does not exist there.  Nothing outside ``root`` is ever looked at."""
    parts = [p for p in path.split("/") if p]
    done: list[str] = []
    hops = 0
    while parts:
        name = parts.pop(0)
        if name == ".":
            continue
        if name == "..":
            if done:
                done.pop()
            continue
        here = root.joinpath(*done, name)
        if here.is_symlink():
            hops += 1
            if hops > _MAX_LINKS:
                return None
            target = os.readlink(here)
            parts = [p for p in target.split("/") if p] + parts
            if target.startswith("/"):
                done = []
            continue
        if not here.exists():
            return None
        done.append(name)
    return root.joinpath(*done)


def _find_library(root: Path, name: str) -> Path | None:
    for d in LIB_DIRS:
        found = resolve(root, f"/{d}/{name}")
        if found is not None and found.is_file():
            return found
    return None


def _needed(path: Path) -> list[str]:
    out = subprocess.run(["patchelf", "--print-needed", str(path)], capture_output=True, text=True, check=False)
    return out.stdout.split() if out.returncode == 0 else []


def _is_elf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"\x7fELF"


def assemble(src: Path, dest: Path, version: str) -> None:
    """Lay the suite's Python (root ``src``) out under ``dest/usr/local``, with its libraries, patched to use
    them."""
    exe = resolve(src, f"/usr/bin/python{version}")
    stdlib = resolve(src, f"/usr/lib/python{version}")
    dist = resolve(src, "/usr/lib/python3/dist-packages")
    if exe is None or stdlib is None or not (stdlib / "os.py").is_file():
        raise InvalidError(f"the Debian root for Python {version} holds no usable interpreter")
    os.chmod(dest, 0o755)
    prefix = dest / PREFIX
    bindir, libs = prefix / "bin", dest / libdir(version).lstrip("/")
    for d in (bindir, libs, prefix / "lib" / "python3"):
        d.mkdir(parents=True, exist_ok=True)
    _copy_tree(src, stdlib, prefix / "lib" / f"python{version}")
    (prefix / "lib" / f"python{version}" / "EXTERNALLY-MANAGED").unlink(missing_ok=True)
    for module in ("sysconfig.py", "sysconfig/__init__.py"):  # a package from 3.13 on
        _install_beside_pip(prefix / "lib" / f"python{version}" / module)
    if dist is not None:
        _copy_tree(src, dist, prefix / "lib" / "python3" / "dist-packages")
    wheels = resolve(src, "/usr/share/python-wheels")
    if wheels is not None:  # the wheels a debundled pip (3.9) loads its dependencies from, beside sys.prefix
        _copy_tree(src, wheels, prefix / "share" / "python-wheels")
    interp = bindir / f"python{version}"
    shutil.copy2(exe, interp)
    for alias in ("python3", "python"):
        (bindir / alias).symlink_to(f"python{version}")
    pip_main = "import sys\nfrom pip._internal.cli.main import main\nsys.exit(main())\n"
    for script in ("pip", "pip3", f"pip{version}"):
        (bindir / script).write_text(f"#!/{PREFIX}/bin/python{version}\n{pip_main}")
        os.chmod(bindir / script, 0o755)
    loader_name = subprocess.run(
        ["patchelf", "--print-interpreter", str(exe)], capture_output=True, text=True, check=True
    ).stdout.strip()
    loader = resolve(src, loader_name)
    if loader is None:
        raise InvalidError(f"the Debian root for Python {version} lacks its loader {loader_name}")
    shutil.copy2(loader, libs / Path(loader_name).name)
    # Every shared library the interpreter and its extension modules need, and theirs, from the suite.
    queue = [interp, *(p for p in prefix.rglob("*.so") if p.is_file() and not p.is_symlink() and _is_elf(p))]
    seen: set[str] = {Path(loader_name).name}
    while queue:
        for name in _needed(queue.pop()):
            if name in seen:
                continue
            seen.add(name)
            found = _find_library(src, name)
            if found is None:
                raise InvalidError(f"Python {version}'s library {name} is missing from its Debian root")
            shutil.copy2(found, libs / name)
            queue.append(libs / name)
    subprocess.run(
        [
            "patchelf",
            "--set-interpreter",
            f"{libdir(version)}/{Path(loader_name).name}",
            "--force-rpath",
            "--set-rpath",
            libdir(version),
            str(interp),
        ],
        check=True,
        capture_output=True,
    )


def _install_beside_pip(sysconfig_py: Path) -> None:
    """Make ``pip install`` put packages in ``/usr/local/lib/python3/dist-packages`` (beside pip, on
    ``sys.path``): Debian's default scheme for a ``/usr/local`` prefix would be ``/usr/local/local/lib/...``."""
    if not sysconfig_py.is_file():
        return
    text = sysconfig_py.read_text()
    debian_default = "os.environ.get('DEB_PYTHON_INSTALL_LAYOUT', 'posix_local')"
    if debian_default in text:
        ours = debian_default.replace("posix_local", "deb_system")
        sysconfig_py.write_text(text.replace(debian_default, ours))


def _copy_tree(root: Path, src: Path, dest: Path) -> None:
    """Copy ``src`` to ``dest``; a link is kept when it stays inside ``src``, else replaced by what it points
    to inside ``root`` (or dropped when that is missing or a directory)."""
    shutil.copytree(src, dest, symlinks=True, dirs_exist_ok=True)
    for path in list(dest.rglob("*")):
        if not path.is_symlink():
            continue
        target = os.readlink(path)
        inside = not target.startswith("/") and (path.parent / target).resolve().is_relative_to(dest.resolve())
        if inside and (path.parent / target).exists():
            continue
        image_path = "/" + str((src / path.relative_to(dest)).relative_to(root))
        real = resolve(root, image_path)
        path.unlink()
        if real is not None and real.is_file():
            shutil.copy2(real, path)
