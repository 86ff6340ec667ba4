"""Who may hold one of a server's connections: the budgets ``net.serve``
keeps, so that peers who prove nothing cannot crowd out those who do.

- A connection still in the handshake holds one of ``max_handshakes``
  places, shared by every address. They are cheap to take (a socket that
  says nothing), so a full house does not refuse the newcomer: it drops the
  oldest handshake of the address holding the most of them. A flood from one
  address then only displaces its own silent sockets, and a real client,
  whose handshake takes a round trip, is almost never the oldest.
- Once authenticated, a connection holds one of ``max_connections`` places;
  when they are all taken a new connection is refused (``busy``).
- One address holds at most ``max_per_peer`` connections of both kinds; at
  the cap its oldest handshake makes way, and with none to drop the
  newcomer is refused.

Plain bookkeeping, no sockets: ``admit`` is given a function that drops a
connection, and ``net.serve`` calls ``authenticated`` and ``release`` as the
connection goes on. Single-threaded (one event loop), like the server.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable

from .limits import Limits

log = logging.getLogger(__name__)

NOTE_EVERY = 10.0       # seconds between two log lines about dropped handshakes


@dataclass(eq=False)
class Ticket:
    """One connection's place: its address, whether it has authenticated, and how to drop it."""

    addr: str
    drop: Callable[[], None]
    authenticated: bool = False
    released: bool = False


class Gate:
    def __init__(self, limits: Limits, name: str = "server"):
        self.limits = limits
        self.name = name
        self.handshakes: dict[Ticket, None] = {}        # oldest first
        self.per_peer: Counter[str] = Counter()
        self.open = 0                                   # authenticated connections
        self._dropped = 0                               # handshakes dropped since the last note
        self._noted = float("-inf")

    def admit(self, addr: str, drop: Callable[[], None]) -> tuple[Ticket | None, str]:
        """A new connection from ``addr``: (its ticket, "") or (None, why it is refused).
        May drop an older handshake to make room."""
        if self.open >= self.limits.max_connections:
            return None, f"{self.name} has {self.limits.max_connections} connections open"
        if self.per_peer[addr] >= self.limits.max_per_peer:
            if not self._drop_oldest(addr):
                return None, f"{addr} has {self.limits.max_per_peer} connections open to {self.name}"
        if len(self.handshakes) >= self.limits.max_handshakes:
            heaviest = Counter(t.addr for t in self.handshakes).most_common(1)[0][0]
            self._drop_oldest(heaviest)
        ticket = Ticket(addr, drop)
        self.handshakes[ticket] = None
        self.per_peer[addr] += 1
        return ticket, ""

    def authenticated(self, ticket: Ticket) -> bool:
        """The connection proved its role: move it to an authenticated place.
        False when they are all taken (or it was dropped meanwhile)."""
        if ticket.released or self.open >= self.limits.max_connections:
            return False
        self.handshakes.pop(ticket, None)
        ticket.authenticated = True
        self.open += 1
        return True

    def release(self, ticket: Ticket) -> None:
        """The connection ended (or was dropped); safe to call more than once."""
        if ticket.released:
            return
        ticket.released = True
        if ticket.authenticated:
            self.open -= 1
        else:
            self.handshakes.pop(ticket, None)
        self.per_peer[ticket.addr] -= 1
        if self.per_peer[ticket.addr] <= 0:
            del self.per_peer[ticket.addr]

    def _drop_oldest(self, addr: str) -> bool:
        """Drop the oldest handshake from ``addr``; False when it has none."""
        oldest = next((t for t in self.handshakes if t.addr == addr), None)
        if oldest is None:
            return False
        self.release(oldest)
        oldest.drop()
        self._dropped += 1
        now = time.monotonic()
        if now - self._noted >= NOTE_EVERY:
            log.warning("%s: connections that have not authenticated are crowding in; dropped %d "
                        "(the oldest from %s) to make room (net.max_handshakes %d, net.max_per_peer %d)",
                        self.name, self._dropped, addr, self.limits.max_handshakes, self.limits.max_per_peer)
            self._noted, self._dropped = now, 0
        return True
