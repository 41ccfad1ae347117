"""Shared fixtures: a strict test STS and moto's STS, both on loopback with free ports."""

import pathlib
import sys
from collections.abc import Iterator

import pytest

# tests/ is a rootdir without a package; make tests/servers importable as ``servers``.
sys.path.insert(0, str(pathlib.Path(__file__).parent))

from servers.sts import StrictSTS


@pytest.fixture
def strict_sts() -> Iterator[StrictSTS]:
    """A started StrictSTS with no provider configured; call ``.configure(...)`` in the test."""
    sts = StrictSTS()
    sts.start()
    try:
        yield sts
    finally:
        sts.stop()


@pytest.fixture(scope="session")
def moto_sts() -> Iterator[str]:
    """URL of moto's own server (accepts any web identity token) on 127.0.0.1."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()
