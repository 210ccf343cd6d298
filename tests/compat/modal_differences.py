"""Where shoal's surface differs from modal 1.6.4's on purpose or is not built yet: one line each, with why.

``test_modal_surface`` fails on any difference not listed here, and on a listed one that no longer differs.
The README's compatibility table is made from this list (``python -m tests.compat.table``).
"""

from __future__ import annotations

FUNCTIONS = "Modal Functions, Classes, web servers and deployments: shoal runs sandboxes only"
NO_BILLING = "shoal keeps no cost or usage accounting (Modal's billing statistics)"
INTERACTIVE = "attaching the program's own terminal: `shoal sandbox shell` / `exec -it` do it from the CLI"
CLOUD_AUTH = "cloud registry credentials: from_registry(secret=) covers registries with a user and password"
PRIVATE_REPOS = "private git repositories are not built; pip_install() of a git+https URL with a token works"
MAMBA = "micromamba and its conda channels are not reachable from a host limited to PyPI, Debian and npm"

DIFFERENCES: dict[str, str] = {
    "App.cls: unimplemented": FUNCTIONS,
    "App.deploy: unimplemented": FUNCTIONS,
    "App.function: unimplemented": FUNCTIONS,
    "App.include: unimplemented": FUNCTIONS,
    "App.local_entrypoint: unimplemented": FUNCTIONS,
    "App.server: unimplemented": FUNCTIONS,
    "Image.run_function: unimplemented": FUNCTIONS,
    "App.stats: unimplemented": NO_BILLING,
    "ContainerProcess.attach: unimplemented": INTERACTIVE,
    "Image.shell: unimplemented": INTERACTIVE,
    "Image.from_aws_ecr: unimplemented": CLOUD_AUTH,
    "Image.from_gcp_artifact_registry: unimplemented": CLOUD_AUTH,
    "Image.from_name: unimplemented": "named, published images (a Modal workspace feature) are not built",
    "Image.publish: unimplemented": "named, published images (a Modal workspace feature) are not built",
    "Image.micromamba: unimplemented": MAMBA,
    "Image.micromamba_install: unimplemented": MAMBA,
    "Image.pip_install_private_repos: unimplemented": PRIVATE_REPOS,
}
