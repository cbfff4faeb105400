"""`Discovery` over python-zeroconf (the real mDNS); see `agent.net.discovery` for the theory.

Kept apart from the interface and the pure `PeerTable` so that an agent run with `--no-mdns` (and
every command but `run`) never imports zeroconf, which costs ~5 MB of resident memory.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Callable, Sequence

import anyio
from zeroconf import InterfaceChoice, IPVersion, ServiceInfo, ServiceListener, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from agent.net.discovery import (
    EVENT_BUFFER,
    MAX_ADDRESSES,
    MAX_SERVICES,
    RESOLVE_TIMEOUT,
    RESOLVE_WORKERS,
    SERVICE_TYPE,
    STOP_TIMEOUT,
    DiscoveryError,
    DiscoveryEvent,
    PeerTable,
    _EventPump,
    encode_txt,
    instance_name,
    local_ipv4_addresses,
)

log = logging.getLogger(__name__)


def _is_ipv4(text: str) -> bool:
    try:
        return isinstance(ipaddress.ip_address(text), ipaddress.IPv4Address)
    except ValueError:
        return False


class _Listener(ServiceListener):
    def __init__(self, owner: ZeroconfDiscovery) -> None:
        self._owner = owner

    def add_service(self, zc: Zeroconf, type_: str, name: str) -> None:
        self._owner._queue_resolve(name)

    def update_service(self, zc: Zeroconf, type_: str, name: str) -> None:
        self._owner._queue_resolve(name)

    def remove_service(self, zc: Zeroconf, type_: str, name: str) -> None:
        self._owner._removed(name)


class ZeroconfDiscovery(_EventPump):
    """`Discovery` over python-zeroconf; must run on the asyncio backend.

    `interfaces` are IP addresses to use (default: all interfaces, which works where there is no
    multicast route); `addresses` are what we advertise (default: this host's IPv4 addresses).
    """

    def __init__(
        self,
        *,
        device_id: str,
        name: str,
        fingerprint: str,
        port: int,
        interfaces: Sequence[str] | None = None,
        addresses: Sequence[str] | None = None,
        max_services: int = MAX_SERVICES,
        max_addresses: int = MAX_ADDRESSES,
        allow_loopback: bool = False,
        event_buffer: int = EVENT_BUFFER,
        resolve_timeout: float = RESOLVE_TIMEOUT,
        on_ignored: Callable[[str, str], None] | None = None,
    ) -> None:
        super().__init__(event_buffer)
        self._txt = encode_txt(device_id, fingerprint, name)  # validates id and fingerprint
        if not 0 < port < 65536:
            raise ValueError(f"port out of range: {port}")
        self.device_id = device_id
        self._name = name
        self._port = port
        self._interfaces = list(interfaces) if interfaces is not None else None
        self._addresses = list(addresses) if addresses is not None else None
        self._advertised_addresses: list[str] = []
        self._resolve_timeout_ms = resolve_timeout * 1000
        self._table = PeerTable(
            device_id,
            max_services=max_services,
            max_addresses=max_addresses,
            allow_loopback=allow_loopback,
            on_ignored=on_ignored,
        )
        self._aiozc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._info: ServiceInfo | None = None
        self._in_registry = False
        self._registered = asyncio.Event()
        self._register_task: asyncio.Task[None] | None = None
        self._register_error: BaseException | None = None
        self._workers: list[asyncio.Task[None]] = []
        self._queue: dict[str, None] = {}  # names to resolve, ordered and de-duplicated
        self._wakeup = asyncio.Event()
        self._resolving: dict[str, bool] = {}  # name -> removed while resolving
        self._stopped = False

    @property
    def service_name(self) -> str | None:
        """Our service's full name once chosen (zeroconf may append "-2" on a clash)."""
        return None if self._info is None else self._info.name

    async def start(self) -> None:
        if self._aiozc is not None or self._stopped:
            raise DiscoveryError("discovery can only be started once")
        try:
            interfaces = InterfaceChoice.All if self._interfaces is None else self._interfaces
            self._aiozc = AsyncZeroconf(interfaces=interfaces, ip_version=IPVersion.V4Only)
        except OSError as exc:
            raise DiscoveryError(
                f"cannot start mDNS discovery: {exc}. Peers can still be added as static peers in config.toml"
            ) from exc
        addresses = self._addresses if self._addresses is not None else self._default_addresses()
        self._advertised_addresses = addresses
        self._info = ServiceInfo(
            SERVICE_TYPE,
            f"{instance_name(self._name, self.device_id)}.{SERVICE_TYPE}",
            port=self._port,
            properties=dict(self._txt),
            server=f"tofu-{self.device_id.lower()}.local.",
            parsed_addresses=addresses,
        )
        # Browse first: probing takes ~1.2 s, while a browser sees existing services in ~0.1 s.
        self._workers = [asyncio.create_task(self._resolve_worker()) for _ in range(RESOLVE_WORKERS)]
        self._browser = AsyncServiceBrowser(self._aiozc.zeroconf, SERVICE_TYPE, listener=_Listener(self))
        self._register_task = asyncio.create_task(self._register(self._aiozc, self._info))

    def _default_addresses(self) -> list[str]:
        if self._interfaces is not None:
            return [a for a in self._interfaces if _is_ipv4(a)]
        return local_ipv4_addresses()

    async def wait_advertised(self) -> str:
        """Wait until our advertisement has been announced; returns our service name.

        :raises DiscoveryError: not started, or registration failed.
        """
        if self._register_task is None:
            raise DiscoveryError("discovery is not started")
        await asyncio.wait({self._register_task})
        if self._register_error is not None or self._info is None or not self._registered.is_set():
            raise DiscoveryError(f"advertising on mDNS failed: {self._register_error}")
        return self._info.name

    async def _register(self, aiozc: AsyncZeroconf, info: ServiceInfo) -> None:
        try:
            announced = await aiozc.async_register_service(info, allow_name_change=True)
            self._in_registry = True
            await announced
            self._registered.set()
            log.info("advertising %s on mDNS", info.name)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # zeroconf raises a variety; report it once, keep browsing
            self._register_error = exc
            log.warning("advertising on mDNS failed (%s); peers can still find us via static peers", exc)

    async def update(self, fingerprint: str) -> None:
        txt = encode_txt(self.device_id, fingerprint, self._name)
        if self._stopped:
            raise DiscoveryError("discovery is stopped")
        await self.wait_advertised()
        assert self._aiozc is not None and self._info is not None
        old = self._info
        new = ServiceInfo(
            SERVICE_TYPE,
            old.name,
            port=old.port,
            properties=dict(txt),
            server=old.server,
            parsed_addresses=self._advertised_addresses,
        )
        try:
            announced = await self._aiozc.async_update_service(new)
            self._info = new
            self._txt = txt
            await announced
        except Exception as exc:
            raise DiscoveryError(f"re-announcing on mDNS failed: {exc}") from exc

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        # Shielded and bounded: goodbyes must go out even when our caller is being cancelled.
        with anyio.move_on_after(STOP_TIMEOUT, shield=True) as scope:
            await self._shutdown()
        if scope.cancelled_caught:
            log.warning("mDNS shutdown took longer than %.0f s; abandoned it", STOP_TIMEOUT)
        self._close_events()

    async def _shutdown(self) -> None:
        if self._browser is not None:
            await self._browser.async_cancel()
        tasks = list(self._workers)
        if self._register_task is not None and not self._registered.is_set():
            tasks.append(self._register_task)  # still probing or announcing: abandon it
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        aiozc, info = self._aiozc, self._info
        if aiozc is None:
            return
        try:
            if info is not None and self._in_registry:
                # Await the goodbye broadcast itself; returning earlier would close the sockets first.
                await (await aiozc.async_unregister_service(info))
        finally:
            await aiozc.async_close()

    # -- browser callbacks and resolution (all on the event loop) ---------------------------------

    def _queue_resolve(self, name: str) -> None:
        if self._stopped:
            return
        if name not in self._queue and len(self._queue) >= self._table.max_services:
            log.debug("resolve queue full; dropping %.80r", name)
            return
        self._queue[name] = None
        self._wakeup.set()

    def _removed(self, name: str) -> None:
        self._queue.pop(name, None)
        if name in self._resolving:
            self._resolving[name] = True
        self._emit(self._table.remove(name))

    async def _resolve_worker(self) -> None:
        while True:
            # One resolution per name at a time, so an older answer never lands after a newer one.
            name = next((n for n in self._queue if n not in self._resolving), None)
            if name is None:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            del self._queue[name]
            self._resolving[name] = False
            try:
                events = await self._resolve(name)
            finally:
                removed = self._resolving.pop(name, False)
                self._wakeup.set()  # the same name may have been queued again meanwhile
            if not removed:
                self._emit(events)

    async def _resolve(self, name: str) -> list[DiscoveryEvent]:
        assert self._aiozc is not None
        try:
            info = AsyncServiceInfo(SERVICE_TYPE, name)
            if not await info.async_request(self._aiozc.zeroconf, self._resolve_timeout_ms):
                log.debug("could not resolve %.80r", name)
                return []
            addresses = info.parsed_scoped_addresses()
            properties = info.properties
            port = info.port
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # hostile names and records: never let them out
            log.debug("ignoring mDNS record %.80r: %s", name, exc)
            return []
        return self._table.observe(name, properties, addresses, port)
