"""Folders peers offer that we do not share with them: kept until a person accepts them.

A trusted peer says FolderHello for every folder it shares with us. One we do not have, or have
but do not share with that peer, is an offer: (folder id, device id, device name, first seen),
kept in memory and in `offers.json` in the data directory (written atomically, mode 0600) so
`tofu-agent folders` lists it after a restart too. At most `MAX_OFFERS` are kept, the oldest
dropped first, so a peer making up folder ids cannot grow the file.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from agent.host.paths import write_private_file

log = logging.getLogger(__name__)

MAX_OFFERS = 64
OFFERS_FILE = "offers.json"


@dataclass(frozen=True, slots=True)
class Offer:
    """One folder one device offered us."""

    folder: str
    device_id: str
    name: str
    first_seen: float  # unix seconds

    def to_json(self) -> dict[str, Any]:
        """The `offered_folders` entry of `status --json`."""
        return {"id": self.folder, "device_id": self.device_id, "name": self.name, "first_seen": self.first_seen}


def offers_path(data_dir: Path) -> Path:
    return data_dir / OFFERS_FILE


def load_offers(path: Path) -> list[Offer]:
    """The offers kept in `path`, oldest first; a missing or damaged file is no offers."""
    try:
        raw = json.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as exc:
        log.warning("ignoring the folder offers in %s: %s", path, exc)
        return []
    offers: list[Offer] = []
    for item in raw if isinstance(raw, list) else []:
        try:
            offer = Offer(str(item["folder"]), str(item["device_id"]), str(item["name"]), float(item["first_seen"]))
        except (KeyError, TypeError, ValueError):
            continue
        offers.append(offer)
    return offers[-MAX_OFFERS:]


def save_offers(path: Path, offers: list[Offer]) -> None:
    """Write `offers` to `path` atomically, mode 0600."""
    data = json.dumps([asdict(o) for o in offers[-MAX_OFFERS:]], indent=1).encode("utf-8")
    write_private_file(path, data)


class Offers:
    """The offers in memory, saved to their file on every change."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.items: list[Offer] = load_offers(path)

    def add(self, folder: str, device_id: str, name: str, now: float) -> bool:
        """Remember an offer; True if it is new (and was saved)."""
        if any(o.folder == folder and o.device_id == device_id for o in self.items):
            return False
        self.items.append(Offer(folder, device_id, name, now))
        if len(self.items) > MAX_OFFERS:
            dropped = self.items.pop(0)
            log.info("dropped the oldest folder offer (%r from %s): %d are kept", dropped.folder, dropped.name,
                     MAX_OFFERS)  # fmt: skip
        self._save()
        return True

    def remove(self, pairs: set[tuple[str, str]]) -> None:
        """Forget the offers of these (folder id, device id) pairs."""
        kept = [o for o in self.items if (o.folder, o.device_id) not in pairs]
        if len(kept) != len(self.items):
            self.items = kept
            self._save()

    def _save(self) -> None:
        try:
            save_offers(self.path, self.items)
        except OSError as exc:
            log.warning("cannot save folder offers to %s: %s", self.path, exc)
