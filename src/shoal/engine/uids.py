"""Which host id range each sandbox runs in (decision 0063): slots handed out and taken back.

Slot ``k`` is host ids ``FIRST_SANDBOX_ID + k * 65536`` onwards.  A slot is taken when a sandbox's
container is about to be made and given back once the container is removed.  The slot is stored with the
sandbox (``SandboxSpec.uid_slot``), so a daemon killed with ``-9`` finds the slots of the sandboxes it
re-adopts.  Slots are handed out round-robin, so a range is reused as late as possible.
"""

from __future__ import annotations

from shoal.exception import ResourceExhaustedError
from shoal.runtime.idmap import FIRST_SANDBOX_ID, IDS_PER_SANDBOX, IdRange

MAX_SLOTS = (2**32 - 2 - FIRST_SANDBOX_ID) // IDS_PER_SANDBOX
"""Ranges that fit below the highest valid uid (4294967294)."""


class UidSlots:
    """The slots ``first`` to ``first + count - 1``, and which sandbox holds each.  Daemons that share a host
    (a local cluster's nodes) are given disjoint slots, so no two sandboxes of theirs share host ids."""

    def __init__(self, count: int, first: int = 0) -> None:
        if not 1 <= count <= MAX_SLOTS or not 0 <= first <= MAX_SLOTS - count:
            raise ValueError(f"uid slots must lie within 0..{MAX_SLOTS - 1}, not {first}..{first + count - 1}")
        self.count = count
        self.first = first
        self._holder: dict[int, str] = {}
        self._next = first

    @staticmethod
    def ids(slot: int) -> IdRange:
        """The host id range of a slot."""
        return IdRange(FIRST_SANDBOX_ID + slot * IDS_PER_SANDBOX)

    @staticmethod
    def slot_of(host_id: int) -> int | None:
        """The slot whose range holds a host id (None: not a sandbox range)."""
        if host_id < FIRST_SANDBOX_ID:
            return None
        return (host_id - FIRST_SANDBOX_ID) // IDS_PER_SANDBOX

    def is_sandbox_id(self, host_id: int) -> bool:
        """Whether a host uid belongs to some slot's range."""
        slot = self.slot_of(host_id)
        return slot is not None and self.first <= slot < self.first + self.count

    @property
    def free(self) -> int:
        """Slots not held."""
        return self.count - len(self._holder)

    def take(self, sandbox_id: str) -> int:
        """A free slot for ``sandbox_id``, or ResourceExhaustedError."""
        if len(self._holder) >= self.count:
            raise ResourceExhaustedError(
                f"all {self.count} sandbox uid ranges are in use: end some sandboxes, or raise the number with"
                " `shoal serve --uid-slots N` (or $SHOAL_UID_SLOTS)"
            )
        for i in range(self.count):
            slot = self.first + (self._next - self.first + i) % self.count
            if slot not in self._holder:
                self._holder[slot] = sandbox_id
                self._next = self.first + (slot - self.first + 1) % self.count
                return slot
        raise AssertionError("a free slot was counted but not found")

    def hold(self, sandbox_id: str, slot: int) -> None:
        """Record a slot a re-adopted sandbox already has."""
        holder = self._holder.get(slot)
        if holder is not None and holder != sandbox_id:
            raise ValueError(f"uid slot {slot} is held by {holder} and {sandbox_id}")
        self._holder[slot] = sandbox_id

    def release(self, sandbox_id: str, slot: int | None) -> None:
        """Give a slot back (no effect if ``sandbox_id`` does not hold it)."""
        if slot is not None and self._holder.get(slot) == sandbox_id:
            del self._holder[slot]

    def holder(self, slot: int) -> str | None:
        """The sandbox holding a slot."""
        return self._holder.get(slot)
