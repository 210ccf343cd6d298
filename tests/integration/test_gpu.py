"""GPU sandboxes through the real daemon, with a fake inventory (no GPU here) and with this machine's own.

The fake inventory (``SHOAL_GPU_INVENTORY``) names two GPUs whose device nodes are real character
devices made with mknod in a temporary directory, numbered as /dev/fuse (10:229): harmless to open,
and outside runc's default device allow-list, so opening one inside a sandbox works only if shoal
passed the node *and* its device-cgroup rule.  Libraries and ``nvidia-smi`` are small files.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import shoal
from shoal.exception import InvalidError, ResourceExhaustedError
from shoal.sdk._sync import run_blocking
from shoal.sdk.transport import default_client
from tests.conftest import Daemon, _require_root_and_runtime, running_daemon

H100 = {"index": 0, "name": "NVIDIA H100 80GB HBM3", "uuid": "GPU-11111111-2222-3333-4444-555555555555"}
A100 = {"index": 1, "name": "NVIDIA A100-SXM4-40GB", "uuid": "GPU-aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"}
FUSE = (10, 229)
FAKE_SMI = '#!/bin/sh\necho "fake-smi visible=$NVIDIA_VISIBLE_DEVICES cuda=$CUDA_VISIBLE_DEVICES"\n'


def _fake_host(root: Path) -> Path:
    """Device nodes, libraries, a tool and the inventory file that names them; returns the file."""
    for d in ("dev", "lib", "bin"):
        (root / d).mkdir()
    for name in ("nvidia0", "nvidia1", "nvidiactl", "nvidia-uvm", "nvidia-uvm-tools"):
        os.mknod(root / "dev" / name, 0o666 | 0o020000, os.makedev(*FUSE))
        os.chmod(root / "dev" / name, 0o666)
    (root / "lib" / "libcuda.so.1").write_text("fake libcuda\n")
    (root / "lib" / "libnvidia-ml.so.1").write_text("fake nvml\n")
    (root / "bin" / "nvidia-smi").write_text(FAKE_SMI)
    (root / "bin" / "nvidia-smi").chmod(0o755)
    inventory = {
        "driver_version": "999.1-fake",
        "gpus": [
            {**H100, "memory_mib": 81559, "device": str(root / "dev" / "nvidia0")},
            {**A100, "memory_mib": 40960, "device": str(root / "dev" / "nvidia1")},
        ],
        "control_devices": [str(root / "dev" / n) for n in ("nvidiactl", "nvidia-uvm", "nvidia-uvm-tools")],
        "libraries": [str(root / "lib" / "libcuda.so.1"), str(root / "lib" / "libnvidia-ml.so.1")],
        "tools": [str(root / "bin" / "nvidia-smi")],
    }
    path = root / "inventory.json"
    path.write_text(json.dumps(inventory))
    return path


@pytest.fixture(scope="module")
def gpu_daemon(daemon: Daemon) -> Iterator[Daemon]:
    """A daemon of its own whose GPU inventory is the fake one.

    It asks for the session's daemon first so that their settings of the SDK's environment nest:
    this one's is undone when the module ends, and the session's is back.
    """
    _require_root_and_runtime()
    root = Path(tempfile.mkdtemp(prefix="shoal-fake-gpus-"))
    root.chmod(0o711)  # sandboxes' mounts are made as their own (unprivileged) user
    inventory = _fake_host(root)
    os.environ["SHOAL_GPU_INVENTORY"] = str(inventory)
    try:
        with running_daemon() as d:
            os.environ.pop("SHOAL_GPU_INVENTORY", None)
            yield d
    finally:
        os.environ.pop("SHOAL_GPU_INVENTORY", None)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def gpu_app(gpu_daemon: Daemon) -> shoal.App:
    return shoal.App.lookup("gpu-tests", create_if_missing=True)


def _out(sb: shoal.Sandbox, script: str) -> str:
    p = sb.exec("bash", "-c", script)
    out = p.stdout.read()
    assert p.wait() == 0, (script, out, p.stderr.read())
    return str(out)


def _status() -> dict:
    return run_blocking(default_client().request("GET", "/v1/status"))  # type: ignore[no-any-return]


def test_gpu_sandbox_sees_its_gpu_driver_and_environment(gpu_app):
    sb = shoal.Sandbox.create(app=gpu_app, gpu="any", timeout=120)
    try:
        env = _out(sb, "echo $NVIDIA_VISIBLE_DEVICES $CUDA_VISIBLE_DEVICES $LD_LIBRARY_PATH")
        assert env.split() == [H100["uuid"], H100["uuid"], "/.shoal/nvidia/lib"]
        # Its GPU and the control nodes are there and open (bind + device-cgroup rule); the other GPU is not.
        nodes = _out(
            sb, "for n in nvidia0 nvidia1 nvidiactl nvidia-uvm nvidia-uvm-tools; do test -c /dev/$n && echo $n; done"
        )
        assert nodes.split() == ["nvidia0", "nvidiactl", "nvidia-uvm", "nvidia-uvm-tools"]
        assert _out(sb, "exec 3<>/dev/nvidia0 && exec 4<>/dev/nvidia-uvm && echo opened") == "opened\n"
        # The driver's files: read-only, found through PATH.
        assert _out(sb, "nvidia-smi") == f"fake-smi visible={H100['uuid']} cuda={H100['uuid']}\n"
        assert _out(sb, "cat /.shoal/nvidia/lib/libcuda.so.1") == "fake libcuda\n"
        assert sb.exec("bash", "-c", "echo x > /.shoal/nvidia/lib/libcuda.so.1").wait() != 0
        # The caller's own environment wins over shoal's.
        p = sb.exec("bash", "-c", "echo $CUDA_VISIBLE_DEVICES", env={"CUDA_VISIBLE_DEVICES": "none"})
        assert p.stdout.read() == "none\n"
    finally:
        sb.terminate()


def test_cpu_sandbox_gets_no_gpu(gpu_app):
    sb = shoal.Sandbox.create(app=gpu_app, timeout=60)
    try:
        out = _out(sb, "ls /dev; echo vis=$NVIDIA_VISIBLE_DEVICES; test -e /.shoal/nvidia && echo has-nvidia; true")
        assert "nvidia" not in out.replace("vis=", "")
        assert "vis=\n" in out
        assert _status()["gpu"]["gpus"][0]["held_by"] is None
    finally:
        sb.terminate()


def test_types_match_models_and_gpus_are_exclusive(gpu_app):
    a100 = shoal.Sandbox.create(app=gpu_app, gpu="a100", timeout=120)
    try:
        assert _out(a100, "echo $NVIDIA_VISIBLE_DEVICES") == A100["uuid"] + "\n"
        held = {g["uuid"]: g["held_by"] for g in _status()["gpu"]["gpus"]}
        assert held == {A100["uuid"]: a100.object_id, H100["uuid"]: None}
        # A type or count this machine lacks: InvalidError naming what it has.
        with pytest.raises(InvalidError, match=r"this machine has 2 GPUs: GPU 0: NVIDIA H100 80GB HBM3 \(79 GiB\)"):
            shoal.Sandbox.create(app=gpu_app, gpu="T4")
        with pytest.raises(InvalidError, match=r"asks for 2 GPUs of type H100 \(or H200\), but only 1 GPU here"):
            shoal.Sandbox.create(app=gpu_app, gpu="H100:2")
        with pytest.raises(InvalidError, match="A100-80GB"):
            shoal.Sandbox.create(app=gpu_app, gpu="A100-80GB")  # the A100 here is the 40 GB one
        # Present but held: ResourceExhaustedError naming the holder.
        with pytest.raises(ResourceExhaustedError, match=f"GPU 1 by {a100.object_id}"):
            shoal.Sandbox.create(app=gpu_app, gpu="A100-40GB")
        with pytest.raises(ResourceExhaustedError, match="only 1 of the 2"):
            shoal.Sandbox.create(app=gpu_app, gpu="any:2")
    finally:
        a100.terminate()
    # Released once its sandbox has ended: both GPUs can now go to one sandbox.
    both = shoal.Sandbox.create(app=gpu_app, gpu="ANY:2", timeout=60)
    try:
        assert _out(both, "echo $NVIDIA_VISIBLE_DEVICES") == f"{H100['uuid']},{A100['uuid']}\n"
        assert _out(both, "ls /dev | grep -c '^nvidia[0-9]'") == "2\n"
    finally:
        both.terminate()


def test_bad_gpu_strings_are_refused(gpu_app):
    with pytest.raises(InvalidError, match="Invalid GPU type"):
        shoal.Sandbox.create(app=gpu_app, gpu="Z100")
    with pytest.raises(InvalidError, match="lists are not supported"):
        shoal.Sandbox.create(app=gpu_app, gpu=["H100", "A100"])  # type: ignore[arg-type]
    # The daemon checks too, for callers that are not this SDK.
    body = {"app_id": gpu_app.app_id, "gpu": "H100:zero"}
    with pytest.raises(InvalidError, match="gpu: Invalid GPU count: zero"):
        run_blocking(default_client().request("POST", "/v1/sandboxes", json_body=body, idempotent=False))


def test_status_shows_the_inventory(gpu_daemon, gpu_app):
    gpu = _status()["gpu"]
    assert gpu["source"].startswith("file:") and gpu["driver_version"] == "999.1-fake"
    assert [(g["index"], g["name"], g["memory_mib"]) for g in gpu["gpus"]] == [
        (0, H100["name"], 81559),
        (1, A100["name"], 40960),
    ]
    sb = shoal.Sandbox.create(app=gpu_app, gpu="H100", timeout=60)
    try:
        res = subprocess.run(
            [sys.executable, "-m", "shoal", "status"], env=gpu_daemon.env, capture_output=True, text=True, timeout=60
        )
        assert res.returncode == 0, res.stderr
        line = next(ln for ln in res.stdout.splitlines() if ln.startswith("gpus"))
        assert "2 (driver 999.1-fake" in line
        assert f"0: {H100['name']}, 79 GiB, {H100['uuid']} (held by {sb.object_id})" in line
        assert f"1: {A100['name']}, 40 GiB, {A100['uuid']} (free)" in line
    finally:
        sb.terminate()


@pytest.mark.restart
def test_gpus_stay_held_across_a_restart_and_are_released_when_the_sandbox_ended_meanwhile(gpu_daemon, gpu_app):
    sb = shoal.Sandbox.create(app=gpu_app, gpu="H100!", timeout=120)
    gpu_daemon.restart(signal.SIGKILL)
    # Re-adopted with its GPU: still visible inside, still refused to others.
    assert _out(sb, "echo $NVIDIA_VISIBLE_DEVICES; test -c /dev/nvidia0 && echo dev") == f"{H100['uuid']}\ndev\n"
    with pytest.raises(ResourceExhaustedError, match=sb.object_id):
        shoal.Sandbox.create(app=gpu_app, gpu="H100")
    # The sandbox dies while the daemon is down: the next daemon releases its GPU.
    gpu_daemon.stop()
    # GPU sandboxes run under the runc-compatible runtime (runc or crun), never gVisor's runsc.
    runtime_root = next(d for d in (gpu_daemon.runtime_dir / "oci").iterdir() if d.name != "runsc")
    runc = shutil.which(runtime_root.name) or runtime_root.name
    subprocess.run([runc, "--root", str(runtime_root), "kill", sb.object_id, "KILL"], check=True, timeout=30)
    gpu_daemon.start()
    sb.wait(raise_on_termination=False)
    deadline = time.monotonic() + 10
    while True:  # its teardown (container removal) runs just after the sandbox is marked finished
        try:
            again = shoal.Sandbox.create(app=gpu_app, gpu="H100", timeout=60)
            break
        except ResourceExhaustedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    try:
        assert _out(again, "echo $NVIDIA_VISIBLE_DEVICES") == H100["uuid"] + "\n"
    finally:
        again.terminate()


def test_this_machine_without_gpus_says_so(daemon, monkeypatch):
    """The session daemon uses the machine's real inventory; on a machine without NVIDIA GPUs it is empty."""
    monkeypatch.setenv("SHOAL_RUNTIME_DIR", str(daemon.runtime_dir))  # not the fake-GPU daemon of this module
    app = shoal.App.lookup("gpu-tests-real", create_if_missing=True)
    gpu = _status()["gpu"]
    if gpu["gpus"]:
        pytest.skip("this machine has NVIDIA GPUs")
    assert gpu["source"] == "none" and gpu["problem"]
    with pytest.raises(InvalidError, match=r"gpu='A100' asks for 1 GPU of type A100-40GB .*this machine has no NVIDIA"):
        shoal.Sandbox.create(app=app, gpu="A100")
    with pytest.raises(InvalidError, match="this machine has no NVIDIA GPUs"):
        shoal.Sandbox.create(app=app, gpu="any")
