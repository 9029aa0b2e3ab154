"""Scriptable HTTP servers on 127.0.0.1 for the judge tests: real sockets, byte-level replies."""
from __future__ import annotations

import json
import random
import re
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


# ------------------------------------------------------------------ judges that answer by what they are asked
_PAIR = re.compile(r'("(?:[^"\\]|\\.)*") \(([0-9.]+)\)')
_EXPLANATION = re.compile(r"Proposed explanation: the token (\".*\")\n")


def _verdict(prompt_system: str, score: int, name: str = "a feature") -> str:
    if "Match score" in prompt_system:
        return f"Match score: [[{score}]]"
    return f"My final verdict score is: [[{score}]], feature name is [[{name}]]"


def random_judge(seed: int = 0) -> Callable[[dict], str]:
    """A judge that ignores the question: a uniform random 1-5 score in the right format."""
    rng = random.Random(seed)
    return lambda body: _verdict(body["messages"][0]["content"], rng.randint(1, 5))


def oracle_judge(body: dict) -> str:
    """A judge that reads the contexts correctly: 5 when every active token is the same token (and, asked
    about an explanation ``the token "X"``, that token is X), else 1."""
    system, user = body["messages"][0]["content"], body["messages"][1]["content"]
    active = {json.loads(tok).strip() for tok, act in _PAIR.findall(user) if float(act) > 0}
    consistent = len(active) == 1
    if "Match score" in system:
        said = _EXPLANATION.search(user)
        return _verdict(system, 5 if consistent and said and json.loads(said.group(1)) in active else 1)
    return _verdict(system, 5 if consistent else 1, name=f"the token {sorted(active)[0]!r}" if active else "none")


class JudgeServer:
    """A real OpenAI-compatible chat-completions server on 127.0.0.1 (ephemeral port) whose replies come
    from ``answer(request body)``. It stops by itself after ``lifetime_s`` seconds, so a failing test can
    never leave it running; ``close()`` stops it at once."""

    def __init__(self, answer: Callable[[dict], str], lifetime_s: float = 300.0) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.requests: list[dict] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server naming)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                owner.requests.append(body)
                data = completion(answer(body))
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self.thread.start()
        self.timer = threading.Timer(lifetime_s, self.close)
        self.timer.daemon = True
        self.timer.start()

    def close(self) -> None:
        self.timer.cancel()
        if self.thread.is_alive():
            self.server.shutdown()
        self.server.server_close()
