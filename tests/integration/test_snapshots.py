"""Filesystem snapshots of running sandboxes, directory snapshots and images mounted into sandboxes."""

from __future__ import annotations

import time
from pathlib import Path, PurePosixPath

import pytest

import shoal
from shoal.sdk._sync import run_blocking
from shoal.sdk.transport import default_client
from tests.conftest import DEFAULT_RUNTIME

NO_GVISOR_MOUNTS = (
    "mount_image into a running gVisor sandbox is not built yet (decision 0069); test_gvisor.py asserts its clear"
    " error and tests snapshot_directory of a gVisor sandbox"
)


def sh(sb: shoal.Sandbox, script: str) -> tuple[int, str, str]:
    p = sb.exec("sh", "-c", script)
    rc = p.wait()
    return rc, p.stdout.read(), p.stderr.read()


def image_layers(image_id: str) -> list[str]:
    images = run_blocking(default_client().request("GET", "/v1/images"))["images"]
    return next(i["layers"] for i in images if i["image_id"] == image_id)


def staging_entries(daemon) -> list[Path]:
    return list((daemon.data_dir / "images" / "tmp").iterdir())


@pytest.fixture
def sandboxes(app):
    """Sandboxes created by the test (``sandboxes.new(...)``), all terminated at its end."""

    class Made(list):
        def new(self, **kwargs):
            sb = shoal.Sandbox.create(app=app, timeout=180, **kwargs)
            self.append(sb)
            return sb

    made = Made()
    yield made
    for sb in made:
        sb.terminate()


# ---------------------------------------------------------------------------------------------- snapshot_filesystem


def test_a_new_sandbox_from_a_snapshot_sees_the_files_and_the_deletions(sandboxes):
    sb = sandboxes.new()
    rc, _, err = sh(
        sb,
        "set -e; mkdir -p /app/data; echo hello > /app/data/note.txt;"
        " rm /etc/issue;"  # a whiteout over the image's file
        " rm -rf /usr/share/zoneinfo; mkdir /usr/share/zoneinfo; echo mine > /usr/share/zoneinfo/only;"  # opaque
        " ln -s /etc/passwd /app/link; ln /app/data/note.txt /app/hard;"
        " echo '#!/bin/sh' > /app/tool; chown 1000:1000 /app/tool; chmod 4755 /app/tool;"
        " mkfifo /app/fifo; truncate -s 64G /app/sparse",
    )
    assert rc == 0, err
    image = sb.snapshot_filesystem()
    assert isinstance(image, shoal.Image) and image.object_id.startswith("im-")
    assert sb.poll() is None  # the snapshot did not stop it

    sb2 = sandboxes.new(image=image)
    assert sh(sb2, "cat /app/data/note.txt")[1] == "hello\n"
    assert sh(sb2, "test -e /etc/issue || echo gone")[1] == "gone\n"
    assert sh(sb2, "ls /usr/share/zoneinfo")[1] == "only\n"
    assert sh(sb2, "readlink /app/link")[1] == "/etc/passwd\n"
    inodes = sh(sb2, "stat -c %i /app/hard /app/data/note.txt")[1].split()
    assert len(inodes) == 2 and inodes[0] == inodes[1]
    assert sh(sb2, "stat -c '%a %u %g' /app/tool")[1] == "4755 1000 1000\n"
    # gVisor keeps a FIFO made inside in its kernel's memory, never on disk: no snapshot can carry it (0069).
    fifo = "No such file" if DEFAULT_RUNTIME == "gvisor" else "fifo\n"
    assert fifo in sh(sb2, "stat -c %F /app/fifo 2>&1")[1]
    # A sparse file stays sparse: 64 GiB apparent, nothing allocated.
    # (gVisor's kernel counts a file's blocks from its size, whatever the disk holds: only the size shows.)
    blocks = "%s" if DEFAULT_RUNTIME == "gvisor" else "%s %b"
    assert sh(sb2, f"stat -c '{blocks}' /app/sparse")[1] == (f"{64 << 30}\n" if blocks == "%s" else f"{64 << 30} 0\n")
    # The image's config came along: no command given, and the sandbox stays up.
    assert sb2.poll() is None
    # The first sandbox carries on with its own filesystem.
    assert sh(sb, "echo more >> /app/data/note.txt; cat /app/data/note.txt")[1] == "hello\nmore\n"
    assert sh(sb2, "cat /app/data/note.txt")[1] == "hello\n"


