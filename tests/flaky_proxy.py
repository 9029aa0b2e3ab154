"""A small misbehaving HTTP proxy on 127.0.0.1, in front of the test S3 server.

It forwards every request unchanged (the Host header too, so S3 signatures stay valid), except GETs
of activation chunks, which it can answer with a server error, cut off mid-body (the full
Content-Length announced, half the bytes sent, the connection closed), or alter (one byte flipped:
a store that returns wrong data). ``faults`` says how many chunk GETs to spoil (-1: all of them).
"""
from __future__ import annotations

import http.client
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "trailer", "upgrade"}


class FlakyProxy:
    def __init__(self, upstream: str) -> None:
        host, port = upstream.rsplit("/", 1)[-1].split(":")
        self.upstream = (host, int(port))
        self.mode = "pass"  # pass | error | drop | corrupt
        self.faults = 0
        self.spoiled = 0
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                try:
                    conn.request(self.command, self.path, body=body,
                                 headers={k: v for k, v in self.headers.items() if k.lower() not in HOP})
                    resp = conn.getresponse()
                    data = resp.read()
                    headers = [(k, v) for k, v in resp.getheaders() if k.lower() not in HOP]
                    status = resp.status
                finally:
                    conn.close()
                fault = proxy._take(self.command, self.path)
                if fault == "error":
                    self.send_response(503)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(status)
                for k, v in headers:
                    self.send_header(k, v)
                self.end_headers()
                if self.command == "HEAD":
                    return
                if fault == "drop":
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                if fault == "corrupt" and data:
                    data = data[:len(data) // 2] + bytes([data[len(data) // 2] ^ 0x20]) + data[len(data) // 2 + 1:]
                self.wfile.write(data)

            do_GET = do_PUT = do_HEAD = do_DELETE = do_POST = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def _take(self, method: str, path: str) -> str | None:
        if method != "GET" or "/acts/" not in path or "/c/" not in path or self.mode == "pass":
            return None
        with self._lock:
            if self.faults == 0:
                return None
            if self.faults > 0:
                self.faults -= 1
            self.spoiled += 1
            return self.mode

    def set(self, mode: str, faults: int) -> None:
        with self._lock:
            self.mode, self.faults, self.spoiled = mode, faults, 0

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
