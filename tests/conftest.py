"""Shared test helpers."""

import socket


def free_port() -> int:
    """A TCP port nobody listens on now: tests that start process groups never collide on a fixed port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
