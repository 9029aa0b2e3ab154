"""One HTTP POST with the guarantees a judge call needs: a total deadline, a size cap, no key sent astray.

Why not ``urllib.request.urlopen``: its timeout is per socket operation (a server trickling one
byte a second never trips a 3 s timeout), it reads any body size into memory, it raises
``http.client`` errors that are not ``OSError`` (a truncated body escaped as ``IncompleteRead``),
and it follows redirects to any host with the ``Authorization`` header still attached. Here:

- the deadline covers connect, send, headers and body together: a watchdog timer shuts the
  socket down when it passes, so no server behaviour can hold a call longer;
- a reply over ``max_bytes`` is refused (by its Content-Length, or as soon as it has sent more);
- a body shorter than its Content-Length is an error, not a short reply;
- a redirect is followed only within the same origin (scheme, host, port); one to another origin
  is refused without sending anything there, so the key only ever goes to the configured host;
- every failure (socket, TLS, protocol, URL, deadline, size) is one ``HTTPFailure`` line.
"""
from __future__ import annotations

import http.client
import socket
import threading
import time
from urllib.parse import urljoin, urlsplit

MAX_REDIRECTS = 3
REDIRECTS = (301, 302, 303, 307, 308)


class HTTPFailure(Exception):
    """The call did not produce a complete reply; the message is one line."""


def origin(url: str) -> tuple[str, str, int]:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        raise HTTPFailure(f"{url}: not an http(s) URL")
    return scheme, parts.hostname.lower(), parts.port or (443 if scheme == "https" else 80)


def post(url: str, body: bytes, headers: dict[str, str], timeout_s: float,
         max_bytes: int) -> tuple[int, bytes]:
    """POST ``body``; (status, reply body) of the final response, within ``timeout_s`` in total.

    The call runs on a daemon thread while the calling thread waits in short slices. Why: a
    Ctrl-C may be delivered by the OS to any thread of the process; a main thread blocked in a
    socket read would only see it when the read returns (up to the whole deadline later), while a
    thread waking every 0.2 s raises KeyboardInterrupt at once (and the daemon thread dies with
    the process)."""
    result: list[tuple[int, bytes]] = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            result.append(_post(url, body, headers, timeout_s, max_bytes))
        except BaseException as exc:  # handed to the caller's thread
            error.append(exc)

    worker = threading.Thread(target=run, name="judge-http", daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(0.2)
    if error:
        raise error[0]
    return result[0]


def _post(url: str, body: bytes, headers: dict[str, str], timeout_s: float,
          max_bytes: int) -> tuple[int, bytes]:
    deadline = time.monotonic() + timeout_s
    try:
        for _ in range(MAX_REDIRECTS + 1):
            status, location, data = _once(url, body, headers, deadline, timeout_s, max_bytes)
            if status not in REDIRECTS:
                return status, data
            if not location:
                raise HTTPFailure(f"{url}: HTTP {status} redirect without a Location")
            target = urljoin(url, location)
            if origin(target) != origin(url):
                raise HTTPFailure(f"{url}: HTTP {status} redirect to another origin ({target}) not followed; "
                                  f"the API key is only sent to {urlsplit(url).netloc}")
            url = target
        raise HTTPFailure(f"{url}: more than {MAX_REDIRECTS} redirects")
    except HTTPFailure:
        raise
    except (OSError, http.client.HTTPException, ValueError) as exc:  # socket, TLS, protocol, bad URL
        text = str(exc).splitlines()[0] if str(exc) else ""
        raise HTTPFailure(f"{url}: {type(exc).__name__}{': ' + text if text else ''}") from None


def _once(url: str, body: bytes, headers: dict[str, str], deadline: float, timeout_s: float,
          max_bytes: int) -> tuple[int, str | None, bytes]:
    scheme, host, port = origin(url)
    parts = urlsplit(url)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    left = deadline - time.monotonic()
    if left <= 0:
        raise HTTPFailure(f"{url}: no complete reply within {timeout_s:g} s")
    cls = http.client.HTTPSConnection if scheme == "https" else http.client.HTTPConnection
    conn = cls(host, port, timeout=left)
    expired = threading.Event()

    def cut() -> None:  # the total deadline: wake any blocked connect/recv by closing the socket
        expired.set()
        sock = conn.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    watchdog = threading.Timer(left, cut)
    watchdog.daemon = True
    watchdog.start()
    try:
        conn.request("POST", path, body=body, headers={**headers, "Content-Length": str(len(body))})
        resp = conn.getresponse()
        if resp.status in REDIRECTS:
            return resp.status, resp.getheader("Location"), b""
        length_header = resp.getheader("Content-Length")
        expected = int(length_header) if length_header and length_header.strip().isdigit() else None
        if expected is not None and expected > max_bytes:
            raise HTTPFailure(f"{url}: reply of {expected} bytes exceeds the {max_bytes}-byte cap")
        chunks, size = [], 0
        while True:
            chunk = resp.read1(65536)
            if not chunk:
                break
            size += len(chunk)
            if size > max_bytes:
                raise HTTPFailure(f"{url}: reply exceeds the {max_bytes}-byte cap")
            chunks.append(chunk)
        if expired.is_set():
            raise HTTPFailure(f"{url}: no complete reply within {timeout_s:g} s")
        if expected is not None and size < expected:
            raise HTTPFailure(f"{url}: reply truncated ({size} of {expected} bytes)")
        return resp.status, None, b"".join(chunks)
    except (OSError, http.client.HTTPException):
        if expired.is_set():
            raise HTTPFailure(f"{url}: no complete reply within {timeout_s:g} s") from None
        raise
    finally:
        watchdog.cancel()
        conn.close()
