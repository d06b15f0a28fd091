"""Loopback networking helpers shared by the local Ray start-up, the install check and the test servers."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it from the ephemeral range).

    Another process may still bind it before our caller does; callers that start several servers at once and
    cannot retry use ports below the ephemeral range instead (``tests/s3server.free_ports``)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
