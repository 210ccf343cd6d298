"""``shoal.experimental.OutboundPolicy`` (Modal's ``modal.experimental.OutboundPolicy``): headers the daemon
sets on a sandbox's outbound HTTPS requests, with values from a named secret that never enters the sandbox."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from shoal.exception import InvalidError
from shoal.sdk.secret import Secret
from shoal.wire.outbound import DOMAIN_RE, FRAMING, HEADER_NAME_RE, MAX_HEADERS, template_keys


@dataclass(frozen=True)
class _HeaderReplacement:
    domain: str
    headers: dict[str, str]
    secret: Secret | None


class OutboundPolicy:
    """Headers to set on a sandbox's outbound HTTPS requests, per destination domain (immutable).

    Values may name keys of the replacement's secret as ``$KEY`` (``$$`` is a literal ``$``); the daemon fills
    them in outside the sandbox, so the secret's values never enter it.  The sandbox trusts a CA of the daemon
    for the domains the policy covers (``SSL_CERT_FILE`` and friends point at the bundle), and requests go out
    over HTTP/1.1.

    Examples:
        policy = shoal.experimental.OutboundPolicy().with_header_replacement(
            domain="api.example.com",
            secret=shoal.Secret.from_name("api-token"),
            headers={"Authorization": "Bearer $API_TOKEN"},
        )
        sb = shoal.Sandbox.create(app=app, _experimental_outbound_policy=policy)
    """

    def __init__(self, _replacements: tuple[_HeaderReplacement, ...] = ()) -> None:
        self._replacements = _replacements

    def __repr__(self) -> str:
        return f"OutboundPolicy({[(r.domain, sorted(r.headers)) for r in self._replacements]})"

    def with_header_replacement(
        self, *, domain: str, headers: Mapping[str, str], secret: Secret | None = None
    ) -> OutboundPolicy:
        """A new policy that also sets ``headers`` on requests to ``domain`` (``example.com``; ``*.example.com``
        for it and its subdomains; ``*`` for any), their ``$KEY`` templates filled from ``secret``."""
        return OutboundPolicy((*self._replacements, _HeaderReplacement(domain, dict(headers), secret)))

    def _validate(self) -> None:
        """InvalidError for the first replacement that Modal would refuse (or that shoal cannot apply)."""
        total = 0
        for rep in self._replacements:
            if not isinstance(rep.domain, str) or (rep.domain != "*" and not DOMAIN_RE.match(rep.domain)):
                raise InvalidError(f"Invalid domain: {rep.domain!r}")
            if not rep.headers:
                raise InvalidError("`headers` must contain at least one header")
            for name, value in rep.headers.items():
                if not isinstance(name, str) or not HEADER_NAME_RE.match(name):
                    raise InvalidError(f"Invalid header name: {name!r}")
                if name.lower() in FRAMING:
                    raise InvalidError(
                        f"header {name!r} routes or frames the request; an outbound policy cannot set it"
                    )
                if not isinstance(value, str) or any((ord(c) < 0x20 and c != "\t") or ord(c) == 0x7F for c in value):
                    raise InvalidError(f"Header value for {name!r} must not contain control characters (except tab)")
                if rep.secret is None and template_keys(value):
                    raise InvalidError(f"Header value for {name!r} references a secret key, but no `secret` was passed")
            if rep.secret is not None:
                if not isinstance(rep.secret, Secret):
                    raise InvalidError(f"secret must be a shoal.Secret, got {type(rep.secret).__name__}")
                if rep.secret._name is None:
                    raise InvalidError(
                        "Outbound policies only support named secrets (e.g. `Secret.from_name`); "
                        "ephemeral secrets (e.g. `Secret.from_dict`) are not yet supported"
                    )
            total += len(rep.headers)
        if total > MAX_HEADERS:
            raise InvalidError(f"Outbound policy cannot have more than {MAX_HEADERS} header replacements")

    async def _body(self) -> list[dict[str, Any]]:
        """The wire form (``HeaderReplacement``s), with each named secret looked up to its id."""
        self._validate()
        out: list[dict[str, Any]] = []
        for rep in self._replacements:
            secret_id = None if rep.secret is None else await rep.secret._hydrate()
            out.append({"domain": rep.domain, "headers": rep.headers, "secret_id": secret_id})
        return out
