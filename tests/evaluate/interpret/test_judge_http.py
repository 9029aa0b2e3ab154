"""The OpenAI-compatible judge client against real misbehaving servers on 127.0.0.1.

Each server is a real listening socket in a thread, scripted at the byte level: a redirect to
another origin (which records whether the API key reached it), a reply trickled one byte a second,
a 200 MB body, a body cut short. Every case must end as a ``BackendError`` within the deadline.
"""
from __future__ import annotations

import socket
import time
from collections.abc import Callable

import pytest

from fast_sae.evaluate.interpret.judge import BackendError, score_features
from fast_sae.evaluate.interpret.judge_backends import OpenAIBackend

from ..http_servers import GOOD, completion, ok_response

MESSAGES = [{"role": "user", "content": "hi"}]


def redirect(to: str, status: int = 302) -> Callable[[socket.socket, dict], None]:
    def respond(sock, _):
        sock.sendall(f"HTTP/1.1 {status} Found\r\nLocation: {to}\r\nContent-Length: 0\r\n"
                     f"Connection: close\r\n\r\n".encode())
    return respond


def test_redirect_to_another_origin_is_refused_and_the_key_never_leaves(raw_server, monkeypatch):
    monkeypatch.setenv("JUDGE_TEST_KEY", "sk-secret-1")
    elsewhere = raw_server(ok_response)  # another port on 127.0.0.1 is another origin
    first = raw_server(redirect(elsewhere.url + "/chat/completions"))
    backend = OpenAIBackend(first.url, "m", api_key_env="JUDGE_TEST_KEY", timeout_s=5)
    with pytest.raises(BackendError, match="redirect to another origin"):
        backend.complete(MESSAGES)
    assert first.requests[0]["auth"] == "Bearer sk-secret-1"
    assert elsewhere.requests == []  # nothing sent there, so no key either
    # within one origin a redirect is followed (with the key: it is the same server)
    routes = {"/v1/chat/completions": redirect("/v2/chat", 307), "/v2/chat": ok_response}
    same = raw_server(lambda sock, req: routes[req["path"]](sock, req))
    assert OpenAIBackend(same.url, "m", api_key_env="JUDGE_TEST_KEY", timeout_s=5).complete(MESSAGES) == GOOD
    assert [(r["path"], r["auth"]) for r in same.requests] == [("/v1/chat/completions", "Bearer sk-secret-1"),
                                                                ("/v2/chat", "Bearer sk-secret-1")]


@pytest.mark.slow
def test_a_trickled_reply_is_cut_at_the_total_deadline(raw_server):
    def trickle(sock, _):  # valid headers, then one byte a second (each recv well inside any per-read timeout)
        body = completion()
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n")
        for byte in body:
            sock.sendall(bytes([byte]))
            time.sleep(1.0)

    def trickle_headers(sock, _):
        for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"x" * 100:
            sock.sendall(bytes([byte]))
            time.sleep(0.5)

    for respond in (trickle, trickle_headers):
        server = raw_server(respond)
        backend = OpenAIBackend(server.url, "m", timeout_s=3)
        t0 = time.monotonic()
        with pytest.raises(BackendError, match="no complete reply within 3 s"):
            backend.complete(MESSAGES)
        assert time.monotonic() - t0 < 4.5


def test_a_200_mb_reply_is_refused_without_reading_it(raw_server):
    size = 200 * 2**20
    block = b" " * 2**20

    def huge(sock, _, declared: bool):
        sock.sendall(b"HTTP/1.1 200 OK\r\n" + (f"Content-Length: {size}\r\n".encode() if declared else b"")
                     + b"Connection: close\r\n\r\n")
        for _ in range(size // len(block)):
            sock.sendall(block)
            server_state["sent"] += len(block)

    for declared in (True, False):  # by its Content-Length, or as soon as the cap is passed
        server_state = {"sent": 0}
        server = raw_server(lambda sock, req, d=declared: huge(sock, req, d))
        backend = OpenAIBackend(server.url, "m", timeout_s=30)
        t0 = time.monotonic()
        with pytest.raises(BackendError, match="cap"):
            backend.complete(MESSAGES)
        assert time.monotonic() - t0 < 10
        time.sleep(0.3)
        assert server_state["sent"] < 64 * 2**20  # the client hung up long before 200 MB


def test_a_truncated_reply_is_a_backend_error(raw_server):
    body = completion()

    def short(sock, _):
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body[:20])

    def short_chunked(sock, _):
        sock.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                     + f"{len(body):x}\r\n".encode() + body[:20])

    for respond, message in ((short, rf"truncated \(20 of {len(body)} bytes\)"), (short_chunked, "IncompleteRead")):
        backend = OpenAIBackend(raw_server(respond).url, "m", timeout_s=5)
        with pytest.raises(BackendError, match=message):
            backend.complete(MESSAGES)
    # through the judge loop: recorded as an unscored feature with the reason, never raised
    rec = score_features([{"feature": 3, "contexts": []}], OpenAIBackend(raw_server(short).url, "m", timeout_s=5),
                         None, retries=1)[0]
    assert rec["score"] is None and rec["attempts"] == 2 and "truncated" in rec["reason"]


def test_every_transport_failure_is_a_backend_error(raw_server):
    def hang_up(sock, _):
        sock.shutdown(socket.SHUT_RDWR)

    def garbage(sock, _):
        sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")

    for respond in (hang_up, garbage):
        with pytest.raises(BackendError):
            OpenAIBackend(raw_server(respond).url, "m", timeout_s=5).complete(MESSAGES)
    for url in ("http://127.0.0.1:9/v1", "http://127.0.0.1:notaport/v1", "ftp://127.0.0.1/v1"):
        with pytest.raises(BackendError):
            OpenAIBackend(url, "m", timeout_s=2).complete(MESSAGES)
