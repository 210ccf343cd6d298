"""GPU strings, model matching, allocation bookkeeping, discovery and the OCI spec of a GPU sandbox (no GPU needed)."""

from __future__ import annotations

import json
import os
import shutil
import stat
import time
from pathlib import Path

import pytest

from shoal.exception import InvalidError, ResourceExhaustedError, ServiceError
from shoal.gpu import inventory, scheduler
from shoal.gpu.inventory import DriverFile, Gpu, Inventory
from shoal.runtime import spec
from shoal.store.spec import SandboxSpec
from shoal.store.state import SandboxRow, State
from shoal.wire import gpu as request
from shoal.wire.gpu import ANY, GpuRequest
from shoal.wire.sandboxes import CreateSandbox, SandboxState

# ------------------------------------------------------------------ parsing


@pytest.mark.parametrize(
    ("value", "type_", "count"),
    [
        ("any", ANY, 1),
        ("ANY:3", ANY, 3),
        ("T4", "T4", 1),
        ("t4:4", "T4", 4),
        ("L4", "L4", 1),
        ("a10g", "A10G", 1),
        ("A10", "A10", 1),
        ("L40S:2", "L40S", 2),
        ("A100", "A100", 1),
        ("a100-40gb", "A100-40GB", 1),
        ("A100-80GB:8", "A100-80GB", 8),
        ("RTX-PRO-6000", "RTX-PRO-6000", 1),
        ("H100", "H100", 1),
        ("h100!", "H100!", 1),
        ("H100!:2", "H100!", 2),
        ("H200", "H200", 1),
        ("B200", "B200", 1),
        ("b200+:2", "B200+", 2),
        (" h100 : 2 ", "H100", 2),
    ],
)
def test_every_modal_form_parses(value, type_, count):
    assert request.parse(value) == GpuRequest(type_, count)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("Z100", "Invalid GPU type: 'Z100'. Value must be one of any, T4,"),
        ("", "Invalid GPU type: ''"),
        ("A100!", "Invalid GPU type: 'A100!'"),
        ("H100:two", "Invalid GPU count: two. Value must be an integer."),
        ("H100:0", "Invalid GPU count: 0. Value must be at least 1."),
        ("H100:-1", "Invalid GPU count: -1"),
        ("H100:1:2", "Invalid GPU count: 1:2"),
        (["H100", "A100"], "lists are not supported"),
        (2, "Value must be a string"),
        (True, "Value must be a string"),
    ],
)
def test_malformed_values_are_invalid(value, message):
    with pytest.raises(InvalidError) as err:
        request.parse(value)
    assert message in str(err.value)


def test_requests_print_back_in_modal_form():
    assert [str(request.parse(v)) for v in ("any:1", "h100!", "a100-80gb:2", "b200+")] == [
        "any",
        "H100!",
        "A100-80GB:2",
        "B200+",
    ]
    assert request.parse("H100:2").describe() == "2 GPUs of type H100 (or H200)"
    assert request.parse("any").describe() == "1 GPU of any type"


# ------------------------------------------------------------------ matching models


@pytest.mark.parametrize(
    ("model", "memory_mib", "cls"),
    [
        ("Tesla T4", 15360, "T4"),
        ("NVIDIA L4", 23034, "L4"),
        ("NVIDIA L40S", 46068, "L40S"),
        ("NVIDIA L40", 46068, None),
        ("NVIDIA A10G", 23028, "A10G"),
        ("NVIDIA A10", 23028, "A10"),
        ("NVIDIA A100-SXM4-40GB", 40960, "A100-40GB"),
        ("NVIDIA A100-PCIE-40GB", 40960, "A100-40GB"),
        ("NVIDIA A100-SXM4-80GB", 81920, "A100-80GB"),
        ("NVIDIA A100 80GB PCIe", 81920, "A100-80GB"),
        ("NVIDIA A100-SXM4", 81920, "A100-80GB"),  # no size in the name: memory decides
        ("NVIDIA A100-SXM4", 40536, "A100-40GB"),
        ("NVIDIA A100-SXM4", None, "A100-40GB"),
        ("NVIDIA H100 80GB HBM3", 81559, "H100"),
        ("NVIDIA H100 PCIe", 81559, "H100"),
        ("NVIDIA H100 NVL", 95830, "H100"),
        ("NVIDIA H200", 143771, "H200"),
        ("NVIDIA H200 NVL", 143771, "H200"),
        ("NVIDIA GH200 480GB", 97871, None),
        ("NVIDIA B200", 183359, "B200"),
        ("NVIDIA B300 SXM6 AC", 275040, "B300"),
        ("NVIDIA RTX PRO 6000 Blackwell Server Edition", 97887, "RTX-PRO-6000"),
        ("NVIDIA GeForce RTX 4090", 24564, None),
    ],
)
def test_models_fall_into_modal_types(model, memory_mib, cls):
    assert request.classify(model, memory_mib) == cls