def test_a_snapshot_of_a_snapshot_stacks_its_changes(sandboxes):
    sb = sandboxes.new()
    sh(sb, "echo one > /one")
    first = sb.snapshot_filesystem()
    sb2 = sandboxes.new(image=first)
    sh(sb2, "echo two > /two; rm /one")
    second = sb2.snapshot_filesystem()
    assert image_layers(second.object_id)[:-1] == image_layers(first.object_id)
    sb3 = sandboxes.new(image=second)
    assert sh(sb3, "cat /two; test -e /one || echo no-one")[1] == "two\nno-one\n"


def test_a_snapshot_of_an_unchanged_sandbox_adds_no_layer(sandboxes):
    sb = sandboxes.new()
    parent = sb.snapshot_filesystem()  # first call may pay for warming up the SDK
    t0 = time.monotonic()
    image = sb.snapshot_filesystem()
    took = time.monotonic() - t0
    assert image.object_id != parent.object_id
    base_layers = image_layers(image.object_id)
    assert base_layers == image_layers(parent.object_id)
    assert took < 1.0, took
    sb2 = sandboxes.new(image=image)
    assert sh(sb2, "python -c 'print(1)'")[1] == "1\n"


def test_resolver_files_written_by_the_engine_are_left_out_but_changes_kept(sandboxes):
    sb = sandboxes.new()
    assert "localhost" in sh(sb, "cat /etc/hosts")[1]  # written by the engine at start
    image = sb.snapshot_filesystem()
    assert image_layers(image.object_id) == image_layers(sb.snapshot_filesystem().object_id)
    sh(sb, "echo '10.9.9.9 added-by-user' >> /etc/hosts")
    changed = sb.snapshot_filesystem()
    offline = sandboxes.new(image=changed, block_network=True)  # nothing rewrites /etc/hosts there
    assert "added-by-user" in sh(offline, "cat /etc/hosts")[1]
    untouched = sandboxes.new(image=image, block_network=True)
    assert "added-by-user" not in sh(untouched, "cat /etc/hosts")[1]


@pytest.mark.slow
def test_a_snapshot_of_ten_thousand_small_files(sandboxes):
    sb = sandboxes.new()
    rc, _, err = sh(
        sb,
        "python -c \"import os\nos.makedirs('/many/a/b', exist_ok=True)\n"
        "for i in range(10000):\n  open(f'/many/a/b/f{i}', 'w').write(str(i))\"",
    )
    assert rc == 0, err
    image = sb.snapshot_filesystem(timeout=120)
    sb2 = sandboxes.new(image=image)
    assert sh(sb2, "ls /many/a/b | wc -l; cat /many/a/b/f0 /many/a/b/f9999")[1] == "10000\n09999"


def test_a_snapshot_while_a_process_writes_continuously(sandboxes):
    sb = sandboxes.new()
    writer = sb.exec(
        "sh",
        "-c",
        "i=0; while true; do echo line-$i >> /log; echo $i > /counter.tmp; mv /counter.tmp /counter; i=$((i+1)); done",
    )
    time.sleep(0.5)
    images = []
    for _ in range(3):
        images.append(sb.snapshot_filesystem())
        time.sleep(0.3)  # the writer goes on between snapshots (under gVisor each loop starts an `mv`: ~50 ms)
    assert writer.poll() is None  # the writer never stopped
    assert sb.poll() is None
    counts = []
    for image in images:
        sb2 = sandboxes.new(image=image)
        lines = sh(sb2, "cat /log")[1].splitlines()
        complete = lines[:-1]  # the last line may have been mid-write
        assert complete == [f"line-{i}" for i in range(len(complete))]
        assert sh(sb2, "cat /counter")[1].strip().isdigit()
        counts.append(len(lines))
        sb2.terminate()
    assert counts == sorted(counts) and counts[-1] > counts[0] > 0


def test_snapshot_timeout_raises_and_leaves_nothing_behind(daemon, sandboxes):
    sb = sandboxes.new()
    rc, _, err = sh(
        sb,
        "python -c \"import os\nfor d in range(40):\n  os.makedirs(f'/t/{d}')\n"
        "  for i in range(1000):\n    open(f'/t/{d}/{i}', 'w').write('x' * 100)\"",
    )
    assert rc == 0, err
    before = run_blocking(default_client().request("GET", "/v1/images"))["images"]
    with pytest.raises(shoal.exception.TimeoutError):
        sb.snapshot_filesystem(timeout=1)
    after = run_blocking(default_client().request("GET", "/v1/images"))["images"]
    assert len(after) == len(before)
    assert staging_entries(daemon) == []
    assert sb.poll() is None


def test_snapshot_of_a_finished_sandbox_is_refused(sandboxes):
    sb = sandboxes.new()
    sb.terminate()
    with pytest.raises(shoal.exception.ConflictError):
        sb.snapshot_filesystem()


# ---------------------------------------------------------------------------------------------- directories and mounts


