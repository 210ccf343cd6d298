"""A running sandbox's network, changed from outside: connect tokens for its authenticating proxy and its
outbound policy.  Part of :class:`shoal.sdk.sandbox.Sandbox`; the attributes it uses are the sandbox's own."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from shoal.exception import InvalidError
from shoal.sdk._checks import check_port
from shoal.sdk._sandbox_args import str_list
from shoal.sdk._sync import live_method
from shoal.sdk.outbound_policy import OutboundPolicy
from shoal.sdk.transport import Client
from shoal.types import SandboxConnectCredentials
from shoal.wire import routes
from shoal.wire.base import dump
from shoal.wire.sandboxes import ConnectTokenRequest, NetworkPolicy, OutboundPolicyUpdate


class SandboxNetworkMethods:
    """``create_connect_token``, ``_experimental_set_outbound_network_policy`` and
    ``_experimental_update_outbound_policy``, for ``Sandbox``."""

    _client: Client
    _id: str
    _persistent: dict[str, Any] | None

    def _check_attached(self) -> None:
        raise NotImplementedError

    @live_method
    async def create_connect_token(
        self, user_metadata: str | dict[str, Any] | None = None, port: int = 8080
    ) -> SandboxConnectCredentials:
        """Credentials for reaching ``port`` in the sandbox over HTTPS through shoal's authenticating proxy.

        Send the token as ``Authorization: Bearer <token>``, as the ``_modal_connect_token`` query parameter (the
        answer sets a cookie, for browsers) or as that cookie; the sandbox's server receives ``user_metadata``
        (a dict is JSON-encoded) in the ``X-Verified-User-Data`` header.  HTTP and WebSockets work.  The
        certificate comes from shoal's local CA (``shoal status`` prints its path).

        Examples:
            creds = sb.create_connect_token(user_metadata={"user": "ada"})
            requests.get(creds.url, headers={"Authorization": f"Bearer {creds.token}"}, verify=ca_path)
        """
        self._check_attached()
        if isinstance(user_metadata, dict):
            try:
                metadata = json.dumps(user_metadata)
            except (TypeError, ValueError) as exc:
                raise InvalidError(f"user_metadata could not be JSON-encoded: {exc}") from None
        elif user_metadata is None or isinstance(user_metadata, str):
            metadata = user_metadata or ""
        else:
            raise InvalidError(f"user_metadata must be a str or a dict, got {type(user_metadata).__name__}")
        check_port(port, "port")
        answer = await self._client.request(
            "POST",
            routes.path("sandboxes", self._id, "connect_tokens"),
            json_body=dump(ConnectTokenRequest, port=port, user_metadata=metadata),
            idempotent=False,
        )
        return SandboxConnectCredentials(url=answer["url"], token=answer["token"])

    @live_method
    async def _experimental_set_outbound_network_policy(
        self,
        *,
        outbound_cidr_allowlist: Sequence[str] | None = None,
        outbound_domain_allowlist: Sequence[str] | None = None,
    ) -> None:
        """Replace the sandbox's outbound allowlists while it runs; with neither, it may reach the internet again.

        Open connections the new policy does not allow are cut (a connection to a host allowed by name is cut
        too; the next lookup of the name opens it again).  The always-denied destinations (the host, other
        sandboxes, cloud metadata) stay denied whatever the policy.
        """
        self._check_attached()
        if self._persistent is not None:
            raise NotImplementedError("Updating network access isn't supported for persistent Sandboxes yet.")
        body = dump(
            NetworkPolicy,
            outbound_cidr_allowlist=str_list(outbound_cidr_allowlist, "outbound_cidr_allowlist"),
            outbound_domain_allowlist=str_list(outbound_domain_allowlist, "outbound_domain_allowlist"),
        )
        await self._client.request("POST", routes.path("sandboxes", self._id, "network_policy"), json_body=body)

    @live_method
    async def _experimental_update_outbound_policy(self, outbound_policy: OutboundPolicy) -> None:
        """Replace all of the sandbox's outbound policy (header replacements) while it runs: build the new policy
        with every rule to keep.  Requests sent from then on get the new headers, on connections already open too.

        Only a sandbox created with an ``_experimental_outbound_policy`` can be updated (header replacement is
        set up when it starts); for others this raises InvalidError.
        """
        self._check_attached()
        if not isinstance(outbound_policy, OutboundPolicy):
            raise InvalidError(
                f"outbound_policy must be a shoal.experimental.OutboundPolicy, got {type(outbound_policy).__name__}"
            )
        if self._persistent is not None:
            raise NotImplementedError("Updating the outbound policy isn't supported for persistent Sandboxes yet.")
        body = dump(OutboundPolicyUpdate, outbound_headers=await outbound_policy._body())
        await self._client.request("PUT", routes.path("sandboxes", self._id, "outbound_policy"), json_body=body)