def test_which_types_serve_which_requests():
    def serves(req: str, model: str, mem: int | None = None) -> bool:
        return request.parse(req).rank(request.classify(model, mem)) is not None

    assert serves("H100", "NVIDIA H200")  # Modal may upgrade an H100 request to an H200
    assert not serves("H100!", "NVIDIA H200")
    assert serves("H100!", "NVIDIA H100 80GB HBM3")
    assert serves("A100", "NVIDIA A100-SXM4-40GB") and serves("A100", "NVIDIA A100-SXM4-80GB")
    assert not serves("A100-40GB", "NVIDIA A100-SXM4-80GB")
    assert not serves("A100-80GB", "NVIDIA A100-SXM4", 40536)
    assert serves("A10G", "NVIDIA A10") and serves("a10", "NVIDIA A10G")
    assert not serves("L4", "NVIDIA L40S") and not serves("T4", "NVIDIA A100-SXM4-40GB")
    assert serves("B200+", "NVIDIA B300 SXM6 AC") and not serves("B200", "NVIDIA B300 SXM6 AC")
    assert serves("any", "NVIDIA GeForce RTX 4090")


# ------------------------------------------------------------------ allocation


def _gpu(index: int, name: str, memory_mib: int | None = None, uuid: str | None = None) -> Gpu:
    return Gpu(index, name, uuid if uuid is not None else f"GPU-{index:08d}", memory_mib, f"/dev/nvidia{index}")


def _sched(*gpus: Gpu) -> scheduler.GpuScheduler:
    return scheduler.GpuScheduler(Inventory(gpus=list(gpus), source="test"))


def test_choice_prefers_the_named_type_then_the_lowest_index():
    s = _sched(_gpu(0, "NVIDIA H200", 143771), _gpu(1, "NVIDIA H100 80GB HBM3"), _gpu(2, "NVIDIA H100 80GB HBM3"))
    assert [g.index for g in s.choose(request.parse("H100"), {})] == [1]
    assert [g.index for g in s.choose(request.parse("H100:3"), {})] == [1, 2, 0]
    assert [g.index for g in s.choose(request.parse("any:2"), {})] == [0, 1]
    assert [g.index for g in s.choose(request.parse("H100"), {"GPU-00000001": "sb-a"})] == [2]
    held = {"GPU-00000001": "sb-a", "GPU-00000002": "sb-b"}
    assert [g.index for g in s.choose(request.parse("H100"), held)] == [0]  # upgraded, as Modal does
    with pytest.raises(ResourceExhaustedError, match="held by running sandboxes: GPU 1 by sb-a, GPU 2 by sb-b"):
        s.choose(request.parse("H100!"), held)


