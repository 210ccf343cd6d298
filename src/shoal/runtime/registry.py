"""The container runtimes shoal can use, by name, and the choice among them."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable

from shoal.runtime.base import ContainerRuntime, RuntimeFailure
from shoal.runtime.gvisor import GvisorRuntime
from shoal.runtime.oci import OciRuntime, probe_crun

RUNTIMES: dict[str, Callable[[str, str], ContainerRuntime]] = {
    "runc": OciRuntime,
    "crun": OciRuntime,
}
"""Runtime name → constructor(binary, state directory).  A new runtime is a module and a line here."""


def choose(preferred: str | None, state_root: str) -> ContainerRuntime:
    """The runtime to use: ``preferred`` (a name in :data:`RUNTIMES` or a path to one) if given, else crun
    where it works, else runc.  Each keeps its containers' state under ``state_root/<name>``."""
    if preferred:
        name = os.path.basename(preferred)
        if name not in RUNTIMES:
            raise RuntimeFailure(f"unknown container runtime {preferred!r}: shoal can use {', '.join(RUNTIMES)}")
        path = shutil.which(preferred)
        if not path:
            raise RuntimeFailure(f"the container runtime {preferred!r} is not installed")
        return RUNTIMES[name](path, os.path.join(state_root, name))
    crun = shutil.which("crun")
    if crun and probe_crun(crun):
        return RUNTIMES["crun"](crun, os.path.join(state_root, "crun"))
    runc = shutil.which("runc") or ("/usr/sbin/runc" if os.path.exists("/usr/sbin/runc") else None)
    if not runc:
        raise RuntimeFailure("no container runtime found: install runc (apt-get install runc)")
    return RUNTIMES["runc"](runc, os.path.join(state_root, "runc"))


def gvisor(state_root: str) -> tuple[GvisorRuntime | None, str]:
    """gVisor's runsc if installed (its containers' state under ``state_root/runsc``), and a line saying which
    or why there is none."""
    path = shutil.which("runsc")
    if not path:
        return None, "runsc (gVisor) is not installed: run `make setup`, or apt-get install runsc"
    return GvisorRuntime(path, os.path.join(state_root, "runsc")), f"runsc at {path}"
