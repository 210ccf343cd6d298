"""The seccomp profile every sandbox runs under.

Defends the host kernel against code in the sandbox.  The profile allows
ordinary syscalls and refuses the ones that reach kernel surfaces a sandbox has
no use for: module and kexec loading, mounts and new mount API, keyrings, BPF,
perf, userfaultfd, io_uring, clock and swap control, handle-based opens (which
bypass path checks), and new namespaces (clone/unshare/setns), which would give
sandbox code fresh capabilities over new kernel objects.  ``clone3`` is refused
with ENOSYS so that C libraries fall back to ``clone``, whose flags can be
inspected.  Why a deny list rather than an allow list: docs/decisions/0003-seccomp.md.
"""

from __future__ import annotations

import platform
from typing import Any

EPERM = 1
ENOSYS = 38

DENIED = sorted(
    [
        "acct",
        "add_key",
        "bpf",
        "clock_adjtime",
        "clock_settime",
        "create_module",
        "delete_module",
        "finit_module",
        "fsconfig",
        "fsmount",
        "fsopen",
        "fspick",
        "get_kernel_syms",
        "init_module",
        "io_uring_enter",
        "io_uring_register",
        "io_uring_setup",
        "ioperm",
        "iopl",
        "kcmp",
        "kexec_file_load",
        "kexec_load",
        "keyctl",
        "lookup_dcookie",
        "mount",
        "mount_setattr",
        "move_mount",
        "name_to_handle_at",
        "nfsservctl",
        "open_by_handle_at",
        "open_tree",
        "perf_event_open",
        "pivot_root",
        "quotactl",
        "quotactl_fd",
        "reboot",
        "request_key",
        "setns",
        "settimeofday",
        "stime",
        "swapoff",
        "swapon",
        "syslog",
        "umount",
        "umount2",
        "unshare",
        "uselib",
        "userfaultfd",
        "ustat",
        "vm86",
        "vm86old",
        "_sysctl",
    ]
)

NAMESPACE_FLAGS = {
    "CLONE_NEWNS": 0x00020000,
    "CLONE_NEWCGROUP": 0x02000000,
    "CLONE_NEWUTS": 0x04000000,
    "CLONE_NEWIPC": 0x08000000,
    "CLONE_NEWUSER": 0x10000000,
    "CLONE_NEWPID": 0x20000000,
    "CLONE_NEWNET": 0x40000000,
}

_ARCHES = {
    "x86_64": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
    "aarch64": ["SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"],
}


def profile(machine: str | None = None) -> dict[str, Any]:
    """The OCI ``linux.seccomp`` object for this host's architecture."""
    arch = _ARCHES.get(machine or platform.machine())
    if arch is None:
        raise RuntimeError(f"no seccomp profile for architecture {machine or platform.machine()}")
    syscalls: list[dict[str, Any]] = [
        {"names": DENIED, "action": "SCMP_ACT_ERRNO", "errnoRet": EPERM},
        {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": ENOSYS},
    ]
    # clone(flags, ...): refuse any namespace bit.  Rules for one syscall are ORed.
    for bit in NAMESPACE_FLAGS.values():
        syscalls.append(
            {
                "names": ["clone"],
                "action": "SCMP_ACT_ERRNO",
                "errnoRet": EPERM,
                "args": [{"index": 0, "value": bit, "valueTwo": bit, "op": "SCMP_CMP_MASKED_EQ"}],
            }
        )
    return {"defaultAction": "SCMP_ACT_ALLOW", "architectures": arch, "syscalls": syscalls}
