"""The stored sandbox spec: typed in the daemon, the same flat JSON on disk as every earlier version wrote."""

from __future__ import annotations

import json

from shoal.store.spec import SandboxSpec
from shoal.wire.images import ImageRef
from shoal.wire.sandboxes import CreateSandbox, ReadinessProbe


def test_a_spec_survives_its_stored_form():
    spec = SandboxSpec(
        request=CreateSandbox(
            app_id="ap-1",
            args=["sleep", "10"],
            image=ImageRef(kind="id", image_id="im-1"),
            env={"A": "1"},
            timeout=60,
            idle_timeout=5,
            readiness_probe=ReadinessProbe(tcp_port=8080),
            encrypted_ports=[8080],
        ),
        image_id="im-1",
        image_env={"PATH": "/bin"},
        image_workdir="/app",
        image_user="nobody",
        image_layers=["im-a", "im-b"],
        gpu_plan={"gpus": [{"key": "GPU-1"}], "devices": [], "binds": [], "env": {"X": "1"}},
        sealed_env="sealed-bytes",
        image_mounts={"/mnt": {"image_id": "im-2", "layers": ["im-c"]}},
        mounted_layers=["im-c"],
    )
    stored = json.loads(json.dumps(spec.to_json()))
    assert stored["timeout"] == 60 and stored["image_id"] == "im-1" and stored["gpu_plan"]["gpus"][0]["key"] == "GPU-1"
    assert "secret_env" not in stored
    assert SandboxSpec.from_json(stored) == spec


def test_secrets_never_reach_the_stored_form():
    spec = SandboxSpec(request=CreateSandbox(app_id="ap-1", secret_env={"KEY": "value"}), sealed_env="x")
    assert "value" not in json.dumps(spec.to_json())


def test_what_an_older_version_stored_still_reads():
    # A version from before sealing, image layers and GPU plans: secrets in the clear, a CPU sandbox.
    old = {"app_id": "ap-1", "args": [], "timeout": 300, "secret_env": {"KEY": "v"}, "image_id": "im-9", "unknown": 1}
    spec = SandboxSpec.from_json(old, "sb-1")
    assert spec.request.timeout == 300
    assert spec.legacy_secret_env == {"KEY": "v"}
    assert spec.image_id == "im-9" and spec.image_layers == [] and spec.gpu_plan is None and spec.sealed_env is None


def test_a_request_that_no_longer_validates_is_kept_as_stored():
    spec = SandboxSpec.from_json({"app_id": "ap-1", "timeout": 10 * 24 * 3600}, "sb-1")
    assert spec.request.timeout == 10 * 24 * 3600
