"""The OCI spec every sandbox gets: the isolation settings, as data."""

from __future__ import annotations

from shoal.runtime import seccomp, spec


def config(**kw) -> dict:
    return spec.build(spec.ContainerConfig("sb-x", "/root", "/shoal", **kw))


def test_every_namespace_and_the_uid_map():
    cfg = config()
    kinds = {n["type"] for n in cfg["linux"]["namespaces"]}
    assert kinds == {"pid", "ipc", "uts", "mount", "user", "cgroup", "network"}
    assert cfg["linux"]["uidMappings"] == [{"containerID": 0, "hostID": 100000, "size": 65536}]
    assert cfg["linux"]["gidMappings"] == cfg["linux"]["uidMappings"]


def test_privileges_are_dropped():
    proc = config()["process"]
    assert proc["noNewPrivileges"] is True
    caps = set(proc["capabilities"]["bounding"])
    assert not caps & {"CAP_SYS_ADMIN", "CAP_SYS_MODULE", "CAP_SYS_PTRACE", "CAP_NET_ADMIN", "CAP_SYS_RAWIO"}
    assert proc["oomScoreAdj"] > 0


def test_only_the_agent_and_control_dirs_come_from_the_host_and_read_only():
    binds = [m for m in config()["mounts"] if m["type"] == "bind"]
    assert [(m["source"], m["destination"]) for m in binds] == [("/shoal", "/.shoal")]
    assert all("ro" in m["options"] and "nosuid" in m["options"] for m in binds)
    assert spec.AGENT_PATH.startswith("/.shoal/") and spec.RECONNECT_SOCKET.startswith("/.shoal/")


def test_a_sandbox_of_an_older_version_keeps_its_two_mounts():
    binds = [m for m in config(split_shoal_dirs=("/agent", "/ctl"))["mounts"] if m["type"] == "bind"]
    assert [(m["source"], m["destination"]) for m in binds] == [("/agent", spec.AGENT_DIR), ("/ctl", spec.CTL_DIR)]
    assert all("ro" in m["options"] and "nosuid" in m["options"] for m in binds)


def test_resources():
    linux = config(resources=spec.Resources(cpu_request=0.5, cpu_limit=2, memory_limit_mib=300, pids_limit=77))["linux"]
    assert linux["resources"] == {
        "pids": {"limit": 77},
        "memory": {"limit": 300 << 20},
        "cpu": {"period": 100000, "quota": 200000, "shares": 512},
    }
    assert linux["cgroupsPath"] == "/shoal/sb-x"


def test_a_given_network_namespace_is_joined():
    ns = [n for n in config(netns_path="/run/netns/x")["linux"]["namespaces"] if n["type"] == "network"]
    assert ns == [{"type": "network", "path": "/run/netns/x"}]


def test_seccomp_denies_the_dangerous_calls_and_namespace_flags():
    prof = seccomp.profile("x86_64")
    assert prof["defaultAction"] == "SCMP_ACT_ALLOW"
    denied = set(prof["syscalls"][0]["names"])
    assert {"mount", "bpf", "kexec_load", "init_module", "unshare", "setns", "io_uring_setup", "keyctl"} <= denied
    assert prof["syscalls"][1] == {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": seccomp.ENOSYS}
    clone_bits = {r["args"][0]["value"] for r in prof["syscalls"][2:]}
    assert clone_bits == set(seccomp.NAMESPACE_FLAGS.values())


def test_rlimits_never_exceed_the_host():
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    [nofile] = config()["process"]["rlimits"]
    assert nofile["hard"] <= hard