def test_what_the_machine_lacks_is_invalid_and_says_what_it_has():
    s = _sched(_gpu(0, "NVIDIA A100-SXM4-40GB", 40960))
    with pytest.raises(InvalidError) as err:
        s.choose(request.parse("H100"), {})
    assert str(err.value) == (
        "gpu='H100' asks for 1 GPU of type H100 (or H200), but this machine has 1 GPU: "
        "GPU 0: NVIDIA A100-SXM4-40GB (40 GiB)"
    )
    with pytest.raises(InvalidError, match=r"asks for 2 GPUs of type A100-40GB .* only 1 GPU here can serve it"):
        s.choose(request.parse("A100:2"), {})
    with pytest.raises(InvalidError, match="A100-80GB"):
        s.choose(request.parse("A100-80GB"), {})
    # Held is not lacking: the full machine would serve it, so it is worth retrying.
    with pytest.raises(ResourceExhaustedError, match="only 0 of the 1 that can serve it are free"):
        s.choose(request.parse("A100"), {"GPU-00000000": "sb-x"})
    empty = scheduler.GpuScheduler(Inventory(problem="no NVIDIA driver loaded"))
    with pytest.raises(InvalidError, match=r"this machine has no NVIDIA GPUs \(no NVIDIA driver loaded\)"):
        empty.choose(request.parse("any"), {})


def test_gpus_without_uuid_are_known_by_their_device_node():
    s = _sched(_gpu(0, "NVIDIA L4", uuid=""), _gpu(1, "NVIDIA L4", uuid=""))
    assert [g.index for g in s.choose(request.parse("L4"), {"/dev/nvidia0": "sb-a"})] == [1]


def _plan_row(state: State, sandbox_id: str, sched: scheduler.GpuScheduler, req: str, lifecycle: str) -> None:
    stored = SandboxSpec(
        CreateSandbox(app_id="ap-x", timeout=60), gpu_plan=sched.plan(request.parse(req), _held(state), {})
    )
    row = SandboxRow(sandbox_id, "ap-x", None, {}, stored, SandboxState.CREATING, b"t", time.time(), None)
    state.add_sandbox(row)
    if lifecycle == "running":
        state.set_sandbox_state(sandbox_id, SandboxState.RUNNING)
    elif lifecycle == "finished":
        state.finish_sandbox(sandbox_id, "terminated", None, "")


def _held(state: State) -> dict[str, str]:
    """What a (re)started daemon holds: the GPUs of the sandboxes it loads as creating or running."""
    return scheduler.held_gpus(
        (r.id, r.spec.gpu_plan) for r in state.sandboxes_in(SandboxState.CREATING, SandboxState.RUNNING)
    )


def test_allocations_survive_a_restart_through_the_state_database(tmp_path, fake_nodes):
    gpus = [Gpu(i, "NVIDIA H100 80GB HBM3", f"GPU-{i}", 81559, str(fake_nodes / f"nvidia{i}")) for i in range(3)]
    sched = scheduler.GpuScheduler(Inventory(gpus=gpus, control_devices=[], source="test"))
    db = tmp_path / "state.db"
    state = State(db)
    _plan_row(state, "sb-run", sched, "H100", "running")
    _plan_row(state, "sb-new", sched, "H100", "creating")
    _plan_row(state, "sb-old", sched, "H100", "finished")
    _plan_row(state, "sb-third", sched, "H100", "running")
    cpu_spec = SandboxSpec(CreateSandbox(app_id="ap-x", timeout=60))
    cpu = SandboxRow("sb-cpu", "ap-x", None, {}, cpu_spec, SandboxState.RUNNING, b"t", time.time(), None)
    state.add_sandbox(cpu)
    state.close()

    state = State(db)  # the daemon restarts
    held = _held(state)
    assert held == {"GPU-0": "sb-run", "GPU-1": "sb-new", "GPU-2": "sb-third"}  # sb-old's GPU 2 was reused
    with pytest.raises(ResourceExhaustedError, match="GPU 0 by sb-run, GPU 1 by sb-new, GPU 2 by sb-third"):
        sched.choose(request.parse("H100"), held)
    state.finish_sandbox("sb-new", "init_failure", None, "the daemon stopped while creating the sandbox")
    state.close()
    state = State(db)
    assert [g.index for g in sched.choose(request.parse("H100"), _held(state))] == [1]
    state.close()


# ------------------------------------------------------------------ passthrough plan and OCI spec


