"""Free TCP ports for the local servers and clusters that tests and benchmarks start."""

from __future__ import annotations

import socket

__all__ = ["free_port"]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` now (``""``: on every interface, for Ray's own ports).
    Another process may take it before it is used: callers start their server at once."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
