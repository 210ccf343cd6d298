"""Exclusive GPU allocation, and the passthrough plan a GPU sandbox's OCI spec is built from.

Trust: the request string comes from the caller and is parsed strictly (``request.parse``);
everything else here (inventory, device nodes, driver files) is the host's.  A sandbox gets its
own GPUs' device nodes and the control nodes every CUDA process needs, each as a bind mount of
the host's node plus a device-cgroup rule for exactly its major:minor: device nodes cannot be
made inside a user namespace, and the cgroup refuses every device not allowed by name.  Driver
libraries and tools are bind-mounted read-only, ``nodev``, under ``/.shoal/nvidia``.
``/dev/nvidia-caps`` is not passed: its nodes grant MIG configuration and monitoring for the
whole machine, which NVIDIA's container toolkit also withholds from full-GPU containers.

Allocation keeps no state of its own: the GPUs held are those named in the stored spec of every
sandbox that is not yet torn down, so a restarted daemon knows them as soon as it has loaded
its sandboxes, and a GPU is free again once its sandbox's container is gone.
"""

from __future__ import annotations

import functools
import os
import stat
import subprocess
from collections.abc import Iterable, Mapping
from typing import Any

from shoal.exception import InvalidError, ResourceExhaustedError, ServiceError
from shoal.gpu.inventory import Gpu, Inventory
from shoal.runtime import spec
from shoal.wire.gpu import GpuRequest, classify

NVIDIA_DIR = "/.shoal/nvidia"
"""Where the driver's libraries (``lib``) and tools (``bin``) appear in a GPU sandbox."""
LIB_DIR = f"{NVIDIA_DIR}/lib"
BIN_DIR = f"{NVIDIA_DIR}/bin"


def gpu_key(gpu: Gpu) -> str:
    """What identifies a GPU across daemon restarts: its UUID, else its device node."""
    return gpu.uuid or gpu.device


def held_gpus(sandboxes: Iterable[tuple[str, Mapping[str, Any] | None]]) -> dict[str, str]:
    """GPU key → sandbox id, for sandboxes (id, stored GPU plan or None) that still hold their GPUs."""
    held: dict[str, str] = {}
    for sandbox_id, plan in sandboxes:
        if plan is not None:
            for g in plan.get("gpus", []):
                held[str(g["key"])] = sandbox_id
    return held


