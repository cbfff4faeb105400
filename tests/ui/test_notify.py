"""Desktop notifications: episodes (pure), and real Notify calls on a private D-Bus session bus.

The bus is a `dbus-daemon --session` this test starts (Debian: `apt-get install -y dbus`); the
notification server on it is played by the test with jeepney.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from agent.ui import format as fmt
from agent.ui.fake import FakeBackend, fake_device_id
from agent.ui.notify import NOTIFICATIONS, NOTIFICATIONS_PATH, Alert, Episodes, Notifier


def snap(*peers: dict[str, Any]) -> dict[str, Any]:
    return {"peers": list(peers)}


def peer(name: str, trust: str, pending: str | None = None, anomalies: tuple[str, ...] = ()) -> dict[str, Any]:
    return {
        "device_id": fake_device_id(name),
        "name": name,
        "trust": trust,
        "fingerprint": "ab" * 32,
        "pending_fingerprint": pending,
        "anomalies": [{"code": c, "summary": f"{c} seen"} for c in anomalies],
    }


def kinds(alerts: list[Alert]) -> list[tuple[str, str]]:
    return [(a.kind, a.name) for a in alerts]


def test_one_alert_per_episode() -> None:
    e = Episodes()
    assert kinds(e.update(snap(peer("a", "tofu")))) == []
    assert kinds(e.update(snap(peer("a", "pending")))) == [("pending", "a")]
    assert kinds(e.update(snap(peer("a", "pending")))) == []  # a retry is the same episode
    assert kinds(e.update(snap(peer("a", "tofu")))) == []
    assert kinds(e.update(snap(peer("a", "pending")))) == [("pending", "a")]  # a new episode
    assert kinds(e.update(snap(peer("b", "key_changed", "cd" * 32)))) == [("key_changed", "b")]
    assert kinds(e.update(snap(peer("b", "key_changed", "cd" * 32)))) == []
    assert kinds(e.update(snap(peer("b", "key_changed", "ef" * 32)))) == [("key_changed", "b")]  # another key
    both = snap(peer("b", "tofu", anomalies=("key_flip_flop",)))
    assert kinds(e.update(both)) == [("anomaly", "b")]
    assert kinds(e.update(both)) == []


def test_alert_text_cleans_the_name_and_shows_the_fingerprint() -> None:
    a = Alert("pending", fake_device_id("x"), "\u202eevil\x07<b>" + "x" * 500, "ab" * 32)
    assert "\u202e" not in a.summary + a.body and "\x07" not in a.body
    assert fmt.short_fingerprint("ab" * 32) in a.body
    assert len(a.summary) < 80


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def private_bus() -> Iterator[str]:
    """A private `dbus-daemon --session`; yields its address."""
    daemon = shutil.which("dbus-daemon")
    if daemon is None:
        pytest.skip("dbus-daemon is not installed (apt-get install -y dbus)")
    tmp = Path(tempfile.mkdtemp(prefix="ta-dbus-", dir="/tmp"))
    address = f"unix:path={tmp}/bus"
    proc = subprocess.Popen(
        [daemon, "--session", "--nofork", "--nopidfile", f"--address={address}", "--print-address=1"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        printed = proc.stdout.readline().strip()  # printed once the bus listens
        assert printed.startswith(address), printed
        yield address
    finally:
        proc.terminate()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.anyio
async def test_notify_calls_reach_the_session_bus(private_bus: str) -> None:
    from jeepney import DBusAddress, MatchRule, new_method_return, new_signal  # type: ignore[import-untyped]
    from jeepney.bus_messages import message_bus  # type: ignore[import-untyped]
    from jeepney.io.asyncio import Proxy, open_dbus_router  # type: ignore[import-untyped]

    backend = FakeBackend()
    calls = anyio.create_memory_object_stream[tuple[int, tuple[Any, ...]]](16)
    send_calls, received = calls
    opened: list[str] = []
    page_opened = anyio.Event()

    def open_page(device_id: str) -> None:
        opened.append(device_id)
        page_opened.set()

    notifier = Notifier(backend, open_page=open_page, bus=private_bus)
    async with open_dbus_router(private_bus) as server, anyio.create_task_group() as tg:
        rule = MatchRule(type="method_call", interface=NOTIFICATIONS, member="Notify")
        with server.filter(rule, bufsize=16) as queue:
            reply = await Proxy(message_bus, server).RequestName(NOTIFICATIONS)
            assert reply == (1,)  # primary owner

            async def serve_notifications() -> None:
                note_id = 0
                while True:
                    msg = await queue.get()
                    note_id += 1
                    await server.send(new_method_return(msg, "u", (note_id,)))
                    await send_calls.send((note_id, msg.body))

            tg.start_soon(serve_notifications)
            tg.start_soon(notifier.run)
            with anyio.fail_after(10):
                newcomer = backend.add_device("newcomer", name="Zoe's laptop", trust="pending")
                note_id, body = await received.receive()
                app, replaces, _icon, summary, text, actions, hints, timeout = body
                assert (app, replaces, timeout) == ("tofu-agent", 0, -1)
                assert summary == "Zoe's laptop wants to connect"
                assert fmt.short_fingerprint(backend.peer(newcomer)["fingerprint"]) in text
                assert "open" in actions and "default" in actions
                assert hints["urgency"] == ("y", 1)

                backend.connect(newcomer, False)  # changes the snapshot, but the same episode
                backend.connect(newcomer, False)
                phone = backend.add_device("phone")
                backend.offer_key(phone, "phone-new-key")
                note_id, body = await received.receive()  # the next call is the key change, not a repeat
                assert body[3] == "phone shows a different key"
                assert hints != body[6] and body[6]["urgency"] == ("y", 2)

                await notifier.actions_ready.wait()
                signal = new_signal(
                    DBusAddress(NOTIFICATIONS_PATH, interface=NOTIFICATIONS), "ActionInvoked", "us", (note_id, "open")
                )
                await server.send(signal)
                await page_opened.wait()
                assert opened == [phone]
            tg.cancel_scope.cancel()
    send_calls.close()
    received.close()


@pytest.mark.anyio
async def test_without_a_session_bus_nothing_is_sent_and_nothing_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DBUS_SESSION_BUS_ADDRESS", raising=False)
    backend = FakeBackend()
    device = backend.add_device("newcomer", trust="pending")
    alert = Alert("pending", device, "newcomer", backend.peer(device)["fingerprint"])
    notifier = Notifier(backend)
    async with anyio.create_task_group() as tg:
        tg.start_soon(notifier.run)
        backend.raise_anomaly(device, "advert_mismatch", "odd")
        tg.cancel_scope.cancel()
    from contextlib import AsyncExitStack

    async with AsyncExitStack() as stack:
        notifier._stack = stack
        assert await notifier.send(alert) is False
        dead = Notifier(backend, bus="unix:path=/nonexistent/bus")
        dead._stack = stack
        assert await dead.send(alert) is False


@pytest.mark.anyio
async def test_disabled_sends_nothing() -> None:
    backend = FakeBackend()
    backend.add_device("newcomer", trust="pending")
    notifier = Notifier(backend, enabled=False)
    with anyio.fail_after(5):
        await notifier.run()  # returns at once
    assert notifier.sent == []
