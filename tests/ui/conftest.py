"""Fixtures for the web page: a FakeBackend with a few devices and an in-process client."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from agent.ui.app import create_app
from agent.ui.auth import Auth
from agent.ui.fake import FakeBackend

PORT = 39080
ORIGIN = f"http://127.0.0.1:{PORT}"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Clock:
    """A clock the tests move by hand."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def backend() -> FakeBackend:
    b = FakeBackend()
    b.add_device("laptop", trust="tofu", connected=True)
    b.add_device("newcomer", trust="pending")
    changed = b.add_device("phone", trust="tofu")
    b.offer_key(changed, "phone-reinstalled")
    return b


@pytest.fixture
def auth() -> Auth:
    return Auth()


@pytest.fixture
async def client(backend: FakeBackend, auth: Auth, clock: Clock) -> AsyncIterator[httpx.AsyncClient]:
    """A client that is not logged in."""
    app = create_app(backend, auth, PORT, backend.feed, clock)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=ORIGIN) as c:
        yield c


async def log_in(client: httpx.AsyncClient, auth: Auth, clock: Clock) -> str:
    """Log `client` in; return the session's CSRF token (read from the devices page)."""
    r = await client.get("/login", params={"token": auth.issue_token(clock.now)})
    assert r.status_code == 303, r.text
    page = (await client.get("/")).text
    marker = 'name="csrf" value="'
    start = page.index(marker) + len(marker)
    return page[start : page.index('"', start)]


@pytest.fixture
async def logged_in(client: httpx.AsyncClient, auth: Auth, clock: Clock) -> tuple[httpx.AsyncClient, str]:
    """A logged-in client and its CSRF token."""
    return client, await log_in(client, auth, clock)
