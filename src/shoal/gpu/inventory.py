"""What NVIDIA GPUs this host has, and where its driver's user-space files are.

Discovery, refreshed at every daemon start, in this order:

1. ``SHOAL_GPU_INVENTORY`` (a test and debug hook): a JSON file that describes the GPUs, device
   nodes, libraries and tools to use instead of the host's.  Its shape::

       {"driver_version": "580.0",
        "gpus": [{"index": 0, "name": "NVIDIA H100 80GB HBM3", "uuid": "GPU-…",
                  "memory_mib": 81559, "device": "/dev/nvidia0"}],
        "control_devices": ["/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools"],
        "libraries": ["/usr/lib/x86_64-linux-gnu/libcuda.so.1"],
        "tools": ["/usr/bin/nvidia-smi"]}

   Omitted lists are discovered on the host as below.
2. NVML through ``nvidia-ml-py`` (imported only here): model, UUID, memory, minor number.
3. The driver's ``/proc/driver/nvidia/gpus/*/information`` (no memory figure).

No driver, no library or no device → an empty inventory whose ``problem`` says why.  The
inventory names host paths only; nothing here is reachable from a sandbox.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import re
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

ENV_VAR = "SHOAL_GPU_INVENTORY"
PROC_GPUS = Path("/proc/driver/nvidia/gpus")
DEV = Path("/dev")
CONTROL_DEVICES = ("nvidiactl", "nvidia-uvm", "nvidia-uvm-tools")
"""Device nodes every CUDA process needs besides its GPUs' own ``/dev/nvidiaN``."""
LIBRARY_PREFIXES = (
    # utility: NVML and nvidia-smi
    "libnvidia-ml",
    "libnvidia-cfg",
    # compute: the CUDA driver and what it loads
    "libcuda",
    "libcudadebugger",
    "libnvidia-ptxjitcompiler",
    "libnvidia-nvvm",
    "libnvidia-gpucomp",
    "libnvidia-allocator",
    "libnvidia-opencl",
    "libnvidia-pkcs11",
    "libnvidia-pkcs11-openssl3",
    "libnvidia-fatbinaryloader",
    "libnvidia-compiler",
)
"""The driver's user-space libraries a sandbox gets (NVIDIA's container toolkit's compute + utility set)."""
TOOLS = ("nvidia-smi", "nvidia-debugdump", "nvidia-cuda-mps-control", "nvidia-cuda-mps-server")
LIBRARY_DIRS = (
    "/usr/local/nvidia/lib64",
    "/usr/local/nvidia/lib",
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib64",
    "/lib/x86_64-linux-gnu",
    "/lib64",
    "/usr/lib",
    "/lib",
)
TOOL_DIRS = ("/usr/local/nvidia/bin", "/usr/bin", "/usr/sbin", "/bin", "/sbin")


@dataclass(frozen=True)
class Gpu:
    """One GPU of the host."""

    index: int
    name: str
    uuid: str
    memory_mib: int | None
    device: str
    """Host path of its device node (``/dev/nvidiaN``)."""

    def describe(self) -> str:
        """``GPU 0: NVIDIA H200 (139 GiB)``."""
        mem = f" ({self.memory_mib // 1024} GiB)" if self.memory_mib else ""
        return f"GPU {self.index}: {self.name}{mem}"


@dataclass(frozen=True)
class DriverFile:
    """A driver file to mount read-only: the real file and every name it is known by."""

    source: str
    names: tuple[str, ...]


@dataclass
class Inventory:
    """The host's GPUs and the driver files a GPU sandbox gets."""

    gpus: list[Gpu] = field(default_factory=list)
    control_devices: list[str] = field(default_factory=list)
    libraries: list[DriverFile] = field(default_factory=list)
    tools: list[DriverFile] = field(default_factory=list)
    driver_version: str | None = None
    source: str = "none"
    """``nvml``, ``proc``, ``file:<path>`` or ``none``."""
    problem: str | None = None
    """Why no GPU was found, when none was."""

    def describe(self) -> str:
        """What the machine has, in words, for error messages."""
        if not self.gpus:
            why = f" ({self.problem})" if self.problem else ""
            return f"this machine has no NVIDIA GPUs{why}"
        n = len(self.gpus)
        return f"this machine has {n} GPU{'s' if n != 1 else ''}: " + "; ".join(g.describe() for g in self.gpus)

    def to_json(self) -> dict[str, Any]:
        """A JSON-able view (status)."""
        return {
            "gpus": [asdict(g) for g in self.gpus],
            "driver_version": self.driver_version,
            "source": self.source,
            "problem": self.problem,
            "libraries": [f.source for f in self.libraries],
            "tools": [f.source for f in self.tools],
        }