@pytest.fixture
def fake_nodes(tmp_path) -> Path:
    """Character devices numbered as /dev/null, named as NVIDIA's (mknod needs root)."""
    d = tmp_path / "dev"
    d.mkdir()
    try:
        for name in ("nvidia0", "nvidia1", "nvidia2", "nvidiactl", "nvidia-uvm", "nvidia-uvm-tools"):
            os.mknod(d / name, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    except PermissionError:
        pytest.skip("mknod needs root")
    (d / "not-a-device").write_text("")
    return d


def _inventory(fake_nodes: Path, tmp_path: Path) -> Inventory:
    return Inventory(
        gpus=[
            Gpu(0, "NVIDIA H100 80GB HBM3", "GPU-aaaa", 81559, str(fake_nodes / "nvidia0")),
            Gpu(1, "NVIDIA H100 80GB HBM3", "GPU-bbbb", 81559, str(fake_nodes / "nvidia1")),
        ],
        control_devices=[str(fake_nodes / n) for n in ("nvidiactl", "nvidia-uvm", "nvidia-uvm-tools")],
        libraries=[DriverFile("/host/lib/libcuda.so.580.1", ("libcuda.so", "libcuda.so.1", "libcuda.so.580.1"))],
        tools=[DriverFile("/host/bin/nvidia-smi", ("nvidia-smi",))],
        driver_version="580.1",
        source="test",
    )


def test_plan_and_spec_pass_exactly_the_allocated_gpu(fake_nodes, tmp_path):
    sched = scheduler.GpuScheduler(_inventory(fake_nodes, tmp_path))
    plan = sched.plan(request.parse("H100"), {"GPU-aaaa": "sb-other"}, {"PATH": "/usr/bin:/bin"})
    assert plan["gpus"] == [
        {
            "key": "GPU-bbbb",
            "index": 1,
            "name": "NVIDIA H100 80GB HBM3",
            "uuid": "GPU-bbbb",
            "device": plan["gpus"][0]["device"],
        }
    ]
    assert plan["env"] == {
        "NVIDIA_VISIBLE_DEVICES": "GPU-bbbb",
        "CUDA_VISIBLE_DEVICES": "GPU-bbbb",
        "NVIDIA_DRIVER_CAPABILITIES": "compute,utility",
        "PATH": "/usr/bin:/bin:/.shoal/nvidia/bin",
        "LD_LIBRARY_PATH": "/.shoal/nvidia/lib",
    }
    assert json.loads(json.dumps(plan)) == plan  # stored with the sandbox as JSON

    container = spec.ContainerConfig(container_id="sb-1", rootfs="/r", shoal_dir="/s")
    scheduler.apply(container, plan)
    built = spec.build(container)
    mounts = {m["destination"]: m for m in built["mounts"]}
    for name in ("nvidia1", "nvidiactl", "nvidia-uvm", "nvidia-uvm-tools"):
        m = mounts[f"/dev/{name}"]
        assert m["source"] == str(fake_nodes / name) and m["type"] == "bind"
        assert "nodev" not in m["options"] and "nosuid" in m["options"]
    assert "/dev/nvidia0" not in mounts  # the GPU held by another sandbox
    for name in ("libcuda.so", "libcuda.so.1", "libcuda.so.580.1"):
        m = mounts[f"/.shoal/nvidia/lib/{name}"]
        assert m["source"] == "/host/lib/libcuda.so.580.1"
        assert {"ro", "nodev", "nosuid"} <= set(m["options"])
    assert mounts["/.shoal/nvidia/bin/nvidia-smi"]["source"] == "/host/bin/nvidia-smi"
    rules = built["linux"]["resources"]["devices"]
    assert rules == [{"allow": True, "type": "c", "major": 1, "minor": 3, "access": "rw"}] * 4
    assert "devices" not in built["linux"]  # never linux.devices: runc would bind the same path from the host


def test_a_cpu_sandbox_spec_has_no_devices_and_no_gpu_env():
    container = spec.ContainerConfig(container_id="sb-1", rootfs="/r", shoal_dir="/s")
    scheduler.apply(container, None)
    built = spec.build(container)
    assert "devices" not in built["linux"]["resources"]
    assert not [m for m in built["mounts"] if "nvidia" in m["destination"]]
    assert scheduler.env(None) == {}


def test_plan_keeps_the_images_library_path_after_the_drivers(fake_nodes, tmp_path):
    sched = scheduler.GpuScheduler(_inventory(fake_nodes, tmp_path))
    plan = sched.plan(request.parse("any:2"), {}, {"LD_LIBRARY_PATH": "/opt/lib"})
    assert plan["env"]["LD_LIBRARY_PATH"] == "/.shoal/nvidia/lib:/opt/lib"
    assert plan["env"]["PATH"] == f"{spec.DEFAULT_PATH}:/.shoal/nvidia/bin"
    assert plan["env"]["NVIDIA_VISIBLE_DEVICES"] == "GPU-aaaa,GPU-bbbb"


def test_a_missing_or_wrong_device_node_fails_the_plan(fake_nodes, tmp_path):
    inv = _inventory(fake_nodes, tmp_path)
    inv.gpus[0] = Gpu(0, "NVIDIA H100 80GB HBM3", "GPU-aaaa", 81559, str(fake_nodes / "not-a-device"))
    with pytest.raises(ServiceError, match="is not a character device"):
        scheduler.GpuScheduler(inv).plan(request.parse("H100"), {}, {})
    inv.gpus[0] = Gpu(0, "NVIDIA H100 80GB HBM3", "GPU-aaaa", 81559, str(fake_nodes / "gone"))
    with pytest.raises(ServiceError, match="cannot be used"):
        scheduler.GpuScheduler(inv).plan(request.parse("H100"), {}, {})


# ------------------------------------------------------------------ discovery


def test_fake_inventory_file(tmp_path, monkeypatch):
    path = tmp_path / "inv.json"
    path.write_text(
        json.dumps(
            {
                "driver_version": "1.2",
                "gpus": [{"index": 0, "name": "NVIDIA L4", "uuid": "GPU-x", "memory_mib": 23034, "device": "/d/n0"}],
                "control_devices": ["/d/ctl"],
                "libraries": [str(tmp_path / "libcuda.so.1")],
                "tools": [],
            }
        )
    )
    monkeypatch.setenv(inventory.ENV_VAR, str(path))
    inv = inventory.discover()
    assert inv.source == f"file:{path}" and inv.driver_version == "1.2" and inv.problem is None
    assert inv.gpus == [Gpu(0, "NVIDIA L4", "GPU-x", 23034, "/d/n0")]
    assert inv.control_devices == ["/d/ctl"]
    assert inv.libraries == [DriverFile(str(tmp_path / "libcuda.so.1"), ("libcuda.so.1",))]
    assert inv.describe() == "this machine has 1 GPU: GPU 0: NVIDIA L4 (22 GiB)"
    path.write_text("{not json")
    broken = inventory.discover()
    assert broken.gpus == [] and "cannot read the GPU inventory file" in (broken.problem or "")


def test_no_driver_means_no_gpus_and_says_why(monkeypatch, tmp_path):
    monkeypatch.delenv(inventory.ENV_VAR, raising=False)
    if Path("/proc/driver/nvidia").exists():
        pytest.skip("this machine has an NVIDIA driver")
    monkeypatch.setattr(inventory, "PROC_GPUS", tmp_path / "absent")
    inv = inventory.discover()
    assert inv.gpus == [] and inv.source == "none"
    # NVML through nvidia-ml-py, which finds no libnvidia-ml here; then the driver's /proc files.
    assert "NVML" in (inv.problem or "") and "absent" in (inv.problem or "")
    assert inv.describe().startswith("this machine has no NVIDIA GPUs (NVML")


def test_proc_files_are_read_when_nvml_finds_nothing(monkeypatch, tmp_path):
    gpus = tmp_path / "gpus"
    for bus, minor, model, uuid in (
        ("0000:00:07.0", 0, "NVIDIA H200", "GPU-h200"),
        ("0000:00:08.0", 1, "NVIDIA H200", "GPU-2"),
    ):
        (gpus / bus).mkdir(parents=True)
        (gpus / bus / "information").write_text(
            f"Model: \t\t {model}\nIRQ:   \t\t 33\nGPU UUID: \t {uuid}\n"
            f"Bus Location: \t {bus}\nDevice Minor: \t {minor}\n"
        )
    monkeypatch.delenv(inventory.ENV_VAR, raising=False)
    monkeypatch.setattr(inventory, "PROC_GPUS", gpus)
    monkeypatch.setattr(inventory, "_from_nvml", lambda: Inventory(problem="NVML: not here"))
    inv = inventory.discover()
    assert inv.source == "proc"
    assert inv.gpus == [
        Gpu(0, "NVIDIA H200", "GPU-h200", None, "/dev/nvidia0"),
        Gpu(1, "NVIDIA H200", "GPU-2", None, "/dev/nvidia1"),
    ]


def test_driver_libraries_are_found_with_all_their_names(tmp_path):
    first, second = tmp_path / "nvidia" / "lib64", tmp_path / "x86_64-linux-gnu"
    first.mkdir(parents=True)
    second.mkdir()
    (first / "libcuda.so.580.1").write_text("cuda")
    os.symlink("libcuda.so.580.1", first / "libcuda.so.1")
    os.symlink("libcuda.so.1", first / "libcuda.so")
    (first / "libnvidia-ml.so.580.1").write_text("nvml")
    os.symlink("libnvidia-ml.so.580.1", first / "libnvidia-ml.so.1")
    (first / "libGLX_nvidia.so.0").write_text("gl")  # graphics: not for compute sandboxes
    (second / "libcuda.so.1").write_text("older cuda")  # shadowed by the first directory
    (second / "libnvidia-ptxjitcompiler.so.1").write_text("jit")
    (second / "libnvidia-ml.so.1.bak").write_text("")
    found = inventory.find_libraries([str(first), str(second), str(tmp_path / "missing")])
    assert found == [
        DriverFile(str(first / "libnvidia-ml.so.580.1"), ("libnvidia-ml.so.1", "libnvidia-ml.so.580.1")),
        DriverFile(str(first / "libcuda.so.580.1"), ("libcuda.so", "libcuda.so.1", "libcuda.so.580.1")),
        DriverFile(str(second / "libnvidia-ptxjitcompiler.so.1"), ("libnvidia-ptxjitcompiler.so.1",)),
    ]


def test_driver_tools_are_found_in_the_first_directory(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        d.mkdir()
        (d / "nvidia-smi").write_text("#!/bin/sh\n")
        (d / "nvidia-smi").chmod(0o755)
    (a / "nvidia-debugdump").write_text("not executable")
    assert inventory.find_tools([str(a), str(b)]) == [DriverFile(str(a / "nvidia-smi"), ("nvidia-smi",))]


# ------------------------------------------------------------------ runtimes


def test_runsc_without_nvproxy_is_refused_with_a_clear_error(tmp_path):
    runsc = shutil.which("runsc")
    if runsc:  # the Debian runsc on this machine predates --nvproxy
        scheduler.runsc_has_nvproxy.cache_clear()
        if not scheduler.runsc_has_nvproxy(runsc):
            with pytest.raises(InvalidError, match="needs gVisor's --nvproxy"):
                scheduler.check_runtime("runsc", runsc)
    old = tmp_path / "old-runsc"
    old.write_text("#!/bin/sh\necho '-platform string'\n")
    new = tmp_path / "new-runsc"
    new.write_text(
        "#!/bin/sh\necho '-platform string'\necho '-nvproxy  EXPERIMENTAL: enable support for Nvidia GPUs'\n"
    )
    for f in (old, new):
        f.chmod(0o755)
    with pytest.raises(InvalidError, match=f"{old} does not have"):
        scheduler.check_runtime("runsc", str(old))
    scheduler.check_runtime("runsc", str(new))
    scheduler.check_runtime("runc", "/usr/sbin/runc")
    scheduler.check_runtime("crun", "/usr/bin/crun")
