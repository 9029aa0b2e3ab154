"""Scriptable HTTP servers on 127.0.0.1 for the judge tests: real sockets, byte-level replies."""
from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable

GOOD = "My final verdict score is: [[4]], feature name is [[end of turn]]"


def completion(text: str = GOOD) -> bytes:
    return json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]}).encode()


class RawServer:
    """Accepts connections on 127.0.0.1, reads each HTTP request whole, records it (path and
    Authorization header), then lets ``respond(sock, request)`` write whatever bytes it wants."""

    def __init__(self, respond: Callable[[socket.socket, dict], None]) -> None:
        self.respond, self.requests, self.sent = respond, [], 0
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(10)
            data = b""
            try:
                while b"\r\n\r\n" not in data:
                    data += conn.recv(65536)
                head, body = data.split(b"\r\n\r\n", 1)
                lines = head.decode("latin-1").split("\r\n")
                headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:])}
                while len(body) < int(headers.get("content-length", 0)):
                    body += conn.recv(65536)
                self.requests.append({"path": lines[0].split()[1], "auth": headers.get("authorization")})
                self.respond(conn, self.requests[-1])
            except OSError:
                pass  # the client hung up (as it should on a deadline or a cap)

    def close(self) -> None:
        self._stop.set()
        self.thread.join(timeout=2)
        self.sock.close()


def ok_response(sock: socket.socket, _: dict, body: bytes | None = None) -> None:
    body = completion() if body is None else body
    sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                 + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)
