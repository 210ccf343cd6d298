"""``modal.experimental``'s sandbox-related members: ``OutboundPolicy``."""

from shoal.exception import InvalidError
from shoal.sdk.outbound_policy import OutboundPolicy

__all__ = ["InvalidError", "OutboundPolicy"]
