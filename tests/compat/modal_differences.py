"""Where shoal's surface differs from modal 1.6.4's on purpose or is not built yet: one line each, with why.

``test_modal_surface`` fails on any difference not listed here, and on a listed one that no longer differs.
The README's compatibility table is made from this list (``python -m tests.compat.table``).
"""

from __future__ import annotations

FUNCTIONS = "Modal Functions, Classes, web servers and deployments: shoal runs sandboxes only"
DASHBOARD = "no web dashboard yet (the operators issue)"
APP_META = "app descriptions, tags, info, logs and stats are not built yet"
INTERACTIVE = "interactive terminals come with `shoal sandbox shell` (the operators issue)"
TODO_IMAGE = "image build step not built yet"
CLOUD_AUTH = "cloud registry credentials: from_registry(secret=) covers registries with a user and password"
MAMBA = "micromamba and its conda channels are not reachable from a host limited to PyPI, Debian and npm"

DIFFERENCES: dict[str, str] = {
    "App.cls: missing": FUNCTIONS,
    "App.deploy: missing": FUNCTIONS,
    "App.function: missing": FUNCTIONS,
    "App.include: missing": FUNCTIONS,
    "App.local_entrypoint: missing": FUNCTIONS,
    "App.registered_classes: missing": FUNCTIONS,
    "App.registered_entrypoints: missing": FUNCTIONS,
    "App.registered_functions: missing": FUNCTIONS,
    "App.registered_web_endpoints: missing": FUNCTIONS,
    "App.server: missing": FUNCTIONS,
    "Image.run_function: missing": FUNCTIONS,
    "App.description: missing": APP_META,
    "App.get_tags: missing": APP_META,
    "App.set_tags: missing": APP_META,
    "App.info: missing": APP_META,
    "App.logs: missing": APP_META,
    "App.stats: missing": APP_META,
    "App.sandboxes: missing": APP_META,
    "App.get_dashboard_url: missing": DASHBOARD,
    "Image.get_dashboard_url: missing": DASHBOARD,
    "Sandbox.get_dashboard_url: missing": DASHBOARD,
    "Secret.get_dashboard_url: missing": DASHBOARD,
    "Volume.get_dashboard_url: missing": DASHBOARD,
    "ContainerProcess.attach: missing": INTERACTIVE,
    "Image.shell: missing": INTERACTIVE,
    "Image.from_aws_ecr: missing": CLOUD_AUTH,
    "Image.from_gcp_artifact_registry: missing": CLOUD_AUTH,
    "Image.from_name: missing": "named, published images (a Modal workspace feature) are not built",
    "Image.publish: missing": "named, published images (a Modal workspace feature) are not built",
    "Image.logs: missing": "build output is shown while building (enable_output); it is not kept per image",
    "Image.micromamba: missing": MAMBA,
    "Image.micromamba_install: missing": MAMBA,
    "Image.pip_install_private_repos: missing": TODO_IMAGE,
    "Image.poetry_install_from_file: missing": TODO_IMAGE,
}