def discover() -> Inventory:
    """The host's inventory (or the fake one named by ``SHOAL_GPU_INVENTORY``)."""
    fake = os.environ.get(ENV_VAR)
    if fake:
        return load_file(Path(fake))
    inv = _from_nvml()
    if not inv.gpus:
        from_proc = _from_proc()
        if from_proc.gpus:
            inv = from_proc
        elif from_proc.problem and inv.problem:
            inv.problem = f"{inv.problem}; {from_proc.problem}"
    if inv.gpus:
        inv.control_devices = [str(DEV / n) for n in CONTROL_DEVICES if (DEV / n).exists()]
        inv.libraries = find_libraries()
        inv.tools = find_tools()
        missing = [str(DEV / n) for n in CONTROL_DEVICES if not (DEV / n).exists()]
        if missing:
            log.warning("GPU device nodes missing (CUDA may fail in sandboxes): %s", ", ".join(missing))
    return inv


def load_file(path: Path) -> Inventory:
    """A fake inventory from a JSON file (see the module docstring); unreadable → no GPUs, and why."""
    try:
        data = json.loads(path.read_text())
        gpus = [
            Gpu(
                index=int(g["index"]),
                name=str(g["name"]),
                uuid=str(g["uuid"]),
                memory_mib=None if g.get("memory_mib") is None else int(g["memory_mib"]),
                device=str(g["device"]),
            )
            for g in data.get("gpus", [])
        ]
        inv = Inventory(gpus=gpus, driver_version=data.get("driver_version"), source=f"file:{path}")
        if "control_devices" in data:
            inv.control_devices = [str(p) for p in data["control_devices"]]
        else:
            inv.control_devices = [str(DEV / n) for n in CONTROL_DEVICES if (DEV / n).exists()]
        inv.libraries = _files(data["libraries"]) if "libraries" in data else find_libraries()
        inv.tools = _files(data["tools"]) if "tools" in data else find_tools()
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return Inventory(source=f"file:{path}", problem=f"cannot read the GPU inventory file {path}: {exc}")
    if not gpus:
        inv.problem = f"none listed in {path}"
    return inv


def _files(paths: list[Any]) -> list[DriverFile]:
    return [DriverFile(os.path.realpath(str(p)), (os.path.basename(str(p)),)) for p in paths]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _from_nvml() -> Inventory:
    try:
        nvml = importlib.import_module("pynvml")
    except ImportError:
        return Inventory(problem="NVML: the nvidia-ml-py package is not installed")
    try:
        nvml.nvmlInit()
    except Exception as exc:  # NVMLError_LibraryNotFound, _DriverNotLoaded, …
        return Inventory(problem=f"NVML: {exc}")
    try:
        gpus = []
        for i in range(int(nvml.nvmlDeviceGetCount())):
            h = nvml.nvmlDeviceGetHandleByIndex(i)
            try:
                minor = int(nvml.nvmlDeviceGetMinorNumber(h))
            except Exception:
                log.warning("NVML: GPU %d has no minor number (MIG or vGPU?); skipped", i)
                continue
            gpus.append(
                Gpu(
                    index=i,
                    name=_text(nvml.nvmlDeviceGetName(h)),
                    uuid=_text(nvml.nvmlDeviceGetUUID(h)),
                    memory_mib=int(nvml.nvmlDeviceGetMemoryInfo(h).total) >> 20,
                    device=str(DEV / f"nvidia{minor}"),
                )
            )
        driver = _text(nvml.nvmlSystemGetDriverVersion())
    except Exception as exc:
        return Inventory(problem=f"NVML: {exc}")
    finally:
        try:
            nvml.nvmlShutdown()
        except Exception:
            log.debug("nvmlShutdown failed", exc_info=True)
    return Inventory(gpus=gpus, driver_version=driver, source="nvml", problem=None if gpus else "NVML lists none")


