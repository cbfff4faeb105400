"""Kept versions, folder types and pausing on the page (#18): the Versions page, the Folders page's
new fields, and the restore / override / revert / pause / resume actions through POST /act."""

from __future__ import annotations

import re

import httpx
import pytest

from agent.ui import format as fmt
from agent.ui.app import create_app
from agent.ui.auth import Auth
from agent.ui.fake import FakeBackend, fake_device_id
from tests.ui.conftest import ORIGIN, PORT, Clock, log_in

pytestmark = pytest.mark.anyio

SAME_ORIGIN = {"Origin": ORIGIN}
HOSTILE_FILE = "<img src=x onerror=alert(1)>.txt"
T_OLD = 1_765_000_000.123456  # 2025-12-06 05:46:40 UTC
T_NEW = 1_765_103_405.654321  # 2025-12-07 10:30:05 UTC


@pytest.fixture
def backend() -> FakeBackend:
    b = FakeBackend()
    laptop = b.add_device("laptop", trust="tofu", connected=True)
    b.add_folder("photos", "/home/zoe/Pictures", [(laptop, 0, 0)], kind="sendonly", remote_differs=3)
    b.add_folder("nas", "/srv/nas", kind="receiveonly", locally_changed=1, versions_evicted=2)
    b.add_folder("docs", "/home/zoe/Docs", paused=True)
    b.keep_version("photos", HOSTILE_FILE, T_NEW, 5000, laptop)
    b.keep_version("photos", HOSTILE_FILE, T_OLD, 4000, laptop)
    b.keep_version("nas", "report.odt", T_OLD, 12, "")
    return b


def laptop_id() -> str:
    return fake_device_id("laptop")


def restore_form(csrf: str, at: float = T_OLD, name: str = HOSTILE_FILE, folder: str = "photos") -> dict[str, str]:
    # what the Restore button sends: the time as the page printed it (Python's repr of the float)
    return {"csrf": csrf, "action": "restore", "folder": folder, "path": name, "at": str(at), "back": "/versions"}


def folder_form(csrf: str, action: str, folder: str) -> dict[str, str]:
    return {"csrf": csrf, "action": action, "folder": folder, "back": "/folders"}


async def flash(client: httpx.AsyncClient, path: str) -> str:
    page = (await client.get(path)).text
    return " ".join(re.findall(r'<p class="flash [a-z]+" role="[a-z]+">(.*?)</p>', page, re.S))


# -- the Versions page -----------------------------------------------------------------------------


async def test_versions_page_lists_versions_and_escapes_a_hostile_file_name(
    logged_in: tuple[httpx.AsyncClient, str], backend: FakeBackend
) -> None:
    client, _ = logged_in
    r = await client.get("/versions")
    assert r.status_code == 200
    page = r.text
    assert '<a href="/versions" aria-current="page">Versions</a>' in page  # in the nav
    assert "<img" not in page and "onerror=alert(1)>" not in page
    assert "&lt;img src=x onerror=alert(1)&gt;.txt" in page
    assert page.count('name="action" value="restore"') == 3  # one Restore button a version
    assert "5,000 bytes" in page and "2025-12-07 10:30:05 UTC" in page and "2025-12-06 05:46:40 UTC" in page
    laptop = backend.peer(laptop_id())
    assert "laptop" in page and fmt.short_fingerprint(laptop["fingerprint"]) in page  # replaced by: name + key
    assert "unknown" in page  # report.odt: no device noted
    # each Restore button names the very version listed: its folder, name and exact time
    assert f'name="at" value="{T_OLD!r}"' in page and f'name="at" value="{T_NEW!r}"' in page
    assert re.search(r"<script(?![^>]*\bsrc=\"/static/)", page) is None
    assert " style=" not in page and re.search(r"\son[a-z]+=\"", page) is None


async def test_versions_page_filters_by_folder(logged_in: tuple[httpx.AsyncClient, str]) -> None:
    client, _ = logged_in
    page = (await client.get("/versions", params={"folder": "nas"})).text
    assert "report.odt" in page and "onerror" not in page
    assert '<option value="nas" selected>' in page
    assert '<input type="hidden" name="back" value="/versions?folder=nas">' in page
    page = (await client.get("/versions", params={"folder": "nowhere"})).text
    assert "no folder &#39;nowhere&#39; is synced" in page


async def test_versions_page_needs_a_session_and_changes_nothing(
    client: httpx.AsyncClient, backend: FakeBackend, auth: Auth, clock: Clock
) -> None:
    r = await client.get("/versions")
    assert r.status_code == 401 and "onerror" not in r.text and "report.odt" not in r.text
    csrf = await log_in(client, auth, clock)
    r = await client.get("/versions", params=restore_form(csrf) | {"confirmed": "yes"})
    assert r.status_code == 200
    assert backend.actions == [] and not any(k["restored"] for k in backend.kept)


