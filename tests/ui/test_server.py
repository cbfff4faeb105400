"""`serve_ui` on real loopback sockets: lazy loading, both address families, the live feed, shutdown."""

from __future__ import annotations

import logging
import socket

import anyio
import httpx
import pytest

from agent.ui.fake import FakeBackend
from agent.ui.server import UiHandle, bind_loopback, login_url, serve_ui

pytestmark = pytest.mark.anyio


def has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


async def test_serves_both_loopbacks_loads_on_first_use_and_stops(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    backend = FakeBackend()
    device = backend.add_device("laptop")
    async with anyio.create_task_group() as tg:
        handle: UiHandle = await tg.start(serve_ui, backend, 0)
        loaded_before = handle.loaded
        assert handle.port > 0 and not loaded_before
        url = handle.login_url(next_path=f"/device/{device}")
        token = url.split("token=")[1].split("&")[0]
        async with httpx.AsyncClient() as client:
            r = await client.get(url)
            assert handle.loaded
            assert r.status_code == 303 and r.headers["location"] == f"/device/{device}"
            r = await client.get(f"http://127.0.0.1:{handle.port}/")
            assert r.status_code == 200 and "laptop" in r.text
            if has_ipv6_loopback():
                r = await client.get(f"http://[::1]:{handle.port}/")
                assert r.status_code == 401  # served; the cookie is per host name
            r = await client.get(f"http://127.0.0.1:{handle.port}/", headers={"Host": "rebind.example"})
            assert r.status_code == 421
        with anyio.fail_after(5):
            tg.cancel_scope.cancel()
    assert all(token not in rec.getMessage() for rec in caplog.records if rec.name != "httpx")
    with pytest.raises(OSError):  # the sockets are closed
        socket.create_connection(("127.0.0.1", handle.port), timeout=1).close()


async def test_listens_on_loopback_only() -> None:
    socks = bind_loopback(0)
    try:
        addrs = {s.getsockname()[0] for s in socks}
        assert addrs <= {"127.0.0.1", "::1"} and "127.0.0.1" in addrs
        assert len({s.getsockname()[1] for s in socks}) == 1
    finally:
        for s in socks:
            s.close()


async def test_a_taken_port_is_a_clear_error() -> None:
    from agent.errors import UserError

    socks = bind_loopback(0)
    try:
        with pytest.raises(UserError, match="cannot listen on port"):
            bind_loopback(socks[0].getsockname()[1])
    finally:
        for s in socks:
            s.close()


async def test_a_change_reaches_an_open_event_stream_within_a_second() -> None:
    backend = FakeBackend()
    async with anyio.create_task_group() as tg:
        handle: UiHandle = await tg.start(serve_ui, backend, 0)
        async with httpx.AsyncClient(timeout=10) as client:
            await client.get(handle.login_url())
            async with client.stream("GET", f"http://127.0.0.1:{handle.port}/events") as r:
                assert r.headers["content-type"].startswith("text/event-stream")
                lines = r.aiter_lines()
                assert await anext(lines) == "retry: 1000"
                start = anyio.current_time()
                backend.add_device("newcomer", trust="pending")
                with anyio.fail_after(1):
                    while not (await anext(lines)).startswith("event: change"):
                        pass
                assert anyio.current_time() - start < 1.0
            with anyio.fail_after(5):  # an open stream does not hold up shutdown
                async with client.stream("GET", f"http://127.0.0.1:{handle.port}/events") as r2:
                    await anext(r2.aiter_lines())
                    tg.cancel_scope.cancel()


def test_login_url_keeps_next_on_this_site() -> None:
    assert login_url(39080, "t") == "http://127.0.0.1:39080/login?token=t"
    assert login_url(39080, "t", "/device/X") == "http://127.0.0.1:39080/login?token=t&next=%2Fdevice%2FX"
    assert login_url(39080, "t", "//evil.example") == "http://127.0.0.1:39080/login?token=t"
