"""``shoal image ls | rm | prune`` against a daemon of the test's own (prune removes what other tests built)."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid

import shoal


def cli(daemon, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shoal", *args], env=daemon.env, capture_output=True, text=True, timeout=120
    )


def own_layers(daemon) -> set[str]:
    return {p.name for p in (daemon.data_dir / "images" / "layers").iterdir() if p.is_dir()}


def test_image_ls_rm_and_prune(own_daemon):
    own_daemon.restart_with("--warm-pool", "0")  # a pool keeps the default image in use (test_pool.py checks that)
    token = uuid.uuid4().hex[:8]
    app = shoal.App.lookup("cli-images", create_if_missing=True)
    blob = shoal.Image.debian_slim().run_commands(f"head -c 3000000 /dev/urandom > /blob-{token}").build()
    two = shoal.Image.debian_slim().run_commands(f"echo {token} > /x").run_commands(f"echo {token} > /y").build()

    r = cli(own_daemon, "image", "ls")
    assert r.returncode == 0, r.stderr
    assert blob.object_id in r.stdout
    assert "reclaimable with `shoal image prune`" in r.stdout and "free on its disk" in r.stdout
    listed = {i["image_id"]: i for i in json.loads(cli(own_daemon, "image", "ls", "--json").stdout)}
    assert listed[blob.object_id]["size"] >= 3_000_000
    everything = json.loads(cli(own_daemon, "image", "ls", "--all", "--json").stdout)
    intermediate = next(i for i in everything if i["recipe"].get("step") == f"RUN echo {token} > /x")
    assert intermediate["image_id"] not in listed  # shown with --all only

    # an image a running sandbox uses cannot be removed
    sb = shoal.Sandbox.create(app=app, image=blob, timeout=60)
    r = cli(own_daemon, "image", "rm", blob.object_id)
    assert r.returncode == 1 and "used by running sandboxes" in r.stderr
    sb.terminate()
    blob_layer = listed[blob.object_id]["layers"][-1]
    r = cli(own_daemon, "image", "rm", blob.object_id)
    assert r.returncode == 0, r.stderr
    assert "1 layers, 2.9 MiB freed" in r.stdout
    assert blob_layer not in own_layers(own_daemon)

    # a layer stays while another image lists it
    layer_x = intermediate["layers"][-1]
    r = cli(own_daemon, "image", "rm", intermediate["image_id"])
    assert "0 layers" in r.stdout and layer_x in own_layers(own_daemon)
    # the removed step is rebuilt on demand (its layer is still there, under the child: a new one is made)
    again = shoal.Image.debian_slim().run_commands(f"echo {token} > /x")
    sb = shoal.Sandbox.create(app=app, image=again, timeout=60)
    try:
        assert sb.exec("cat", "/x").stdout.read() == f"{token}\n"
    finally:
        sb.terminate()
    r = cli(own_daemon, "image", "rm", two.object_id)
    assert "2 layers" in r.stdout and layer_x not in own_layers(own_daemon)

    # prune --all keeps what a running sandbox stands on, and nothing else
    keep = shoal.Image.debian_slim().run_commands(f"echo {token} > /keep")
    sb = shoal.Sandbox.create(app=app, image=keep, timeout=60)
    try:
        listed = {i["image_id"]: i for i in json.loads(cli(own_daemon, "image", "ls", "--all", "--json").stdout)}
        under_sandbox = set(listed[keep.object_id]["layers"]) & own_layers(own_daemon)
        assert own_layers(own_daemon) - under_sandbox  # the rebuilt /x step's layer, at least
        r = cli(own_daemon, "image", "prune", "--all", "--json")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["removed_images"] >= 1
        assert own_layers(own_daemon) == under_sandbox  # every layer left is under the running sandbox
        assert [i["image_id"] for i in json.loads(cli(own_daemon, "image", "ls", "--all", "--json").stdout)] == [
            keep.object_id
        ]
    finally:
        sb.terminate()
    r = cli(own_daemon, "image", "prune", "--all", "--json")
    pruned = json.loads(r.stdout)
    assert (pruned["removed_images"], pruned["removed_layers"]) == (1, 2)  # the CA layer and /keep's
    assert own_layers(own_daemon) == set()
    # a layer that no image lists (a build that died between publishing and recording it) goes with plain prune
    stray = own_daemon.data_dir / "images" / "layers" / "im-0000000000000000strays"
    (stray / "etc").mkdir(parents=True)
    (stray / "etc" / "x").write_bytes(b"x" * 5000)
    r = cli(own_daemon, "image", "prune")
    assert r.returncode == 0 and "removed 1 layers" in r.stdout and "4.9 KiB freed" in r.stdout, r.stdout
    assert not stray.exists()

    # an Image this process resolved before the prune still works: it is resolved afresh
    sb = shoal.Sandbox.create(app=app, image=keep, timeout=60)
    try:
        p = sb.exec("cat", "/keep")
        assert p.stdout.read() == f"{token}\n"
    finally:
        sb.terminate()
