"""A real S3-compatible server for the tests (moto's, as its own process on 127.0.0.1) and a fault-injecting HTTP
proxy in front of it that cuts chosen responses after a given number of body bytes: closed (FIN), reset (RST) or
stalled (the connection stays open and silent), as a dropped or hung connection does.
"""

from __future__ import annotations

import fcntl
import http.client
import socket
import struct
import subprocess
import sys
import termios
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from conftest import free_port

HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "expect", "proxy-connection"}


def start_moto() -> tuple[subprocess.Popen, int]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, port
        except OSError:
            assert proc.poll() is None, "the moto server exited at start"
            time.sleep(0.1)
    proc.kill()
    raise TimeoutError("the moto server did not listen within 60 s")


def _wait_until_acknowledged(connection: socket.socket, timeout_s: float = 30.0) -> None:
    """Until the peer's kernel has received every byte sent (the send queue is empty)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if struct.unpack("i", fcntl.ioctl(connection.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0] == 0:
            return
        time.sleep(0.005)


@dataclass(frozen=True)
class Cut:
    """A response cut after `at` body bytes: "close" (FIN), "reset" (RST) or "stall" (silent for stall_s, then
    closed)."""

    at: int
    how: str = "close"


class FaultProxy:
    """Forwards every request to the upstream server. `cuts[suffix]` is a list of cuts (a Cut, or an int: closed
    after so many body bytes) consumed one per GET of a path ending in `suffix`."""

    def __init__(self, upstream_port: int, stall_s: float = 6.0):
        self.upstream_port, self.stall_s = upstream_port, stall_s
        self.stopping = threading.Event()
        self.cuts: dict[str, list[int | Cut]] = {}
        self.cut_count = 0
        self.gets: list[tuple[str, str]] = []  # (path, Range header) of every GET
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_HEADERS}
                upstream = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=30)
                upstream.request(self.command, self.path, body=body, headers=headers)
                response = upstream.getresponse()
                data = response.read()
                upstream.close()
                cut = proxy._take_cut(self.command, self.path.split("?")[0], self.headers.get("Range", ""))
                self.send_response(response.status)
                head = self.command == "HEAD"  # its Content-Length is the object's, with no body
                for key, value in response.getheaders():
                    if key.lower() not in HOP_HEADERS and (head or key.lower() != "content-length"):
                        self.send_header(key, value)
                if not head:
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if head:
                    return
                if cut is None:
                    self.wfile.write(data)
                    return
                cut = cut if isinstance(cut, Cut) else Cut(cut)
                self.wfile.write(data[:cut.at])
                self.wfile.flush()
                self.close_connection = True
                if cut.how == "stall":  # hung: the client's read timeout must notice
                    proxy.stopping.wait(proxy.stall_s)
                elif cut.how == "reset":  # SO_LINGER 0: close sends RST instead of FIN
                    _wait_until_acknowledged(self.connection)  # else the RST drops bytes in flight: not the cut planned
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.connection.close()
                    return
                self.connection.shutdown(socket.SHUT_RDWR)  # the connection drops mid-body

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

        class Server(ThreadingHTTPServer):
            def handle_error(self, request, client_address) -> None:
                pass  # clients killed with -9 reset their connections; that is the point of those tests

        self.server = Server(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def _take_cut(self, method: str, path: str, range_header: str) -> int | Cut | None:
        if method != "GET":
            return None
        with self.lock:
            self.gets.append((path, range_header))
            for suffix, plan in self.cuts.items():
                if path.endswith(suffix) and plan:
                    self.cut_count += 1
                    return plan.pop(0)
        return None

    def stop(self) -> None:
        self.stopping.set()
        self.server.shutdown()
        self.server.server_close()
