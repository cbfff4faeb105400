"""Run ZeroconfDiscovery (or forged adverts) inside a network namespace; JSON lines on stdout.

Good agent:   mdns_probe.py agent --device-id ID --fp FP --name NAME --port N
Forged ones:  mdns_probe.py forge --spec JSON   (a list of {"instance", "props", "port"})

Commands on stdin, one a line: `update FP`, `stop`. EOF also stops. Every output line is a JSON
object with "ev" and "t" (time.monotonic(), comparable across namespaces on one machine).
Run only inside a test network namespace: it multicasts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

import anyio
import anyio.to_thread
from zeroconf import IPVersion, ServiceInfo
from zeroconf.asyncio import AsyncZeroconf

from agent.net.discovery import SERVICE_TYPE, PeerGone, PeerSeen, local_ipv4_addresses
from agent.net.mdns import ZeroconfDiscovery


def out(ev: str, **fields: Any) -> None:
    print(json.dumps({"ev": ev, "t": time.monotonic(), **fields}), flush=True)


async def read_command() -> str:
    line: str = await anyio.to_thread.run_sync(sys.stdin.readline)
    return line.strip() or "stop"


async def agent(args: argparse.Namespace) -> None:
    disc = ZeroconfDiscovery(
        device_id=args.device_id,
        name=args.name,
        fingerprint=args.fp,
        port=args.port,
        max_services=args.max_services,
        on_ignored=lambda name, reason: out("ignored", service_name=name, reason=reason),
    )

    async def pump() -> None:
        async for event in disc.events:
            match event:
                case PeerSeen():
                    out(
                        "seen",
                        device_id=event.device_id,
                        name=event.name,
                        fp=event.fingerprint_hint,
                        addresses=list(event.addresses),
                        port=event.port,
                        service_name=event.service_name,
                    )
                case PeerGone():
                    out("gone", device_id=event.device_id, service_name=event.service_name)

    async def advertised() -> None:
        out("advertised", service_name=await disc.wait_advertised())

    t0 = time.monotonic()
    await disc.start()
    out("started", start_s=time.monotonic() - t0)
    async with anyio.create_task_group() as tg:
        tg.start_soon(pump)
        tg.start_soon(advertised)
        while (cmd := await read_command()) != "stop":
            if cmd.startswith("update "):
                t1 = time.monotonic()
                await disc.update(cmd.split()[1])
                out("updated", update_s=time.monotonic() - t1)
        t1 = time.monotonic()
        await disc.stop()  # ends `events`, so pump returns
        out("stopped", stop_s=time.monotonic() - t1)
        tg.cancel_scope.cancel()


async def forge(args: argparse.Namespace) -> None:
    aiozc = AsyncZeroconf(ip_version=IPVersion.V4Only)
    infos = [
        ServiceInfo(
            SERVICE_TYPE,
            f"{item['instance']}.{SERVICE_TYPE}",
            port=item.get("port", 22000),
            properties={k.encode(): (None if v is None else v.encode()) for k, v in item["props"].items()},
            server=f"forged-{i}.local.",
            parsed_addresses=local_ipv4_addresses(),
        )
        for i, item in enumerate(json.loads(args.spec))
    ]
    announced = [await aiozc.async_register_service(info, cooperating_responders=True) for info in infos]
    await asyncio.gather(*announced)
    out("advertised", count=len(infos))
    while await read_command() != "stop":
        pass
    await aiozc.async_close()
    out("stopped")


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="mode", required=True)
    a = sub.add_parser("agent")
    a.add_argument("--device-id", required=True)
    a.add_argument("--fp", required=True)
    a.add_argument("--name", required=True)
    a.add_argument("--port", type=int, default=22000)
    a.add_argument("--max-services", type=int, default=256)
    f = sub.add_parser("forge")
    f.add_argument("--spec", required=True)
    args = parser.parse_args()
    anyio.run(agent if args.mode == "agent" else forge, args, backend="asyncio")


if __name__ == "__main__":
    main()
