"""Shared test helpers and fixtures."""

import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port nobody listens on now: tests that start process groups never collide on a fixed port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def demo_shards() -> Path:
    """The checkout's demo shards (`make demo-data`), made once if missing."""
    if not (REPO / "shards/demo/train/manifest.json").is_file():
        subprocess.run([sys.executable, "-m", "stereo", "demo-data", "--out", "shards/demo"], cwd=REPO, check=True)
    return REPO / "shards/demo"
