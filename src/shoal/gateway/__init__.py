"""A gateway that speaks Modal's gRPC protocol, so that the unmodified official ``modal`` client drives this daemon.

It serves Modal's control plane (``modal.client.ModalClient``) and task command router
(``modal.task_command_router.TaskCommandRouter``) on one loopback TCP port, over the engine the daemon's own API
uses: a sandbox made through either is the other's too.  The service bases and messages are the ones the
``modal`` package ships (``modal_proto``, the optional ``gateway`` extra, pinned); without them the gateway is off.
``shoal gateway env`` prints what points a client at it.  What it serves and why: decision 0075.
"""