def _from_proc() -> Inventory:
    if not PROC_GPUS.is_dir():
        return Inventory(problem=f"no NVIDIA driver loaded ({PROC_GPUS} is absent)")
    found: list[tuple[str, dict[str, str]]] = []
    for d in sorted(PROC_GPUS.iterdir()):
        try:
            text = (d / "information").read_text()
        except OSError:
            continue
        fields = {k.strip(): v.strip() for k, _, v in (ln.partition(":") for ln in text.splitlines()) if v}
        found.append((d.name, fields))
    gpus = []
    for index, (_bus, f) in enumerate(found):  # NVML's default order is PCI bus order, as here
        minor = f.get("Device Minor", "")
        if not minor.isdigit():
            continue
        gpus.append(
            Gpu(
                index=index,
                name=f.get("Model", "unknown NVIDIA GPU"),
                uuid=f.get("GPU UUID", ""),
                memory_mib=None,
                device=str(DEV / f"nvidia{minor}"),
            )
        )
    driver = None
    try:
        m = re.search(r"Kernel Module\s+([0-9.]+)", Path("/proc/driver/nvidia/version").read_text())
        driver = m.group(1) if m else None
    except OSError:
        pass
    return Inventory(gpus=gpus, driver_version=driver, source="proc", problem=None if gpus else "the driver lists none")


def _ldconfig_dirs() -> list[str]:
    """Directories where ``ldconfig -p`` knows a driver library (the host's own search order)."""
    ldconfig = shutil.which("ldconfig") or ("/sbin/ldconfig" if os.path.exists("/sbin/ldconfig") else None)
    if not ldconfig:
        return []
    try:
        out = subprocess.run([ldconfig, "-p"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    dirs: list[str] = []
    for line in out.splitlines():
        left, sep, path = line.strip().partition(" => ")
        name, _, tags = left.partition(" ")
        # "(libc6,x86-64)" is a 64-bit library; "(libc6)" a 32-bit one, which a sandbox does not get.
        if sep and "," in tags and _library_prefix(name) is not None:
            d = os.path.dirname(path)
            if d not in dirs:
                dirs.append(d)
    return dirs


def find_libraries(dirs: list[str] | None = None) -> list[DriverFile]:
    """The driver's libraries: for each prefix, the first directory that has it, every name of each file."""
    search = dirs if dirs is not None else [*_ldconfig_dirs(), *LIBRARY_DIRS]
    found: dict[str, list[DriverFile]] = {}
    seen_dirs: set[str] = set()
    for d in search:
        real_dir = os.path.realpath(d)
        if real_dir in seen_dirs or not os.path.isdir(real_dir):
            continue
        seen_dirs.add(real_dir)
        try:
            names = sorted(os.listdir(real_dir))
        except OSError:
            continue
        here: dict[str, dict[str, list[str]]] = {}
        for name in names:
            prefix = _library_prefix(name)
            if prefix is None or prefix in found:
                continue
            path = os.path.join(real_dir, name)
            real = os.path.realpath(path)
            if not os.path.isfile(real):
                continue
            here.setdefault(prefix, {}).setdefault(real, []).append(name)
        for prefix, files in here.items():
            found[prefix] = [DriverFile(real, tuple(sorted(set(n)))) for real, n in sorted(files.items())]
    return [f for prefix in LIBRARY_PREFIXES for f in found.get(prefix, [])]


def _library_prefix(name: str) -> str | None:
    """The prefix of ``LIBRARY_PREFIXES`` that a file name is a version of (``libcuda.so.1`` → ``libcuda``)."""
    for prefix in LIBRARY_PREFIXES:
        if name == f"{prefix}.so" or name.startswith(f"{prefix}.so."):
            return prefix
    return None


def find_tools(dirs: list[str] | None = None) -> list[DriverFile]:
    """The driver's tools (``nvidia-smi``, …): the first directory holding each."""
    search = dirs if dirs is not None else [*TOOL_DIRS, *os.environ.get("PATH", "").split(":")]
    out = []
    for tool in TOOLS:
        for d in search:
            path = os.path.join(d, tool)
            if d and os.path.isfile(path) and os.access(path, os.X_OK):
                out.append(DriverFile(os.path.realpath(path), (tool,)))
                break
    return out
