"""NVIDIA GPUs for sandboxes: Modal's ``gpu=`` strings, the host's inventory, exclusive allocation, passthrough.

Layers, each importable without the next:

- ``request``: parse ``"any"``, ``"H100"``, ``"A100-80GB:2"``, ``"H100!"`` and match them against
  the models a machine reports (pure; the SDK uses it to refuse bad strings before any call).
- ``inventory``: what the host has (NVML, else the driver's ``/proc`` files, or a fake inventory
  file for tests), and where the driver's user-space libraries and tools are.
- ``scheduler``: which free GPUs a request gets, the clear errors when it cannot, and the stored
  plan (devices, read-only binds, environment) that a sandbox's OCI spec is built from.
"""
