"""The page's security rules, one test each, through an in-process client (httpx + ASGI)."""

from __future__ import annotations

import logging
import re

import httpx
import pytest

from agent.ui import auth as auth_mod
from agent.ui import format as fmt
from agent.ui.app import CSP
from agent.ui.auth import Auth
from agent.ui.fake import FakeBackend, fake_device_id
from tests.ui.conftest import ORIGIN, PORT, Clock, log_in

pytestmark = pytest.mark.anyio

SAME_ORIGIN = {"Origin": ORIGIN}
FORM = {"Content-Type": "application/x-www-form-urlencoded"}
BIDI_AND_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")

HOSTILE_NAMES = [
    "<script>window.__pwned=1</script>",
    '"><img src=x onerror="window.__pwned=1">',
    "\u202eexe.txt\u202c good",
    "\u2066iso\u2069late \u200fmark\u200e",
    "bell\x07 esc\x1b[31m red\x9b c1",
    "x" * 10240 + "<script>window.__pwned=1</script>",
]


def pending_id() -> str:
    return fake_device_id("newcomer")


def changed_id() -> str:
    return fake_device_id("phone")


# -- Host allowlist (DNS rebinding) --------------------------------------------------------------


@pytest.mark.parametrize("host", [f"127.0.0.1:{PORT}", f"localhost:{PORT}", f"[::1]:{PORT}", f"LOCALHOST:{PORT}"])
async def test_loopback_hosts_are_served(client: httpx.AsyncClient, host: str) -> None:
    r = await client.get("/", headers={"Host": host})
    assert r.status_code == 401  # served (the login page), not refused


@pytest.mark.parametrize(
    "host",
    [
        "evil.example",
        f"evil.example:{PORT}",
        "127.0.0.1",
        "localhost",
        f"127.0.0.1:{PORT + 1}",
        f"localhost.evil.example:{PORT}",
        f"0.0.0.0:{PORT}",
        f"192.168.1.2:{PORT}",
        "",
    ],
)
async def test_other_hosts_are_refused(client: httpx.AsyncClient, auth: Auth, clock: Clock, host: str) -> None:
    token = auth.issue_token(clock.now)
    r = await client.get("/login", params={"token": token}, headers={"Host": host})
    assert r.status_code == 421
    assert "set-cookie" not in r.headers
    # the token was not spent by the refused request
    assert (await client.get("/login", params={"token": token})).status_code == 303


# -- headers ---------------------------------------------------------------------------------------


async def test_every_response_has_the_security_headers(logged_in: tuple[httpx.AsyncClient, str]) -> None:
    client, csrf = logged_in
    responses = [
        await client.get("/"),
        await client.get(f"/device/{changed_id()}"),
        await client.get("/this"),
        await client.get("/qr.svg"),
        await client.get("/static/ui.css"),
        await client.get("/static/ui.js"),
        await client.get("/static/missing.js"),
        await client.get("/nowhere"),
        await client.get("/", headers={"Host": "evil.example"}),
        await client.get("/login", params={"token": "wrong"}),
        await client.post("/act", data={"csrf": "bad", "action": "revoke"}, headers=SAME_ORIGIN),
        await client.post("/act", data={"csrf": csrf, "action": "nope"}, headers=SAME_ORIGIN),
    ]
    for r in responses:
        assert r.headers["content-security-policy"] == CSP, r.url
        assert r.headers["x-content-type-options"] == "nosniff"
        assert r.headers["referrer-policy"] == "no-referrer"
        assert r.headers["cache-control"] == "no-store"
        assert "server" not in r.headers or "hypercorn" not in r.headers["server"].lower()
    assert CSP == (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    )


async def test_pages_have_no_inline_script_or_style(logged_in: tuple[httpx.AsyncClient, str]) -> None:
    client, _ = logged_in
    for path in ["/", f"/device/{changed_id()}", "/this", "/folders", "/versions", "/anomalies", "/log"]:
        page = (await client.get(path)).text
        assert re.search(r"<script(?![^>]*\bsrc=\"/static/)", page) is None, path
        assert " style=" not in page and "<style" not in page, path
        assert re.search(r"\son[a-z]+=", page) is None, path


# -- no state change by GET ------------------------------------------------------------------------


