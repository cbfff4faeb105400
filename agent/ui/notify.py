"""Desktop notifications for the moments TOFU leaves to a person: a device waits for approval, a
key changed, an anomaly was raised.

`Episodes` (pure) turns successive snapshots into alerts, one per episode: a device that stays
pending, a key change that repeats with the same offered key, an anomaly still in force do not
alert again; a new offered key or an anomaly that ends and comes back does. `Notifier` sends each
alert as a freedesktop `Notify` call over the session D-Bus (jeepney, imported only when there is
something to send), with an "Open" action that calls `open_page(device_id)`. No session bus, or
no notification server on it: the alert is logged at debug level and dropped; nothing fails.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.abc

from agent.ui import format as fmt
from agent.ui.backend import UiBackend

log = logging.getLogger(__name__)

APP_NAME = "tofu-agent"
NOTIFICATIONS = "org.freedesktop.Notifications"
NOTIFICATIONS_PATH = "/org/freedesktop/Notifications"
OPEN_ACTION = "open"


@dataclass(frozen=True, slots=True)
class Alert:
    """One thing to tell a person about one device."""

    kind: str  # "pending" | "key_changed" | "anomaly"
    device_id: str
    name: str
    fingerprint: str | None
    detail: str = ""

    @property
    def summary(self) -> str:
        """The notification's title."""
        name = fmt.short(self.name or "unnamed", 48)
        return {
            "pending": f"{name} wants to connect",
            "key_changed": f"{name} shows a different key",
            "anomaly": f"Anomaly on {name}",
        }[self.kind]

    @property
    def body(self) -> str:
        """The notification's text: the name always next to the fingerprint."""
        lines = [f"{fmt.short(self.name or 'unnamed', 48)} · key {fmt.short_fingerprint(self.fingerprint)}…"]
        if self.kind == "pending":
            lines.append("Accept it only if you know this device.")
        elif self.kind == "key_changed":
            lines.append(f"Offered key {fmt.short_fingerprint(self.detail)}…: refused until you decide.")
        else:
            lines.append(fmt.short(self.detail, 200))
        return "\n".join(lines)


class Episodes:
    """Which alert-worthy situations are in force; `update` returns the ones that just began."""

    def __init__(self) -> None:
        self._open: set[tuple[str, ...]] = set()

    def update(self, snapshot: dict[str, Any]) -> list[Alert]:
        """Alerts for the situations in `snapshot` that were not in force in the previous one."""
        now: dict[tuple[str, ...], Alert] = {}
        for p in snapshot.get("peers", []):
            device_id = str(p.get("device_id", ""))
            name = fmt.clean(str(p.get("name") or ""))
            fp = p.get("fingerprint")
            if p.get("trust") == "pending":
                now[("pending", device_id)] = Alert("pending", device_id, name, fp)
            if p.get("trust") == "key_changed":
                offered = str(p.get("pending_fingerprint") or "")
                now[("key_changed", device_id, offered)] = Alert("key_changed", device_id, name, fp, offered)
            for a in p.get("anomalies", []):
                code = str(a.get("code", ""))
                detail = f"{code}: {fmt.clean(str(a.get('summary', '')))}"
                now[("anomaly", device_id, code)] = Alert("anomaly", device_id, name, fp, detail)
        fresh = [alert for key, alert in now.items() if key not in self._open]
        self._open = set(now)
        return fresh


class Notifier:
    """Watches the backend's snapshots and sends one desktop notification per new episode."""

    def __init__(
        self,
        backend: UiBackend,
        *,
        enabled: bool = True,
        open_page: Callable[[str], None] | None = None,
        bus: str = "SESSION",
    ) -> None:
        self.backend = backend
        self.enabled = enabled
        self.open_page = open_page
        self.bus = bus
        self.episodes = Episodes()
        self.sent: list[Alert] = []
        self._router: Any = None
        self._stack: AsyncExitStack | None = None
        self._ids: dict[int, str] = {}  # notification id -> device id
        self._warned = False
        self.actions_ready = anyio.Event()  # set once clicks on "Open" are listened for (tests wait on it)
        self._tg: anyio.abc.TaskGroup | None = None

    async def run(self) -> None:
        """Until cancelled: alert on the current snapshot, then after every change."""
        if not self.enabled:
            return
        async with AsyncExitStack() as stack, anyio.create_task_group() as tg:
            self._stack = stack
            self._tg = tg
            changes = self.backend.changes()  # subscribe first: nothing is missed during the first check
            await self._check()
            async for _ in changes:
                await self._check()
            tg.cancel_scope.cancel()

    async def _check(self) -> None:
        for alert in self.episodes.update(await self.backend.snapshot()):
            await self.send(alert)

    async def _connect(self) -> Any:
        if self._router is not None:
            return self._router
        if self.bus == "SESSION" and not os.environ.get("DBUS_SESSION_BUS_ADDRESS"):
            return None
        from jeepney.io.asyncio import open_dbus_router  # type: ignore[import-untyped]

        assert self._stack is not None
        try:
            with anyio.fail_after(5):
                self._router = await self._stack.enter_async_context(open_dbus_router(self.bus))
        except Exception as exc:  # no bus, a refused connection, a bus that does not answer
            if not self._warned:
                log.info("desktop notifications off: no session bus (%s)", exc)
                self._warned = True
            return None
        if self.open_page is not None:
            assert self._tg is not None
            self._tg.start_soon(self._listen_actions, self._router)
        return self._router

    async def send(self, alert: Alert) -> bool:
        """Send one notification; False if there is no bus or no notification server."""
        self.sent.append(alert)
        router = await self._connect()
        if router is None:
            return False
        from jeepney import DBusAddress, MessageType, new_method_call  # type: ignore[import-untyped]

        addr = DBusAddress(NOTIFICATIONS_PATH, bus_name=NOTIFICATIONS, interface=NOTIFICATIONS)
        actions = ["default", "Open", OPEN_ACTION, "Open device page"] if self.open_page else []
        hints = {"urgency": ("y", 2 if alert.kind == "key_changed" else 1), "category": ("s", "network")}
        msg = new_method_call(
            addr,
            "Notify",
            "susssasa{sv}i",
            (APP_NAME, 0, "security-medium", alert.summary, alert.body, actions, hints, -1),
        )
        try:
            with anyio.fail_after(5):
                reply = await router.send_and_get_reply(msg)
        except Exception as exc:  # the bus went away: reconnect next time
            log.debug("could not send a desktop notification: %s", exc)
            self._router = None
            return False
        if reply.header.message_type != MessageType.method_return:
            log.debug("no notification server on the session bus: %s", reply.body)
            return False
        self._ids[int(reply.body[0])] = alert.device_id
        return True

    async def _listen_actions(self, router: Any) -> None:
        from jeepney import MatchRule
        from jeepney.bus_messages import message_bus  # type: ignore[import-untyped]
        from jeepney.io.asyncio import Proxy

        rule = MatchRule(type="signal", interface=NOTIFICATIONS, member="ActionInvoked", path=NOTIFICATIONS_PATH)
        try:
            with router.filter(rule, bufsize=16) as queue:
                await Proxy(message_bus, router).AddMatch(rule)
                self.actions_ready.set()
                while True:
                    msg = await queue.get()
                    note_id, action = msg.body
                    device_id = self._ids.get(int(note_id))
                    if device_id is not None and action in ("default", OPEN_ACTION) and self.open_page:
                        self.open_page(device_id)
        except Exception as exc:
            log.debug("stopped listening for notification clicks: %s", exc)
