"""The page as a person uses it, in headless Chromium (Debian's `chromium`, driven by Playwright).

The server runs on loopback in a thread of its own (an anyio blocking portal) with a FakeBackend;
the tests change the backend through the portal, as the agent would, and wait for the page to
show it. Screenshots: `TOFU_UI_SCREENSHOTS=1` writes them to docs/ui-*.png (else to a temp dir).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal

from agent.ui import format as fmt
from agent.ui.fake import FakeBackend
from agent.ui.server import UiHandle, serve_ui

pytestmark = pytest.mark.slow  # headless Chromium

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--no-sandbox",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
DOCS = Path(__file__).resolve().parents[2] / "docs"

try:
    from playwright.sync_api import BrowserContext, ConsoleMessage, Page, expect, sync_playwright
except ImportError:  # pragma: no cover - the test extras install it
    pytest.skip("playwright is not installed (pip install playwright)", allow_module_level=True)
if not os.access(CHROMIUM, os.X_OK):  # pragma: no cover - scripts/test installs it where apt works
    pytest.skip(f"no browser at {CHROMIUM} (apt-get install -y chromium)", allow_module_level=True)


@dataclass
class Served:
    portal: BlockingPortal
    backend: FakeBackend
    handle: UiHandle

    def call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run `fn` on the server's event loop (where the backend lives)."""
        return self.portal.call(lambda: fn(*args, **kwargs))

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.handle.port}{path}"


@pytest.fixture
def served() -> Iterator[Served]:
    with start_blocking_portal("asyncio") as portal:
        backend: FakeBackend = portal.call(FakeBackend)
        future, handle = portal.start_task(serve_ui, backend, 0)
        try:
            yield Served(portal, backend, handle)
        finally:
            future.cancel()


@pytest.fixture
def context(tmp_path: Path) -> Iterator[BrowserContext]:
    with sync_playwright() as pw:
        ctx = pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"),
            executable_path=CHROMIUM,
            headless=True,
            args=ARGS,
            viewport={"width": 1200, "height": 900},
        )
        try:
            yield ctx
        finally:
            ctx.close()


def log_in(page: Page, served: Served, next_path: str | None = None) -> None:
    page.goto(served.handle.login_url(next_path))
    assert "token" not in page.url  # dropped from the address bar
    expect(page.locator("body")).to_have_attribute("data-live-open", "1")  # the live feed is connected


def confirm(page: Page, label: str) -> None:
    expect(page.get_by_role("heading", name=f"Confirm: {label}")).to_be_visible()
    page.get_by_role("button", name=f"Yes, {label}").click()


def test_a_pending_device_appears_live_and_is_accepted(context: BrowserContext, served: Served) -> None:
    page = context.new_page()
    log_in(page, served)
    expect(page.get_by_text("No device is waiting for a decision.")).to_be_visible()
    start = time.monotonic()
    device = served.call(served.backend.add_device, "newcomer", name="Zoe's laptop", trust="pending")
    request = page.locator("article.request", has_text="Zoe's laptop").filter(has_text="wants to connect")
    expect(request).to_be_visible(timeout=1000)
    print(f"a new device showed on the open page {1000 * (time.monotonic() - start):.0f} ms after the agent saw it")
    fp = fmt.short_fingerprint(served.backend.peer(device)["fingerprint"])
    expect(request).to_contain_text(fp)  # the name stands next to the fingerprint
    request.get_by_role("button", name="Accept").click()
    confirm(page, "accept")
    expect(page.get_by_role("status")).to_contain_text("accept: done")
    row = page.locator(f'tr[data-device="{device}"]')
    expect(row).to_contain_text("connected")
    expect(row).to_contain_text("Trusted on first use")
    expect(page.locator("article.request")).to_have_count(0)