async def test_a_long_file_name_is_shortened(auth: Auth, clock: Clock) -> None:
    backend = FakeBackend()
    backend.add_folder("f", "/f")
    backend.keep_version("f", "d/" + "x" * 4000 + ".txt", T_OLD)
    app = create_app(backend, auth, PORT, backend.feed, clock)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=ORIGIN) as client:
        await log_in(client, auth, clock)
        page = (await client.get("/versions")).text
    assert "x" * 117 + "…</td>" in page  # shown cut short; the form still carries the whole name
    assert len(page) < 20_000


# -- restore ---------------------------------------------------------------------------------------


async def test_restore_without_a_session_is_refused(client: httpx.AsyncClient, backend: FakeBackend) -> None:
    r = await client.post("/act", data=restore_form("anything") | {"confirmed": "yes"}, headers=SAME_ORIGIN)
    assert r.status_code == 401
    assert backend.actions == [] and not any(k["restored"] for k in backend.kept)


@pytest.mark.parametrize("sent", [None, "", "wrong"])
async def test_restore_without_the_csrf_token_is_refused(
    logged_in: tuple[httpx.AsyncClient, str], backend: FakeBackend, sent: str | None
) -> None:
    client, csrf = logged_in
    form = restore_form(csrf) | {"confirmed": "yes"}
    if sent is None:
        del form["csrf"]
    else:
        form["csrf"] = sent
    assert (await client.post("/act", data=form, headers=SAME_ORIGIN)).status_code == 403
    assert (
        await client.post("/act", data=restore_form(csrf), headers={"Origin": "http://evil.example"})
    ).status_code == 403
    assert backend.actions == [] and not any(k["restored"] for k in backend.kept)


async def test_restore_asks_first_then_restores_the_very_version_listed(
    logged_in: tuple[httpx.AsyncClient, str], backend: FakeBackend
) -> None:
    client, csrf = logged_in
    r = await client.post("/act", data=restore_form(csrf), headers=SAME_ORIGIN)
    assert r.status_code == 200 and "Confirm: restore" in r.text
    assert "&lt;img src=x onerror=alert(1)&gt;.txt" in r.text and "<img" not in r.text
    assert "2025-12-06 05:46:40 UTC" in r.text  # the time the person picked
    assert backend.actions == []
    r = await client.post("/act", data=restore_form(csrf) | {"confirmed": "yes"}, headers=SAME_ORIGIN)
    assert r.status_code == 303 and r.headers["location"] == "/versions"
    assert backend.actions == [("restore", None, {"folder": "photos", "path": HOSTILE_FILE, "at": repr(T_OLD)})]
    restored = {k["kept_at"]: k["restored"] for k in backend.kept if k["name"] == HOSTILE_FILE}
    assert restored == {T_OLD: True, T_NEW: False}  # the older one, as listed: not the newest
    assert "restored &lt;img src=x onerror=alert(1)&gt;.txt in photos" in await flash(client, "/versions")


async def test_a_version_gone_since_the_page_was_shown_restores_nothing(
    logged_in: tuple[httpx.AsyncClient, str], backend: FakeBackend
) -> None:
    client, csrf = logged_in
    await client.get("/versions")
    backend.kept = [k for k in backend.kept if k["kept_at"] != T_NEW]  # removed by clean-up meanwhile
    r = await client.post("/act", data=restore_form(csrf, T_NEW) | {"confirmed": "yes"}, headers=SAME_ORIGIN)
    assert r.status_code == 303
    assert backend.actions == []  # not the older version instead
    assert not any(k["restored"] for k in backend.kept)
    assert "that version is no longer kept" in await flash(client, "/versions")


async def test_a_name_shown_cleaned_restores_the_file_of_that_name(
    logged_in: tuple[httpx.AsyncClient, str], backend: FakeBackend
) -> None:
    client, csrf = logged_in
    raw = "invoice\u202etxt.exe"  # a peer's name with a bidi override: shown without it
    backend.keep_version("photos", raw, T_OLD, 7, laptop_id())
    page = (await client.get("/versions")).text
    assert "\u202e" not in page and 'name="path" value="invoicetxt.exe"' in page
    r = await client.post(
        "/act", data=restore_form(csrf, name="invoicetxt.exe") | {"confirmed": "yes"}, headers=SAME_ORIGIN
    )
    assert r.status_code == 303
    assert backend.actions == [("restore", None, {"folder": "photos", "path": raw, "at": repr(T_OLD)})]
    assert next(k for k in backend.kept if k["name"] == raw)["restored"]


@pytest.mark.parametrize(
    "change",
    [{"at": ""}, {"at": "nan"}, {"at": "inf"}, {"at": "yesterday"}, {"path": ""}, {"folder": ""}],
)
async def test_a_malformed_restore_is_refused(
    logged_in: tuple[httpx.AsyncClient, str], backend: FakeBackend, change: dict[str, str]
) -> None:
    client, csrf = logged_in
    r = await client.post("/act", data=restore_form(csrf) | change | {"confirmed": "yes"}, headers=SAME_ORIGIN)
    assert r.status_code == 400
    assert backend.actions == []