async def test_get_changes_nothing(logged_in: tuple[httpx.AsyncClient, str], backend: FakeBackend) -> None:
    client, csrf = logged_in
    before = await backend.snapshot()
    query = {"csrf": csrf, "action": "revoke", "device": pending_id(), "confirmed": "yes"}
    for path in [
        "/act",
        "/logout",
        "/",
        f"/device/{pending_id()}",
        "/this",
        "/folders",
        "/versions",
        "/log",
        "/anomalies",
    ]:
        r = await client.get(path, params=query)
        assert r.status_code in (200, 405), path
    assert (await client.get("/act")).status_code == 405
    assert backend.actions == []
    assert await backend.snapshot() == before
    assert (await client.get("/")).status_code == 200  # still logged in: GET /logout did nothing


# -- POST: session, CSRF, origin -------------------------------------------------------------------


def revoke_form(csrf: str, device: str | None = None) -> dict[str, str]:
    return {"csrf": csrf, "action": "revoke", "device": device or pending_id(), "confirmed": "yes"}


async def test_post_without_session_is_refused(client: httpx.AsyncClient, backend: FakeBackend) -> None:
    r = await client.post("/act", data=revoke_form("anything"), headers=SAME_ORIGIN)
    assert r.status_code == 401
    assert backend.actions == []


@pytest.mark.parametrize("sent", [None, "", "wrong", "x" * 43])
async def test_post_without_the_csrf_token_is_refused(
    logged_in: tuple[httpx.AsyncClient, str], backend: FakeBackend, sent: str | None
) -> None:
    client, csrf = logged_in
    form = revoke_form(csrf)
    if sent is None:
        del form["csrf"]
    else:
        form["csrf"] = sent
    r = await client.post("/act", data=form, headers=SAME_ORIGIN)
    assert r.status_code == 403
    assert backend.actions == []


async def test_csrf_token_of_another_session_is_refused(
    logged_in: tuple[httpx.AsyncClient, str], backend: FakeBackend, auth: Auth, clock: Clock
) -> None:
    client, csrf = logged_in
    app = client._transport  # a second browser on the same app
    async with httpx.AsyncClient(transport=app, base_url=ORIGIN) as other:
        other_csrf = await log_in(other, auth, clock)
    assert other_csrf != csrf
    r = await client.post("/act", data=revoke_form(other_csrf), headers=SAME_ORIGIN)
    assert r.status_code == 403 and backend.actions == []


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Origin": "http://evil.example"},
        {"Origin": "null"},
        {"Origin": f"http://localhost:{PORT}"},  # another of the allowed names is another origin
        {"Origin": f"https://127.0.0.1:{PORT}"},
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-site"},
        {"Origin": "http://evil.example", "Sec-Fetch-Site": "same-origin"},
        {"Origin": "null", "Sec-Fetch-Site": "cross-site"},
    ],
)
async def test_post_from_another_origin_is_refused(
    logged_in: tuple[httpx.AsyncClient, str], backend: FakeBackend, headers: dict[str, str]
) -> None:
    client, csrf = logged_in
    r = await client.post("/act", data=revoke_form(csrf), headers=headers)
    assert r.status_code == 403
    assert backend.actions == []


@pytest.mark.parametrize("origin", [None, "null"])  # Chromium sends null on form posts under no-referrer
async def test_same_origin_by_fetch_metadata_is_accepted(
    logged_in: tuple[httpx.AsyncClient, str], backend: FakeBackend, origin: str | None
) -> None:
    client, csrf = logged_in
    headers = {"Sec-Fetch-Site": "same-origin"} | ({"Origin": origin} if origin else {})
    r = await client.post("/act", data=revoke_form(csrf), headers=headers)
    assert r.status_code == 303
    assert backend.actions == [("revoke", pending_id(), {})]


async def test_post_must_be_a_form(logged_in: tuple[httpx.AsyncClient, str], backend: FakeBackend) -> None:
    client, csrf = logged_in
    r = await client.post("/act", json=revoke_form(csrf), headers=SAME_ORIGIN)
    assert r.status_code == 415
    r = await client.post("/act", content=b"a=" + b"x" * 20000, headers=SAME_ORIGIN | FORM)
    assert r.status_code == 413
    assert backend.actions == []


# -- actions: confirmation, verify, errors ---------------------------------------------------------


async def test_every_action_asks_for_confirmation_first(
    logged_in: tuple[httpx.AsyncClient, str], backend: FakeBackend
) -> None:
    client, csrf = logged_in
    form = revoke_form(csrf)
    del form["confirmed"]
    r = await client.post("/act", data=form, headers=SAME_ORIGIN)
    assert r.status_code == 200 and "Confirm: revoke" in r.text
    assert backend.actions == []
    r = await client.post("/act", data=revoke_form(csrf), headers=SAME_ORIGIN)
    assert r.status_code == 303 and r.headers["location"] == f"/device/{pending_id()}"
    assert backend.actions == [("revoke", pending_id(), {})]
    page = (await client.get(r.headers["location"])).text
    assert "revoke: done for newcomer" in page
    assert "revoke: done" not in (await client.get("/")).text  # a flash is shown once


