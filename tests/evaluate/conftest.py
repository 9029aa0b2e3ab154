"""Fixtures shared by the evaluate tests."""
from __future__ import annotations

import pytest

from .http_servers import RawServer


@pytest.fixture()
def raw_server():
    servers: list[RawServer] = []

    def start(respond):
        servers.append(RawServer(respond))
        return servers[-1]

    yield start
    for s in servers:
        s.close()
