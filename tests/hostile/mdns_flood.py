"""Flood a namespace LAN with unsolicited mDNS announcements of fake `_tofu-agent._tcp` services.

    mdns_flood.py --count 300 --address 10.231.7.3 [--interval 1.0] [--seconds 60]

Each fake service has a valid-looking TXT record (random device id and fingerprint) and points at
`--address` port 9, where nothing listens, so a dial fails at once. All records are re-announced
every `--interval` seconds, as unsolicited authoritative responses (no probing, no answers to
queries: cheap for the attacker). Prints one JSON line `{"ev": "sent", "services": N, "packets": P}`
after each round. Run ONLY inside a test network namespace: it multicasts.
"""

from __future__ import annotations

import argparse
import json
import secrets
import socket
import struct
import time

from zeroconf import ServiceInfo, const
from zeroconf._protocol.outgoing import DNSOutgoing

from agent.identity.keys import new_device_id
from agent.net.discovery import SERVICE_TYPE, encode_txt

MDNS = ("224.0.0.251", 5353)


def fake_services(count: int, address: str) -> list[ServiceInfo]:
    infos = []
    for i in range(count):
        device_id = new_device_id()
        txt = encode_txt(device_id, secrets.token_hex(32), f"fake-{i}")
        infos.append(
            ServiceInfo(
                SERVICE_TYPE,
                f"fake-{i} ({device_id[:6]}).{SERVICE_TYPE}",
                port=9,
                properties=dict(txt),
                server=f"fake-{device_id.lower()}.local.",
                parsed_addresses=[address],
            )
        )
    return infos


def packets(infos: list[ServiceInfo]) -> list[bytes]:
    out = DNSOutgoing(const._FLAGS_QR_RESPONSE | const._FLAGS_AA)
    for info in infos:
        for record in (info.dns_pointer(), info.dns_service(), info.dns_text(), *info.dns_addresses()):
            out.add_answer_at_time(record, 0)
    return list(out.packets())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--address", required=True)
    parser.add_argument("--interval", type=float, default=1.0)
    parser.add_argument("--seconds", type=float, default=120.0)
    args = parser.parse_args()
    infos = fake_services(args.count, args.address)
    data = packets(infos)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 255)
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(args.address))
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, struct.pack("b", 0))
    sock.bind((args.address, 0))
    end = time.monotonic() + args.seconds
    while time.monotonic() < end:
        for packet in data:
            sock.sendto(packet, MDNS)
            time.sleep(0.002)  # do not overrun the receivers' socket buffers in one burst
        print(json.dumps({"ev": "sent", "services": len(infos), "packets": len(data)}), flush=True)
        time.sleep(args.interval)


if __name__ == "__main__":
    main()
