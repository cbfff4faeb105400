"""The human form of `status`: folder lines with readable sizes, progress, and what went wrong."""

from __future__ import annotations

from typing import Any

from agent.cli.status import _size, render


def folder(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "id": "default", "path": "/home/u/TofuSync", "state": "idle", "error": "", "failed_files": 0,
        "files": 12, "bytes": 3 * 1024**3 // 2, "need_files": 0, "need_bytes": 0, "peers": [],
    }  # fmt: skip
    return {**base, **over}


def test_sizes_are_for_people() -> None:
    assert [_size(n) for n in (0, 1023, 1024, 1536 * 1024, 2**30, 3 * 2**40)] == [
        "0 B", "1023 B", "1.0 KiB", "1.5 MiB", "1.0 GiB", "3.0 TiB",
    ]  # fmt: skip


def test_an_idle_folder_is_one_line() -> None:
    text = render({"running": True, "folders": [folder()]})
    assert "Folder default: /home/u/TofuSync  idle  12 files, 1.5 GiB" in text
    assert "STOPPED" not in text and "could not be written" not in text


def test_a_transfer_shows_a_bar_per_peer() -> None:
    peer = {"device_id": "D" * 32, "name": "laptop", "need_files": 1, "need_bytes": 2**29, "percent": 50.0}
    text = render({"running": True, "folders": [folder(state="syncing", need_files=1, need_bytes=2**29, peers=[peer])]})
    assert "needs 1 files / 512.0 MiB" in text
    assert "laptop: [##########..........] 50%  1 files, 512.0 MiB to go" in text


def test_a_stopped_folder_and_failed_writes_are_shown() -> None:
    text = render({"running": True, "folders": [folder(state="error", error="marker missing", failed_files=3)]})
    assert "STOPPED: marker missing" in text
    assert "3 files could not be written" in text
