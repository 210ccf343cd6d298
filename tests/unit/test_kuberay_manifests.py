"""deploy/kuberay/: the RayCluster that runs shoal on Kubernetes, checked against KubeRay's published CRD schema.

No Kubernetes API server can be reached from where this runs, so the check is the one the API server would make
of the object's shape: the CRD's OpenAPI schema (tests/data/kuberay, KubeRay v1.7.0, unchanged), made strict about
unknown fields as ``kubectl apply --validate=strict`` is.  CEL rules (``x-kubernetes-validations``) are not
evaluated.  Then what shoal needs of it: the node script runs in every Ray container, which is privileged, with the
token and a data directory that is not the container's overlay root.
"""

from __future__ import annotations

import copy
import gzip
import re
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy" / "kuberay"
CRD = REPO / "tests" / "data" / "kuberay" / "ray.io_rayclusters.yaml.gz"


def _strict(schema: Any) -> Any:
    """The CRD's structural schema with unknown fields refused wherever it lists the fields (the API server prunes
    them silently; strict validation refuses them, which catches a misspelt field)."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if (
        "properties" in schema
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@cache
def _validator() -> jsonschema.protocols.Validator:
    crd = yaml.load(gzip.decompress(CRD.read_bytes()), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    assert crd["kind"] == "CustomResourceDefinition" and crd["spec"]["names"]["kind"] == "RayCluster"
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    assert version["served"] and version["storage"]
    schema = _strict(version["schema"]["openAPIV3Schema"])
    schema["properties"]["apiVersion"] = {"const": "ray.io/v1"}
    schema["properties"]["kind"] = {"const": "RayCluster"}
    schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind", "metadata", "spec"})
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def _errors(doc: dict[str, Any]) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in _validator().iter_errors(doc)]


def _documents() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in sorted(DEPLOY.glob("*.yaml")):
        docs += [(path.name, d) for d in yaml.safe_load_all(path.read_text()) if d is not None]
    return docs


def _cluster() -> dict[str, Any]:
    clusters = [d for _, d in _documents() if d.get("kind") == "RayCluster"]
    assert len(clusters) == 1
    return clusters[0]


def _groups(cluster: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    spec = cluster["spec"]
    return [("head", spec["headGroupSpec"])] + [("worker", g) for g in spec["workerGroupSpecs"]]


def test_every_manifest_is_a_raycluster_the_published_schema_accepts():
    docs = _documents()
    assert docs, "no manifests in deploy/kuberay"
    for name, doc in docs:
        assert doc.get("kind") == "RayCluster", f"{name}: {doc.get('kind')} has no schema to be checked against"
        assert _errors(doc) == [], name


@pytest.mark.parametrize(
    ("what", "change"),
    [
        ("a misspelt field", lambda c: c["spec"].__setitem__("workerGroupSpec", c["spec"].pop("workerGroupSpecs"))),
        ("a count given as text", lambda c: c["spec"]["workerGroupSpecs"][0].__setitem__("replicas", "two")),
        (
            "a container with no name",
            lambda c: c["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0].pop("name"),
        ),
        ("an unknown auth mode", lambda c: c["spec"]["authOptions"].__setitem__("mode", "password")),
        ("another API group", lambda c: c.__setitem__("apiVersion", "ray.io/v1alpha1")),
    ],
)
def test_the_check_refuses_what_the_api_server_would(what, change):
    broken = copy.deepcopy(_cluster())
    change(broken)
    assert _errors(broken), f"{what} passed the schema check"


def test_each_ray_container_runs_shoal_beside_its_ray_node():
    cluster = _cluster()
    # KubeRay leaves the command alone only with this annotation; else it replaces it with a bare `ray start`.
    assert cluster["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"
    assert cluster["spec"]["authOptions"]["mode"] == "token"
    pin = re.search(r'"ray==([0-9.]+)"', (REPO / "pyproject.toml").read_text())
    assert pin is not None and cluster["spec"]["rayVersion"] == pin.group(1)
    for role, group in _groups(cluster):
        pod = group["template"]["spec"]
        ray = pod["containers"][0]  # KubeRay's Ray container is the first
        assert " ".join(ray["command"] + ray["args"]).endswith(f"/opt/shoal/deploy/kuberay/shoal-node {role}")
        assert ray["securityContext"]["privileged"] is True
        assert "shoal_slot" in group["rayStartParams"]["resources"]
        env = {e["name"]: e for e in ray["env"]}
        assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
        assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
        port = int(env["SHOAL_PORT"]["value"])
        assert {"containerPort": port, "name": "shoal"} in ray["ports"]
        mounts = {m["mountPath"]: m["name"] for m in ray["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        # Overlay upper directories cannot live on the container's own overlay root.
        assert "emptyDir" in volumes[mounts[env["SHOAL_DATA_DIR"]["value"]]]
        token_dir = str(Path(env["SHOAL_TOKEN_FILE"]["value"]).parent)
        assert volumes[mounts[token_dir]]["secret"]["secretName"] == "shoal-api-token"
    head = cluster["spec"]["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "127.0.0.1"


def test_the_image_and_the_node_script_are_there():
    script = DEPLOY / "shoal-node"
    assert script.stat().st_mode & 0o111
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True).returncode == 0
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert "make system venv" in dockerfile and "/opt/shoal" in dockerfile
    images = {g["template"]["spec"]["containers"][0]["image"] for _, g in _groups(_cluster())}
    assert len(images) == 1, "every Ray pod runs the same shoal image"


def test_the_node_script_refuses_to_start_outside_kuberay():
    out = subprocess.run(
        ["bash", str(DEPLOY / "shoal-node"), "head"],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin"},
        check=False,
    )
    assert out.returncode != 0 and "KUBERAY_GEN_RAY_START_CMD" in out.stderr
