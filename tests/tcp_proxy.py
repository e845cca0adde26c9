"""A TCP proxy for fault tests that either forwards to a real server or black-holes: it accepts
connections and never answers (what a dead S3 endpoint behind a load balancer looks like). It can also
cut the connections open now (both ends see a reset), as a failing network path would."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading


class TcpProxy:
    """``127.0.0.1:port`` → ``target``; :attr:`black_hole` switches between forwarding and silence."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.black_hole = False
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self._held: list[socket.socket] = []
        self._all: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def forward(self) -> None:
        """Forward again; connections held silent so far are reset (their clients retry)."""
        self.black_hole = False
        with self._lock:
            held, self._held = self._held, []
        for conn in held:
            with contextlib.suppress(OSError):
                conn.close()

    def cut(self) -> None:
        """Reset every connection open now, both sides; connections made afterwards are served as usual."""
        with self._lock:
            every, self._all, self._held = self._all, [], []
        for conn in every:
            with contextlib.suppress(OSError):
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close sends RST
                conn.shutdown(socket.SHUT_RD)  # wakes the thread reading it
            with contextlib.suppress(OSError):
                conn.close()

    def close(self) -> None:
        self.forward()
        self._server.close()
        with self._lock:
            every, self._all = self._all, []
        for conn in every:
            with contextlib.suppress(OSError):
                conn.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            with self._lock:
                self._all.append(conn)
            if self.black_hole:
                with self._lock:
                    self._held.append(conn)  # accepted, never read, never answered
                continue
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                conn.close()
                continue
            with self._lock:
                self._all.append(upstream)
            for a, b in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                if self.black_hole:
                    with self._lock:
                        self._held.append(source)
                    return
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)
