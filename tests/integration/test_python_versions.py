"""``Image.debian_slim(python_version=…)``: each version Modal programs ask for that a Debian suite carries.

Each is bootstrapped once from the host's Debian mirror (decision 0065; 3.14 from Debian testing), then behaves
like the default image: ``python``/``pip`` on PATH, pip installing into the system, apt sources of its own suite.
"""

from __future__ import annotations

import concurrent.futures

import pytest

import shoal
from shoal.exception import InvalidError

OTHER_SUITES = [("3.9", "bullseye"), ("3.13", "trixie"), ("3.14", "forky")]


@pytest.fixture(scope="module")
def other_suite_images(app) -> dict[str, shoal.Image]:
    """Each version's image with one build step (apt, from the suite's own sources), built side by side: each is a
    bootstrap and an apt-get update of a suite of its own, mostly waiting on the mirror (suite time)."""
    images = {v: shoal.Image.debian_slim(python_version=v).apt_install("jq") for v, _ in OTHER_SUITES}
    with concurrent.futures.ThreadPoolExecutor(len(images)) as pool:
        for built in pool.map(lambda image: image.build(app), images.values()):
            assert built.object_id
    return images


@pytest.mark.parametrize(("version", "codename"), OTHER_SUITES)
def test_a_python_version_of_another_debian_suite(app, other_suite_images, version: str, codename: str) -> None:
    # pip is checked by installing at run time.
    sb = shoal.Sandbox.create(app=app, image=other_suite_images[version], timeout=300)
    try:
        p = sb.exec(
            "sh",
            "-c",
            "python --version; . /etc/os-release; echo $VERSION_CODENAME;"
            " echo '{\"a\": 1}' | jq .a;"
            " pip install --quiet --no-deps tomli 2>&1 | grep -v WARNING; python -c 'import tomli; print(\"tomli\")'",
        )
        out = p.stdout.read().splitlines()
        assert p.wait() == 0, p.stderr.read()
        assert out[0].startswith(f"Python {version}."), out
        assert out[1:] == [codename, "1", "tomli"], out
    finally:
        sb.terminate()


def test_versions_no_suite_carries_are_refused_with_the_list(app) -> None:
    for version in ("3.10", "3.12"):
        with pytest.raises(InvalidError, match=r"3\.9 \(Debian bullseye\), 3\.11 \(Debian bookworm\), 3\.13"):
            shoal.Sandbox.create(app=app, image=shoal.Image.debian_slim(python_version=version))