@pytest.mark.skipif(DEFAULT_RUNTIME == "gvisor", reason=NO_GVISOR_MOUNTS)
def test_snapshot_directory_then_mount_image_in_another_sandbox(sandboxes):
    sb = sandboxes.new()
    assert sh(sb, "mkdir -p /repo/src/pkg && echo code > /repo/src/pkg/m.py && echo readme > /repo/README")[0] == 0
    image = sb.snapshot_directory("/repo")

    other = sandboxes.new()
    sh(other, "mkdir -p /work && echo old > /work/old")
    other.mount_image("/work", image)
    assert sh(other, "ls /work")[1] == "README\nsrc\n"  # replaces what was there
    assert sh(other, "cat /work/src/pkg/m.py")[1] == "code\n"
    assert sh(other, "echo new > /work/new && cat /work/new")[1] == "new\n"  # writable
    assert sh(other, "stat -c '%u' /work/src")[1] == "0\n"

    # Mounted at a path that does not exist yet: created.
    other.mount_image(PurePosixPath("/mnt/deep/repo"), image)
    assert sh(other, "cat /mnt/deep/repo/README")[1] == "readme\n"

    # A directory snapshot of a mounted image holds the image and what was written into it.
    again = other.snapshot_directory("/work")
    third = sandboxes.new()
    third.mount_image("/r", again)
    assert sh(third, "ls /r")[1] == "README\nnew\nsrc\n"

    other.unmount_image("/work")
    assert sh(other, "ls /work")[1] == "old\n"
    other.unmount_image("/mnt/deep/repo")
    assert sh(other, "ls /mnt/deep/repo")[1] == ""
    # Still usable as a root image? It has no /bin, but mount_image is its purpose; the original is untouched.
    assert sh(sb, "cat /repo/README")[1] == "readme\n"


@pytest.mark.skipif(DEFAULT_RUNTIME == "gvisor", reason=NO_GVISOR_MOUNTS)
def test_mount_image_replaces_an_earlier_mount_at_the_same_path(sandboxes):
    a, b = sandboxes.new(), sandboxes.new()
    sh(a, "mkdir /d1 /d2; echo one > /d1/f; echo two > /d2/f")
    one, two = a.snapshot_directory("/d1"), a.snapshot_directory("/d2")
    b.mount_image("/m", one)
    b.mount_image("/m", two)
    assert sh(b, "cat /m/f")[1] == "two\n"
    assert sh(b, "grep -c ' /m ' /proc/mounts")[1] == "1\n"
    b.unmount_image("/m")
    assert sh(b, "ls /m")[1] == ""


@pytest.mark.skipif(DEFAULT_RUNTIME == "gvisor", reason=NO_GVISOR_MOUNTS)
def test_a_filesystem_snapshot_mounts_too(sandboxes):
    a = sandboxes.new()
    sh(a, "echo x > /x")
    image = a.snapshot_filesystem()
    b = sandboxes.new()
    b.mount_image("/other-root", image)
    assert sh(b, "cat /other-root/x; test -x /other-root/usr/bin/python3 && echo py")[1] == "x\npy\n"


@pytest.mark.skipif(DEFAULT_RUNTIME == "gvisor", reason=NO_GVISOR_MOUNTS)
def test_snapshot_and_mount_errors(sandboxes):
    sb = sandboxes.new()
    sh(sb, "mkdir -p /d; ln -s /etc /via-link")
    image = sb.snapshot_directory("/d")
    with pytest.raises(shoal.exception.InvalidError):
        sb.snapshot_directory("relative/path")
    with pytest.raises(shoal.exception.NotFoundError):
        sb.snapshot_directory("/no/such/dir")
    with pytest.raises(shoal.exception.InvalidError):
        sb.snapshot_directory("/via-link")  # links are not followed
    with pytest.raises(shoal.exception.InvalidError):
        sb.mount_image("/", image)
    with pytest.raises(shoal.exception.InvalidError):
        sb.mount_image("mnt", image)
    with pytest.raises(TypeError):
        sb.mount_image("/mnt", image.object_id)
    with pytest.raises(TypeError):
        sb.mount_image(42, image)
    for system in ("/proc/x", "/sys/y", "/dev/z", "/.shoal/bin"):
        with pytest.raises(shoal.exception.InvalidError):
            sb.mount_image(system, image)
    with pytest.raises(shoal.exception.InvalidError):
        sb.mount_image("/via-link/sub", image)
    with pytest.raises(shoal.exception.InvalidError):
        sb.unmount_image("/never-mounted")
    with pytest.raises(shoal.exception.InvalidError):
        sb.snapshot_filesystem(ttl=0)
    with pytest.raises(shoal.exception.NotFoundError):
        sb.mount_image("/m", shoal.Image.from_id("im-" + "A" * 22))
    # None of this touched the host's /etc.
    assert sh(sb, "ls /etc/passwd")[0] == 0