# -- the Folders page ------------------------------------------------------------------------------


async def test_folders_page_shows_type_pause_differences_and_evictions(
    logged_in: tuple[httpx.AsyncClient, str],
) -> None:
    client, _ = logged_in
    page = (await client.get("/folders")).text
    photos, nas, docs = (page[page.index(f'data-folder="{f}"') :] for f in ("photos", "nas", "docs"))
    photos, nas = photos[: photos.index("</article>")], nas[: nas.index("</article>")]
    docs = docs[: docs.index("</article>")]
    assert "Send only" in photos and "3 names differ from the peers (send-only)" in photos
    assert 'value="folder_override"' in photos and "Override the peers" in photos
    assert 'value="folder_pause"' in photos and 'value="folder_revert"' not in photos
    assert "Receive only" in nas and "1 local change (receive-only)" in nas
    assert 'value="folder_revert"' in nas and "Revert local changes" in nas and 'value="folder_override"' not in nas
    assert "2 kept versions were removed" in nas
    assert "Send &amp; receive" in docs and '<span class="state paused">paused</span>' in docs
    assert 'value="folder_resume"' in docs and 'value="folder_pause"' not in docs
    assert "kept versions were removed" not in photos + docs


@pytest.mark.parametrize(
    ("action", "folder", "label"),
    [
        ("folder_override", "photos", "folder override"),
        ("folder_revert", "nas", "folder revert"),
        ("folder_pause", "photos", "folder pause"),
        ("folder_resume", "docs", "folder resume"),
    ],
)
async def test_folder_actions_need_session_and_csrf_ask_first_and_call_the_agent(
    client: httpx.AsyncClient, backend: FakeBackend, auth: Auth, clock: Clock, action: str, folder: str, label: str
) -> None:
    confirmed = {"confirmed": "yes"}
    r = await client.post("/act", data=folder_form("x", action, folder) | confirmed, headers=SAME_ORIGIN)
    assert r.status_code == 401
    csrf = await log_in(client, auth, clock)
    for bad in ("", "wrong"):
        r = await client.post("/act", data=folder_form(bad, action, folder) | confirmed, headers=SAME_ORIGIN)
        assert r.status_code == 403
    assert backend.actions == []
    r = await client.post("/act", data=folder_form(csrf, action, folder), headers=SAME_ORIGIN)
    assert r.status_code == 200 and f"Confirm: {label}" in r.text and backend.actions == []
    r = await client.post("/act", data=folder_form(csrf, action, folder) | confirmed, headers=SAME_ORIGIN)
    assert r.status_code == 303 and r.headers["location"] == "/folders"
    assert backend.actions == [(action, None, {"folder": folder})]
    entry = backend.folder(folder)
    after = {
        "folder_override": entry["remote_differs"] == 0,
        "folder_revert": entry["locally_changed"] == 0,
        "folder_pause": entry["paused"] and entry["state"] == "paused",
        "folder_resume": not entry["paused"] and entry["state"] == "idle",
    }
    assert after[action]
    assert f"folder &#39;{folder}&#39;" in await flash(client, "/folders")


async def test_override_and_revert_confirm_with_a_warning_button(
    logged_in: tuple[httpx.AsyncClient, str], backend: FakeBackend
) -> None:
    client, csrf = logged_in
    backend.folder("nas")["versioning"] = "off"
    r = await client.post("/act", data=folder_form(csrf, "folder_revert", "nas"), headers=SAME_ORIGIN)
    assert "local changes: <code" in r.text and ">1</code>" in r.text
    assert "the local changes are lost for good" in r.text  # no versions are kept here
    assert '<button class="danger">Yes, folder revert</button>' in r.text
    r = await client.post("/act", data=folder_form(csrf, "folder_override", "photos"), headers=SAME_ORIGIN)
    assert "names that differ: <code" in r.text and ">3</code>" in r.text
    assert '<button class="danger">Yes, folder override</button>' in r.text
    assert backend.actions == []


async def test_a_refused_folder_action_shows_why(
    logged_in: tuple[httpx.AsyncClient, str], backend: FakeBackend
) -> None:
    client, csrf = logged_in
    form = folder_form(csrf, "folder_override", "docs") | {"confirmed": "yes"}  # send & receive
    assert (await client.post("/act", data=form, headers=SAME_ORIGIN)).status_code == 303
    assert "folder &#39;docs&#39; is not send-only" in await flash(client, "/folders")
    form = folder_form(csrf, "folder_pause", "") | {"confirmed": "yes"}
    assert (await client.post("/act", data=form, headers=SAME_ORIGIN)).status_code == 400