@functools.lru_cache(maxsize=8)
def runsc_has_nvproxy(binary: str) -> bool:
    """Whether this runsc knows ``--nvproxy`` (gVisor's GPU proxy; in releases from mid-2023 on)."""
    try:
        res = subprocess.run([binary, "flags"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return False
    return "nvproxy" in res.stdout + res.stderr


def check_runtime(name: str, binary: str) -> None:
    """GPU passthrough works with runc and crun; with runsc only where it has ``--nvproxy``."""
    if name.startswith("runsc") and not runsc_has_nvproxy(binary):
        raise InvalidError(
            f"gpu= needs gVisor's --nvproxy, which {binary} does not have (gVisor added it in 2023):"
            " use the runc runtime for GPU sandboxes, or install a newer gVisor release"
        )


class GpuScheduler:
    """Chooses GPUs for requests from one inventory."""

    def __init__(self, inventory: Inventory) -> None:
        self.inventory = inventory

    def choose(self, req: GpuRequest, held: Mapping[str, str]) -> list[Gpu]:
        """Free GPUs for ``req``, preferred class first, then by index; the clear error when there are none."""
        inv = self.inventory
        ranked = [(r, g) for g in inv.gpus if (r := req.rank(classify(g.name, g.memory_mib))) is not None]
        if not ranked:
            raise InvalidError(f"gpu={str(req)!r} asks for {req.describe()}, but {inv.describe()}")
        if len(ranked) < req.count:
            raise InvalidError(
                f"gpu={str(req)!r} asks for {req.describe()}, but only {len(ranked)} GPU"
                f"{'s' if len(ranked) != 1 else ''} here can serve it: {inv.describe()}"
            )
        free = sorted((r, g.index, g) for r, g in ranked if gpu_key(g) not in held)
        if len(free) < req.count:
            busy = ", ".join(f"GPU {g.index} by {held[gpu_key(g)]}" for _, g in ranked if gpu_key(g) in held)
            raise ResourceExhaustedError(
                f"gpu={str(req)!r} asks for {req.describe()}, but only {len(free)} of the {len(ranked)} that can"
                f" serve it {'is' if len(free) == 1 else 'are'} free (held by running sandboxes: {busy});"
                " try again when one of them ends"
            )
        return [g for _, _, g in free[: req.count]]

    def plan(self, req: GpuRequest, held: Mapping[str, str], image_env: Mapping[str, str]) -> dict[str, Any]:
        """Choose GPUs and describe their passthrough (JSON, stored with the sandbox)."""
        gpus = self.choose(req, held)
        inv = self.inventory
        devices = [_device(g.device) for g in gpus] + [_device(p) for p in inv.control_devices]
        binds = [
            {"source": f.source, "destination": f"{LIB_DIR}/{name}"} for f in inv.libraries for name in f.names
        ] + [{"source": f.source, "destination": f"{BIN_DIR}/{name}"} for f in inv.tools for name in f.names]
        uuids = [g.uuid for g in gpus]
        visible = ",".join(uuids) if all(uuids) else ",".join(str(i) for i in range(len(gpus)))
        ld_path = image_env.get("LD_LIBRARY_PATH")
        env = {
            "NVIDIA_VISIBLE_DEVICES": visible,
            "CUDA_VISIBLE_DEVICES": visible,
            "NVIDIA_DRIVER_CAPABILITIES": "compute,utility",
            "PATH": f"{image_env.get('PATH') or spec.DEFAULT_PATH}:{BIN_DIR}",
            "LD_LIBRARY_PATH": f"{LIB_DIR}:{ld_path}" if ld_path else LIB_DIR,
        }
        return {
            "request": str(req),
            "gpus": [
                {"key": gpu_key(g), "index": g.index, "name": g.name, "uuid": g.uuid, "device": g.device} for g in gpus
            ],
            "devices": devices,
            "binds": binds,
            "env": env,
        }

    def status(self, held: Mapping[str, str]) -> dict[str, Any]:
        """The inventory with each GPU's holder (``GET /v1/status``)."""
        out = self.inventory.to_json()
        for g, view in zip(self.inventory.gpus, out["gpus"], strict=True):
            view["held_by"] = held.get(gpu_key(g))
        return out


def _device(path: str) -> dict[str, Any]:
    """A host device node as the plan stores it (its major:minor come from the node itself)."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise ServiceError(f"the GPU device node {path} cannot be used: {exc.strerror}") from None
    if not stat.S_ISCHR(st.st_mode):
        raise ServiceError(f"the GPU device node {path} is not a character device")
    return {
        "source": path,
        "destination": f"/dev/{os.path.basename(path)}",
        "major": os.major(st.st_rdev),
        "minor": os.minor(st.st_rdev),
    }


def apply(container: spec.ContainerConfig, plan: Mapping[str, Any] | None) -> None:
    """Add a sandbox's GPU devices and driver binds (from its stored plan) to its container config."""
    if plan is None:
        return
    container.devices.extend(
        spec.DeviceNode(d["source"], d["destination"], int(d["major"]), int(d["minor"])) for d in plan["devices"]
    )
    container.binds.extend(spec.Bind(b["source"], b["destination"], read_only=True) for b in plan["binds"])


def env(plan: Mapping[str, Any] | None) -> dict[str, str]:
    """The environment every process of a GPU sandbox starts with (before the caller's own)."""
    return dict(plan["env"]) if plan is not None else {}