async def test_verify_needs_the_numbers_match_box(
    logged_in: tuple[httpx.AsyncClient, str], backend: FakeBackend
) -> None:
    client, csrf = logged_in
    device = fake_device_id("laptop")
    fp = backend.peer(device)["fingerprint"]
    form = {"csrf": csrf, "action": "verify", "device": device, "fingerprint": fp, "confirmed": "yes"}
    r = await client.post("/act", data=form, headers=SAME_ORIGIN, follow_redirects=True)
    assert "the numbers match" in r.text and backend.actions == []
    r = await client.post("/act", data=form | {"matched": "on"}, headers=SAME_ORIGIN)
    assert r.status_code == 303
    assert backend.peer(device)["trust"] == "verified"


async def test_retrust_names_the_key_the_person_saw(
    logged_in: tuple[httpx.AsyncClient, str], backend: FakeBackend
) -> None:
    client, csrf = logged_in
    page = (await client.get(f"/device/{changed_id()}")).text
    offered = backend.peer(changed_id())["pending_fingerprint"]
    assert f'name="fingerprint" value="{offered}"' in page
    backend.offer_key(changed_id(), "yet-another-key")  # the key changes again while the page is open
    form = {"csrf": csrf, "action": "retrust", "device": changed_id(), "fingerprint": offered, "confirmed": "yes"}
    r = await client.post("/act", data=form, headers=SAME_ORIGIN, follow_redirects=True)
    assert "the key changed while you looked" in r.text
    assert backend.peer(changed_id())["trust"] == "key_changed"


async def test_an_unsupported_action_shows_a_clear_error(auth: Auth, clock: Clock) -> None:
    from agent.ui.app import create_app

    backend = FakeBackend(unsupported=frozenset({"window_open"}))
    app = create_app(backend, auth, PORT, backend.feed, clock)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=ORIGIN) as client:
        csrf = await log_in(client, auth, clock)
        form = {"csrf": csrf, "action": "window_open", "back": "/this", "confirmed": "yes"}
        r = await client.post("/act", data=form, headers=SAME_ORIGIN, follow_redirects=True)
        assert r.status_code == 200
        assert "this agent does not support &#39;window_open&#39;" in r.text
        r = await client.post("/act", data=form | {"action": "format_disk"}, headers=SAME_ORIGIN)
        assert r.status_code == 400


async def test_redirects_stay_on_this_site(logged_in: tuple[httpx.AsyncClient, str], auth: Auth, clock: Clock) -> None:
    client, csrf = logged_in
    evils = ["//evil.example/", "http://evil.example/", "/\\evil.example", "javascript:alert(1)"]
    for evil in evils:
        form = revoke_form(csrf) | {"back": evil}
        r = await client.post("/act", data=form, headers=SAME_ORIGIN)
        assert r.headers["location"] == f"/device/{pending_id()}"
    for evil in evils:
        r = await client.get("/login", params={"token": auth.issue_token(clock.now), "next": evil})
        assert r.headers["location"] == "/"


# -- login -----------------------------------------------------------------------------------------


async def test_login_trades_a_token_for_a_strict_httponly_cookie(
    client: httpx.AsyncClient, auth: Auth, clock: Clock
) -> None:
    assert (await client.get("/")).status_code == 401
    token = auth.issue_token(clock.now)
    r = await client.get("/login", params={"token": token, "next": f"/device/{pending_id()}"})
    assert r.status_code == 303
    assert r.headers["location"] == f"/device/{pending_id()}"  # the token is not in the new address
    cookie = r.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and token not in cookie
    assert (await client.get("/")).status_code == 200


async def test_a_token_works_once(client: httpx.AsyncClient, auth: Auth, clock: Clock) -> None:
    token = auth.issue_token(clock.now)
    assert (await client.get("/login", params={"token": token})).status_code == 303
    client.cookies.clear()
    r = await client.get("/login", params={"token": token})
    assert r.status_code == 403 and "already used or has expired" in r.text
    assert (await client.get("/")).status_code == 401


