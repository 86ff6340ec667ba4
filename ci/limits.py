"""The bounds every connection keeps: the largest frame and how long each
wait on a peer may last. One frozen dataclass, stdlib only, so that the
configuration (its ``net`` section is exactly this) and the transport
(``net``, which enforces it) share one definition without importing each
other.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    """Bounds for one connection; every wait on a peer has one."""

    max_frame: int = 1 << 20
    max_bulk: int = 4 << 20         # raw bytes a bulk frame (a log's or an artifact's chunk) may carry
    connect_timeout: float = 5.0
    read_timeout: float = 10.0      # a frame, once started, must arrive within this
    idle_timeout: float = 300.0     # a server drops a client silent for this long
    max_connections: int = 512     # authenticated connections a server holds at once
    max_handshakes: int = 64        # connections still in the handshake, all addresses together
    max_per_peer: int = 256         # connections (either kind) from one address: many runners may share one