def test_a_key_change_shows_both_keys_and_is_retrusted_then_revoked(context: BrowserContext, served: Served) -> None:
    device = served.call(served.backend.add_device, "phone")
    pinned = served.backend.peer(device)["fingerprint"]
    offered = served.call(served.backend.offer_key, device, "phone-reinstalled")
    page = context.new_page()
    log_in(page, served, f"/device/{device}")
    expect(page.get_by_role("heading", name="This device shows a different key")).to_be_visible()
    expect(page.locator("#fp-pinned")).to_have_text(fmt.fingerprint(pinned))
    expect(page.locator("#fp-offered")).to_have_text(fmt.fingerprint(offered))
    expect(page.locator(".vgrid span")).to_have_count(64)
    page.get_by_role("button", name="Re-trust the new key").click()
    confirm(page, "retrust")
    expect(page.locator(".badge")).to_have_text("Trusted on first use")
    expect(page.get_by_text("This device shows a different key")).to_have_count(0)
    assert served.backend.peer(device)["fingerprint"] == offered

    page.get_by_role("button", name="Revoke").click()
    confirm(page, "revoke")
    expect(page.locator(".badge")).to_have_text("Revoked")
    assert served.backend.actions[-1][0] == "revoke"


def test_verify_only_after_the_numbers_match(context: BrowserContext, served: Served) -> None:
    device = served.call(served.backend.add_device, "desktop")
    page = context.new_page()
    log_in(page, served, f"/device/{device}")
    expect(page.get_by_label("safety number")).to_contain_text(" ")
    page.get_by_role("button", name="Verify").click()  # the box is not ticked: the browser stops it
    expect(page.get_by_role("heading", name="Confirm: verify")).to_have_count(0)
    page.get_by_label("the numbers match on both machines").check()
    page.get_by_role("button", name="Verify").click()
    confirm(page, "verify")
    expect(page.locator(".badge")).to_have_text("Verified")


def test_every_action_works_without_javascript(tmp_path: Path, served: Served) -> None:
    device = served.call(served.backend.add_device, "newcomer", trust="pending")
    with sync_playwright() as pw:
        ctx = pw.chromium.launch_persistent_context(
            str(tmp_path / "nojs"), executable_path=CHROMIUM, headless=True, args=ARGS, java_script_enabled=False
        )
        try:
            page = ctx.new_page()
            page.goto(served.handle.login_url())
            page.locator("article.request").get_by_role("button", name="Accept").click()
            confirm(page, "accept")
            expect(page.locator(f'tr[data-device="{device}"]')).to_contain_text("connected")
            page.goto(served.url("/this"))
            page.get_by_role("button", name="Start a code pairing").click()
            confirm(page, "pair start")
            expect(page.get_by_role("status")).to_contain_text("pairing code: 7-guitar-oxygen")
        finally:
            ctx.close()


HOSTILE = [
    "<script>window.__pwned=1</script>",
    '"><img src=x onerror="window.__pwned=1">',
    "\u202eexe.txt\u202c",
    "<svg onload=window.__pwned=1>" + "x" * 10240,
]


def test_hostile_device_names_run_no_script(context: BrowserContext, served: Served) -> None:
    devices = [served.call(served.backend.add_device, f"h{i}", name=n, trust="pending") for i, n in enumerate(HOSTILE)]
    served.call(served.backend.raise_anomaly, devices[0], "advert_mismatch", HOSTILE[1])
    served.call(served.backend.add_folder, HOSTILE[0], "/tmp/" + HOSTILE[1], [(devices[1], 2, 10)])
    page = context.new_page()
    messages: list[str] = []
    page.on("console", lambda m: messages.append(m.text) if isinstance(m, ConsoleMessage) else None)
    page.on("pageerror", lambda e: messages.append(str(e)))
    context.add_init_script(
        "document.addEventListener('securitypolicyviolation', e => { window.__csp = (window.__csp || 0) + 1; });"
    )
    log_in(page, served)
    for path in ["/", f"/device/{devices[0]}", f"/device/{devices[3]}", "/anomalies", "/log", "/folders"]:
        page.goto(served.url(path))
        assert page.evaluate("window.__pwned") is None, path
        assert page.evaluate("window.__csp") is None, path  # nothing was even attempted
        assert page.locator("img[src=x]").count() == 0 and page.locator("svg[onload]").count() == 0
    page.goto(served.url("/"))
    expect(page.get_by_text("<script>window.__pwned=1</script>", exact=True).first).to_be_visible()
    served.call(served.backend.add_device, "late", name=HOSTILE[1], trust="pending")  # arrives live
    expect(page.locator("article.request")).to_have_count(len(HOSTILE) + 1)
    assert page.evaluate("window.__pwned") is None
    assert not [m for m in messages if "Content Security Policy" in m or "pwned" in m], messages