# ---------------------------------------------------------------------------------------------- the seed


@pytest.mark.slow
def test_seed_snapshots_section_verbatim(daemon):
    """The seed's "Snapshots" section as written (``import shoal as modal``).

    Depends on outbound network from sandboxes and on the host's extra CA
    certificates being trusted inside them (``pip install pandas`` passes a
    TLS-inspecting proxy here): the image builder adds those to the base image.
    """
    import shoal as modal

    app = modal.App.lookup("sandbox-app", create_if_missing=True)

    sb = modal.Sandbox.create(app=app)

    # Set up environment
    sb.exec("pip", "install", "pandas").wait()
    sb.exec("mkdir", "/app/data").wait()

    # Create snapshot
    image = sb.snapshot_filesystem()
    sb.terminate()

    # Use snapshot for new sandbox
    sb2 = modal.Sandbox.create(image=image, app=app)
    sb2.exec("python", "-c", "import pandas; print(pandas.__version__)").wait()

    # What a user would check: pandas imports in the new sandbox.
    p = sb2.exec("python", "-c", "import pandas; print(pandas.__version__)")
    assert p.wait() == 0, p.stderr.read()
    assert p.stdout.read().strip()[0].isdigit()
    sb2.terminate()


@pytest.mark.slow
def test_a_snapshot_past_the_layer_limit_is_flattened(monkeypatch):
    from tests.conftest import running_daemon

    monkeypatch.setenv("SHOAL_SNAPSHOT_MAX_LAYERS", "1")
    with running_daemon():
        app = shoal.App.lookup("flatten", create_if_missing=True)
        sb = shoal.Sandbox.create(app=app, timeout=120)
        try:
            sh(sb, "echo kept > /kept; rm /etc/issue; mkdir -p /srv/x")
            image = sb.snapshot_filesystem()
            assert len(image_layers(image.object_id)) == 1
            sb2 = shoal.Sandbox.create(app=app, image=image, timeout=120)
            try:
                out = sh(
                    sb2, "cat /kept; test -e /etc/issue || echo gone; test -d /srv/x && echo dir; python -c 'print(1)'"
                )[1]
                assert out == "kept\ngone\ndir\n1\n"
                assert sh(sb2, "test -e /.shoal/bin/shoal-agent && echo agent")[1] == "agent\n"
            finally:
                sb2.terminate()
        finally:
            sb.terminate()


@pytest.mark.restart
@pytest.mark.slow
def test_a_daemon_killed_mid_snapshot_leaves_no_half_layer(own_daemon):
    import signal
    import threading

    app = shoal.App.lookup("snapshot-kill", create_if_missing=True)
    sb = shoal.Sandbox.create(app=app, timeout=180)
    rc, _, err = sh(
        sb,
        "python -c \"import os\nfor d in range(40):\n  os.makedirs(f'/t/{d}')\n"
        "  for i in range(1000):\n    open(f'/t/{d}/{i}', 'w').write('x')\"",
    )
    assert rc == 0, err
    layers_dir = own_daemon.data_dir / "images" / "layers"
    layers_before = set(layers_dir.iterdir())
    images_before = {i["image_id"] for i in run_blocking(default_client().request("GET", "/v1/images"))["images"]}
    outcome: list[BaseException | shoal.Image] = []

    def snapshot() -> None:
        try:
            outcome.append(sb.snapshot_filesystem(timeout=120))
        except BaseException as exc:
            outcome.append(exc)

    t = threading.Thread(target=snapshot)
    t.start()
    deadline = time.monotonic() + 30
    while not staging_entries(own_daemon) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert staging_entries(own_daemon), "the snapshot never started copying"
    own_daemon.stop(signal.SIGKILL)
    t.join(30)
    assert outcome and isinstance(outcome[0], shoal.exception.Error), outcome
    own_daemon.start()
    run_blocking(default_client().request("GET", "/v1/status"))  # answers once its start-up (and clean-up) is done
    assert staging_entries(own_daemon) == []  # cleared at start
    assert set(layers_dir.iterdir()) == layers_before
    images_after = {i["image_id"] for i in run_blocking(default_client().request("GET", "/v1/images"))["images"]}
    assert images_after == images_before
    # The sandbox was re-adopted, and a snapshot now completes.
    assert sb.poll() is None
    image = sb.snapshot_filesystem(timeout=120)
    sb2 = shoal.Sandbox.create(app=app, image=image, timeout=60)
    try:
        assert sh(sb2, "ls /t | wc -l; cat /t/39/999")[1] == "40\nx"
    finally:
        sb2.terminate()
        sb.terminate()
