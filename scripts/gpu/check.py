"""The checks of ``scripts/gpu-check``, run against a shoal daemon that the script started.

Builds a small glibc image from this host's own C library and busybox (nvidia-smi needs glibc in
the image; the driver's libraries and tools come from shoal's passthrough, not from the image),
then proves, on a machine with an NVIDIA GPU:

1. the seed's form: ``Sandbox.create(gpu=..., app=app)`` then ``sb.exec("nvidia-smi")``;
2. ``nvidia-smi -L`` inside a ``gpu="any"`` sandbox lists exactly the GPU(s) the daemon allocated;
3. a CUDA program (``cuda-probe``: libcuda, a JIT-compiled PTX kernel, results checked) runs on it;
4. a second sandbox asking for more GPUs than are free gets ResourceExhaustedError, one asking for
   more than the machine has or a type it lacks gets InvalidError, and the GPU is free again after
   ``terminate()``;
5. TTI (create → first output of ``echo``) of a GPU sandbox beside a CPU one, same image.

Without an NVIDIA GPU it checks the CPU path and the "no GPU" error, prints
``no NVIDIA GPU found`` and exits 3.  Exit 0: every check passed; 1: a check failed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import shoal
from shoal.exception import InvalidError, ResourceExhaustedError
from shoal.sdk._sync import run_blocking
from shoal.sdk.transport import default_client

NO_GPU = 3
DRIVER_LIB_PREFIXES = ("libcuda", "libnvidia-")


def log(msg: str) -> None:
    print(f"[gpu-check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class CheckFailed(Exception):
    """A check did not hold."""


def expect(cond: bool, what: str) -> None:
    if not cond:
        raise CheckFailed(what)
    log(f"ok: {what}")


def status() -> dict[str, Any]:
    answer: dict[str, Any] = run_blocking(default_client().request("GET", "/v1/status"))
    return answer


# ------------------------------------------------------------------ the image


def _ldd(path: str) -> list[tuple[str, str]]:
    """(name in the image, host file) for each library ``path`` needs, driver libraries left out."""
    res = subprocess.run(["ldd", path], capture_output=True, text=True)
    out = []
    for line in res.stdout.splitlines():
        line = line.strip()
        if "=>" in line:
            name, _, rest = line.partition("=>")
            host = rest.strip().split(" (")[0].strip()
            name = name.strip()
        elif line.startswith("/"):
            host = line.split(" (")[0]
            name = os.path.basename(host)
        else:
            continue
        if host and os.path.isfile(host) and not name.startswith(DRIVER_LIB_PREFIXES):
            out.append((name, host))
    return out


def build_rootfs(root: Path, busybox: Path, probe: Path, driver_files: list[str]) -> None:
    """busybox (static) + cuda-probe + the host's glibc closure of them and of the driver's files."""
    libdir = root / "lib" / "x86_64-linux-gnu"
    for d in ("bin", "lib64", "etc", "tmp", "proc", "sys", "dev", "root"):
        (root / d).mkdir(parents=True, exist_ok=True)
    libdir.mkdir(parents=True, exist_ok=True)
    (root / "tmp").chmod(0o1777)
    shutil.copy2(busybox, root / "bin" / "busybox")
    applets = subprocess.run([str(busybox), "--list"], capture_output=True, text=True, check=True).stdout.split()
    for applet in applets:
        if applet != "busybox" and not (root / "bin" / applet).exists():
            os.symlink("busybox", root / "bin" / applet)
    shutil.copy2(probe, root / "bin" / "cuda-probe")
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (root / "etc" / "group").write_text("root:x:0:\n")
    needed: dict[str, str] = {}
    for f in [str(probe), *driver_files]:
        for name, host in _ldd(f):
            needed.setdefault(name, host)
    for name, host in sorted(needed.items()):
        shutil.copy2(os.path.realpath(host), libdir / name)
        if name.startswith("ld-linux"):
            shutil.copy2(os.path.realpath(host), root / "lib64" / name)
    log(f"image: busybox, cuda-probe and {len(needed)} host libraries: {', '.join(sorted(needed))}")


# ------------------------------------------------------------------ checks


def out_of(sb: shoal.Sandbox, *argv: str) -> str:
    p = sb.exec(*argv)
    out = str(p.stdout.read())
    err = str(p.stderr.read())
    rc = p.wait()
    if rc != 0:
        raise CheckFailed(f"{' '.join(argv)} exited {rc}: {out}{err}")
    return out


def tti(app: shoal.App, image: shoal.Image, gpu: str | None) -> tuple[float, float]:
    """(create → first output of echo, create alone) in ms, then terminate."""
    t0 = time.perf_counter()
    sb = shoal.Sandbox.create(app=app, image=image, gpu=gpu, timeout=120, block_network=True)
    t1 = time.perf_counter()
    p = sb.exec("echo", "hi")
    first = next(iter(p.stdout))
    t2 = time.perf_counter()
    sb.terminate()
    if first != "hi\n":
        raise CheckFailed(f"echo gave {first!r}")
    return (t2 - t0) * 1000, (t1 - t0) * 1000


def summary(values: list[float]) -> dict[str, float]:
    return {"p50": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def check_gpu(app: shoal.App, image: shoal.Image, gpus: list[dict[str, Any]], result: dict[str, Any]) -> None:
    n = len(gpus)
    # 1. The seed's form (its gpu="A100" would be refused here unless this machine has one).
    sb = shoal.Sandbox.create(gpu="any", app=app, image=image, timeout=300, block_network=True)
    try:
        held = {g["uuid"] for g in status()["gpu"]["gpus"] if g["held_by"] == sb.object_id}
        expect(len(held) == 1, f"the daemon allocated one GPU to {sb.object_id}: {sorted(held)}")
        p = sb.exec("nvidia-smi")
        smi = str(p.stdout.read())
        print(smi, flush=True)
        expect(p.wait() == 0, "nvidia-smi ran in the sandbox")
        result["nvidia_smi"] = smi
        # 2. Exactly the allocated GPU.
        listing = out_of(sb, "nvidia-smi", "-L")
        print(listing, flush=True)
        listed = {ln.split("UUID: ")[1].rstrip(")") for ln in listing.splitlines() if "UUID: " in ln}
        expect(listed == held, f"nvidia-smi -L lists exactly the allocated GPU ({sorted(held)})")
        env = out_of(sb, "sh", "-c", "echo $NVIDIA_VISIBLE_DEVICES $CUDA_VISIBLE_DEVICES")
        expect(env.split() == [*held, *held], f"NVIDIA_VISIBLE_DEVICES/CUDA_VISIBLE_DEVICES name it: {env.strip()}")
        # 3. A CUDA program runs on it.
        t0 = time.perf_counter()
        probe = out_of(sb, "cuda-probe")
        probe_ms = (time.perf_counter() - t0) * 1000
        print(probe, flush=True)
        lines = probe.splitlines()
        devices = [ln.split() for ln in lines if ln.startswith("device ")]
        expect(
            "devices 1" in lines and bool(devices) and devices[0][2] in held, "CUDA sees one device: the allocated one"
        )
        expect(any(ln.startswith("kernel ok ") for ln in lines), "a PTX kernel ran on it and its results checked")
        result["cuda_probe"] = probe
        result["cuda_probe_ms"] = probe_ms
        # 4. More than is free, more than there is, a type not here.
        if n == 1:
            try:
                shoal.Sandbox.create(gpu="any", app=app, image=image, block_network=True)
                raise CheckFailed("a second gpu='any' sandbox was created while the only GPU is held")
            except ResourceExhaustedError as exc:
                log(f"second sandbox refused: {exc}")
                expect(sb.object_id in str(exc), "ResourceExhaustedError names the sandbox holding the GPU")
        try:
            shoal.Sandbox.create(gpu=f"any:{n}", app=app, image=image, block_network=True)
            raise CheckFailed(f"gpu='any:{n}' was served while one GPU is held")
        except ResourceExhaustedError as exc:
            log(f"any:{n} refused: {exc}")
        try:
            shoal.Sandbox.create(gpu=f"any:{n + 1}", app=app, image=image, block_network=True)
            raise CheckFailed(f"gpu='any:{n + 1}' was served on a machine with {n}")
        except InvalidError as exc:
            expect(f"this machine has {n} GPU" in str(exc), f"any:{n + 1} is InvalidError naming what is here: {exc}")
        absent = next(t for t in ("T4", "B200", "L4") if not any(t in g["name"] for g in gpus))
        try:
            shoal.Sandbox.create(gpu=absent, app=app, image=image, block_network=True)
            raise CheckFailed(f"gpu={absent!r} was served")
        except InvalidError as exc:
            expect(gpus[0]["name"] in str(exc), f"gpu={absent!r} is InvalidError naming the model here: {exc}")
    finally:
        sb.terminate()
    again = shoal.Sandbox.create(gpu="any", app=app, image=image, block_network=True)
    again.terminate()
    log("ok: the GPU is free again after terminate()")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--carry", type=Path, required=True)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    result: dict[str, Any] = {"host": platform.node(), "kernel": platform.release(), "checks": "failed"}
    st = status()
    gpu = st["gpu"]
    result["runtime"] = f"{st['runtime']} ({st.get('runtime_path')})"
    result["gpu_inventory"] = gpu
    log(f"daemon {st['version']}, runtime {result['runtime']}")
    log(f"GPU inventory from {gpu['source']}: {json.dumps(gpu['gpus'])}")
    code = 1
    try:
        root = args.work / "image-root"
        build_rootfs(
            root, args.carry / "bin" / "busybox", args.carry / "bin" / "cuda-probe", gpu["tools"] + gpu["libraries"]
        )
        resp = run_blocking(default_client().request("POST", "/v1/images/import", json_body={"path": str(root)}))
        image = shoal.Image.from_id(resp["image_id"])
        app = shoal.App.lookup("gpu-check", create_if_missing=True)
        sb = shoal.Sandbox.create(app=app, image=image, timeout=60, block_network=True)
        expect(out_of(sb, "sh", "-c", "echo cpu-ok; ls /dev").startswith("cpu-ok"), "a CPU sandbox runs the image")
        sb.terminate()
        if not gpu["gpus"]:
            try:
                shoal.Sandbox.create(gpu="any", app=app, image=image, block_network=True)
                raise CheckFailed("gpu='any' was served on a machine without GPUs")
            except InvalidError as exc:
                expect("this machine has no NVIDIA GPUs" in str(exc), f"gpu='any' is refused clearly: {exc}")
        else:
            check_gpu(app, image, gpu["gpus"], result)
        kinds: list[str | None] = [None, "any"] if gpu["gpus"] else [None]
        times: dict[str, list[float]] = {str(k): [] for k in kinds}
        creates: dict[str, list[float]] = {str(k): [] for k in kinds}
        for kind in kinds:
            tti(app, image, kind)  # warm-up
        for _ in range(args.runs):
            for kind in kinds:  # interleaved, so drift hits both alike
                total, create = tti(app, image, kind)
                times[str(kind)].append(total)
                creates[str(kind)].append(create)
        result["tti_ms"] = {("gpu='any'" if k == "any" else "cpu"): summary(v) for k, v in times.items()}
        result["create_ms"] = {("gpu='any'" if k == "any" else "cpu"): summary(v) for k, v in creates.items()}
        print(f"\n{'TTI: create → first output (ms)':<44}{'n':>4}{'p50':>9}{'min':>9}{'max':>9}")
        for label in result["tti_ms"]:
            t, c = result["tti_ms"][label], result["create_ms"][label]
            print(f"{label + ' sandbox':<44}{t['n']:>4}{t['p50']:>9.1f}{t['min']:>9.1f}{t['max']:>9.1f}")
            print(f"{'  Sandbox.create alone':<44}{c['n']:>4}{c['p50']:>9.1f}{c['min']:>9.1f}{c['max']:>9.1f}")
        if gpu["gpus"]:
            result["checks"] = "passed"
            log("ALL GPU CHECKS PASSED")
            code = 0
        else:
            result["checks"] = "no NVIDIA GPU found"
            log(f"no NVIDIA GPU found ({gpu['problem']}): the GPU checks were skipped; everything else passed")
            code = NO_GPU
    except CheckFailed as exc:
        log(f"FAILED: {exc}")
    finally:
        if args.json:
            args.json.write_text(json.dumps(result, indent=2, default=str))
    return code


if __name__ == "__main__":
    sys.exit(main())