def test_a_kept_version_with_a_hostile_name_is_restored(context: BrowserContext, served: Served) -> None:
    b = served.backend
    hostile = HOSTILE[1] + ".txt"

    def populate() -> None:
        laptop = b.add_device("laptop", name="Zoe's laptop", connected=True)
        b.add_folder("photos", "/home/zoe/Pictures", [(laptop, 0, 0)])
        b.keep_version("photos", hostile, 1_765_103_405.654321, 5000, laptop)
        b.keep_version("photos", hostile, 1_765_000_000.123456, 4000, laptop)

    served.call(populate)
    page = context.new_page()
    log_in(page, served, "/versions")
    rows = page.locator("table.versions tbody tr")
    expect(rows).to_have_count(2)
    older = rows.filter(has_text="2025-12-06 05:46:40 UTC")
    expect(older).to_contain_text(hostile)  # shown as text, not markup
    expect(older).to_contain_text("Zoe's laptop")
    older.get_by_role("button", name="Restore").click()
    confirm(page, "restore")
    expect(page.get_by_role("status")).to_contain_text(f"restored {hostile} in photos")
    assert [k["kept_at"] for k in b.kept if k["restored"]] == [1_765_000_000.123456]
    assert page.evaluate("window.__pwned") is None and page.locator("img[src=x]").count() == 0


def test_screenshots(context: BrowserContext, served: Served, tmp_path: Path) -> None:
    b = served.backend
    out = DOCS if os.environ.get("TOFU_UI_SCREENSHOTS") == "1" else tmp_path

    def populate() -> tuple[str, str]:
        laptop = b.add_device(
            "laptop", name="Zoe's laptop", trust="verified", connected=True, address="192.168.1.20:39001"
        )
        desk = b.add_device("desktop", name="Study desktop", trust="tofu", connected=True, address="192.168.1.31:39001")
        b.add_device("nas", name="NAS", trust="tofu", connected=False, address="192.168.1.5:39001")
        b.add_device("tablet", name="Kitchen tablet", trust="pending", address="192.168.1.44:39001")
        phone = b.add_device("phone", name="Sam's phone", trust="tofu", address="192.168.1.52:39001")
        b.offer_key(phone, "phone-reinstalled")
        b.raise_anomaly(desk, "advert_mismatch", "an mDNS record named this device with another key")
        b.add_folder("default", "/home/zoe/TofuSync", [(laptop, 0, 0), (desk, 42, 6_300_000)])
        b.add_folder("photos", "/home/zoe/Pictures", [(laptop, 310, 1_900_000_000)])
        b.status["offered_folders"] = [{"id": "recipes", "device_id": laptop, "name": "recipes"}]
        return phone, desk

    phone, _ = served.call(populate)
    page = context.new_page()
    log_in(page, served)
    page.screenshot(path=str(out / "ui-devices.png"), full_page=True)
    page.goto(served.url(f"/device/{phone}"))
    page.screenshot(path=str(out / "ui-key-changed.png"), full_page=True)
    page.goto(served.url("/folders"))
    page.screenshot(path=str(out / "ui-folders.png"), full_page=True)
    for name in ("ui-devices.png", "ui-key-changed.png", "ui-folders.png"):
        assert (out / name).stat().st_size > 10_000
    if out == tmp_path:
        shutil.rmtree(tmp_path / "profile", ignore_errors=True)