async def test_a_token_expires(client: httpx.AsyncClient, auth: Auth, clock: Clock) -> None:
    token = auth.issue_token(clock.now)
    clock.now += auth_mod.TOKEN_TTL + 1
    assert (await client.get("/login", params={"token": token})).status_code == 403


async def test_login_attempts_are_rate_limited(client: httpx.AsyncClient, auth: Auth, clock: Clock) -> None:
    for _ in range(auth_mod.LOGIN_ATTEMPTS):
        assert (await client.get("/login", params={"token": "guess"})).status_code == 403
    good = auth.issue_token(clock.now)
    assert (await client.get("/login", params={"token": good})).status_code == 429
    clock.now += auth_mod.LOGIN_WINDOW + 1
    assert (await client.get("/login", params={"token": good})).status_code == 303


async def test_logout_ends_the_session(logged_in: tuple[httpx.AsyncClient, str]) -> None:
    client, csrf = logged_in
    r = await client.post("/logout", data={"csrf": csrf}, headers=SAME_ORIGIN)
    assert r.status_code == 303
    assert (await client.get("/")).status_code == 401


async def test_the_token_is_never_logged(
    client: httpx.AsyncClient, auth: Auth, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    token = auth.issue_token(clock.now)
    await client.get("/login", params={"token": token})
    await client.get("/login", params={"token": token})
    await client.get("/")
    ours = [r.getMessage() for r in caplog.records if r.name != "httpx"]  # httpx is the test's client
    assert all(token not in line for line in ours)


async def test_pages_need_a_session(client: httpx.AsyncClient) -> None:
    for path in [
        "/",
        f"/device/{pending_id()}",
        "/this",
        "/folders",
        "/versions",
        "/anomalies",
        "/log",
        "/qr.svg",
        "/events",
    ]:
        r = await client.get(path)
        assert r.status_code == 401, path
        assert pending_id() not in r.text


# -- peer-chosen strings ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", HOSTILE_NAMES)
async def test_hostile_names_are_escaped_cleaned_and_fingerprinted(auth: Auth, clock: Clock, name: str) -> None:
    from agent.ui.app import create_app

    backend = FakeBackend()
    device = backend.add_device("mallory", name=name, trust="pending")
    backend.raise_anomaly(device, "advert_mismatch", name)
    backend.add_folder(name, f"/home/{name}", [(device, 3, 4096)])
    backend.status["offered_folders"] = [{"id": name, "device_id": device, "name": name}]
    backend.keep_version(name, f"{name}/{name[:200]}.txt", 1_765_000_000.5, 10, device)  # a peer's file name
    app = create_app(backend, auth, PORT, backend.feed, clock)
    fp = fmt.short_fingerprint(backend.peer(device)["fingerprint"])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=ORIGIN) as client:
        await log_in(client, auth, clock)
        for path in ["/", f"/device/{device}", "/folders", "/versions", "/anomalies", "/log", f"/log?device={device}"]:
            page = (await client.get(path)).text
            assert "<script>window" not in page and "<img" not in page and 'onerror="' not in page, path
            assert BIDI_AND_CONTROL.search(page) is None, path
            assert len(page) < 40_000, path  # a 10 KB name is cut short
            names = re.findall(r'<span class="who">(.*?)</span></span>', page, re.S) + re.findall(
                r'<span class="who">(.*?)</code></span>', page, re.S
            )
            assert any(fp in n for n in names), path  # the name stands next to the fingerprint
        confirm = await client.post(
            "/act",
            data={"csrf": await _csrf(client), "action": "accept", "device": device},
            headers=SAME_ORIGIN,
        )
        assert "<script>window" not in confirm.text and BIDI_AND_CONTROL.search(confirm.text) is None
        assert fp in confirm.text


async def _csrf(client: httpx.AsyncClient) -> str:
    page = (await client.get("/")).text
    return str(re.findall(r'name="csrf" value="([^"]+)"', page)[0])


def test_clean_removes_control_bidi_and_invisible_characters() -> None:
    hostile = "".join(chr(c) for c in [*range(0x20), 0x7F, *range(0x80, 0xA0)])
    hostile += "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f\u061c\u200b\ufeff"
    assert fmt.clean("a" + hostile + "b") == "ab"
    assert fmt.clean("Zo\u00eb\u2019s laptop 💻") == "Zo\u00eb\u2019s laptop 💻"
    assert fmt.short("x" * 10240) == "x" * 63 + "…"
    tree = fmt.clean_tree({"na\u202eme": ["a\x00b", {"c": "\u2066d"}], "n": 3})
    assert tree == {"name": ["ab", {"c": "d"}], "n": 3}
