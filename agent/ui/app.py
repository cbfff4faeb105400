"""The Starlette application: pages, the SSE feed, login, and the security rules around them.

Imported only when the first browser connects (see `agent.ui.server`): Starlette and Jinja2 cost a
few MB that an agent nobody looks at should not pay.

Security rules (each has a test in tests/ui/test_security.py):
- the Host header must be 127.0.0.1:PORT, localhost:PORT or [::1]:PORT (DNS rebinding);
- nothing changes state on GET; every POST needs the session cookie, the session's CSRF token and a
  same-origin `Origin` (or, when it is absent or `null`, `Sec-Fetch-Site: same-origin`; Chromium
  sends `Origin: null` on form posts from a page with `Referrer-Policy: no-referrer`);
- every response carries a strict CSP, nosniff, no-referrer and no-store;
- all agent data is cleaned of control, bidi and invisible characters at this boundary
  (`format.clean_tree`) and escaped by Jinja2's autoescape; a name always stands next to a fingerprint.
"""

from __future__ import annotations

import importlib.resources
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qsl, urlencode

import anyio
import jinja2
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Route

from agent.errors import UserError
from agent.ui import format as fmt
from agent.ui.auth import Auth, RateLimited, Session
from agent.ui.backend import ACTIONS, ChangeFeed, UiBackend

log = logging.getLogger(__name__)

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
    (b"x-frame-options", b"DENY"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),
]
MAX_FORM = 16 * 1024
KEEPALIVE = 15.0
LEVELS = {
    "verified": "Verified",
    "tofu": "Trusted on first use",
    "pending": "Waits for approval",
    "key_changed": "Key changed",
    "revoked": "Revoked",
    "unknown": "Unknown",
}
CONFIRM_TEXT = {
    "verify": "Mark this key as verified: you compared the safety number and every group matched.",
    "revoke": "Revoke this device: it is disconnected and may not sync until you re-trust it.",
    "retrust": "Pin the NEW key this device offered. Do this only if you know why its key changed.",
    "accept": "Let this new device sync with this machine.",
    "reject": "Refuse this device: it stays blocked.",
    "forget": "Forget this device and its history of trust here; it will be treated as new if it comes back.",
    "introducer_on": "Let this device introduce other devices to this machine.",
    "introducer_off": "Stop accepting introductions from this device.",
    "clear_anomalies": "Mark this device's anomalies as reviewed.",
    "window_open": "Open the pairing window: new devices may ask to pair for a short while.",
    "window_close": "Close the pairing window.",
    "pair_start": "Start a code pairing: a code is shown to type on the other machine.",
    "pair_join": "Join the pairing that shows this code on the other machine.",
    "rotate_key": "Make a new key for this machine; peers follow the signed rotation and reconnect.",
    "accept_folder": "Accept the folder this device offers.",
    "restore": (
        "Put this kept version back as the file's content. It syncs to the peers as a normal change; "
        "what it replaces is kept as a version too."
    ),
    "folder_override": (
        "Override the peers: for every name that differs, this machine's file (or its absence) replaces "
        "what every peer has. The peers' own changes to those names are undone there (each peer keeps "
        "what it replaces as a version if its folder keeps versions)."
    ),
    "folder_revert": (
        "Revert this machine's changes: every local change in this receive-only folder is undone and "
        "the peers' content comes back. The changed files are kept as versions (see Versions) if the "
        "folder keeps versions."
    ),
    "folder_pause": "Pause this folder: no data of it moves until you resume it.",
    "folder_resume": "Resume this folder: it syncs with its peers again.",
}
SECRET_ARGS = ("code",)  # action arguments never echoed back into a page
ACTION_ARGS = ("fingerprint", "code", "folder", "path", "at")  # form fields an action may take
FOLDER_ACTIONS = frozenset({"restore", "folder_override", "folder_revert", "folder_pause", "folder_resume"})
TYPES = {"sendreceive": "Send & receive", "sendonly": "Send only", "receiveonly": "Receive only"}
VERSIONS_SHOWN = 500  # the newest this many kept versions are listed
VERSIONS_WAIT = 15.0  # seconds to wait for the listing (a busy or starting folder holds it up)


def _local_path(value: str | None, default: str = "/") -> str:
    """`value` if it is a path on this site (not //host or a scheme), else `default`."""
    if not value or not value.startswith("/") or value.startswith("//") or "\\" in value:
        return default
    return value if all(31 < ord(c) < 127 for c in value) else default


def _wall(value: object) -> float | None:
    """A unix wall time from a form field or the agent (`kept_at`), or None if it is not one."""
    if isinstance(value, bool):
        return None
    try:
        wall = float(value) if isinstance(value, str | int | float) else math.nan
    except ValueError:
        return None
    return wall if math.isfinite(wall) else None


def _folder_shown(
    action: str, args: dict[str, str], at: float | None, snap: dict[str, Any]
) -> tuple[dict[str, str], str | None]:
    """What the confirmation of a folder action shows (label -> value), and a warning if any."""
    folder: dict[str, Any] = next((f for f in snap["folders"] if f.get("id") == args.get("folder")), {})
    shown = {"folder": args.get("folder", "")}
    warning = None
    if action == "restore":
        shown |= {"file": args.get("path", ""), "kept at": fmt.utc(at)}
    elif action == "folder_override":
        shown["names that differ"] = str(folder.get("remote_differs", "?"))
    elif action == "folder_revert":
        shown["local changes"] = str(folder.get("locally_changed", "?"))
        if folder.get("versioning") == "off":
            warning = "This folder keeps no versions (versioning = off): the local changes are lost for good."
    return shown, warning


class SecurityMiddleware:
    """Refuses a foreign Host and stamps the security headers on every response (raw ASGI)."""

    def __init__(self, app: Callable[..., Awaitable[None]], allowed_hosts: frozenset[str]) -> None:
        self.app = app
        self.allowed_hosts = allowed_hosts

    async def __call__(
        self,
        scope: MutableMapping[str, Any],
        receive: Callable[[], Awaitable[MutableMapping[str, Any]]],
        send: Callable[[MutableMapping[str, Any]], Awaitable[None]],
    ) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                names = {h[0] for h in SECURITY_HEADERS}
                message["headers"] = [h for h in message.get("headers", []) if h[0] not in names] + SECURITY_HEADERS
            await send(message)

        hosts = [v for k, v in scope["headers"] if k == b"host"]
        if len(hosts) != 1 or hosts[0].decode("latin-1").lower() not in self.allowed_hosts:
            response = Response("unknown Host: open the page from tofu-agent ui\n", 421, media_type="text/plain")
            await response(scope, receive, send_with_headers)
            return
        await self.app(scope, receive, send_with_headers)


class Ui:
    """The page's routes over one backend."""

    def __init__(
        self,
        backend: UiBackend,
        auth: Auth,
        port: int,
        changes: ChangeFeed,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.backend = backend
        self.auth = auth
        self.port = port
        self.changes = changes
        self.clock = clock
        self.cookie = f"tofu_ui_{port}"
        self.env = jinja2.Environment(
            loader=jinja2.PackageLoader("agent.ui", "templates"),
            autoescape=True,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.env.filters["short"] = fmt.short
        self.env.filters["fp"] = fmt.fingerprint
        self.env.filters["shortfp"] = fmt.short_fingerprint
        self.env.filters["utc"] = fmt.utc
        self.env.globals["LEVELS"] = LEVELS
        self.env.globals["TYPES"] = TYPES
        static = importlib.resources.files("agent.ui") / "static"
        self.static = {p.name: p.read_bytes() for p in static.iterdir() if p.name.endswith((".css", ".js"))}
        self._qr: tuple[str, bytes] | None = None

    # -- plumbing -------------------------------------------------------------------------------

    def session(self, request: Request) -> tuple[str, Session] | None:
        sid = request.cookies.get(self.cookie)
        s = self.auth.session(sid, self.clock())
        return (sid, s) if sid and s else None

    def render(
        self, request: Request, template: str, session: Session | None, status: int = 200, **ctx: Any
    ) -> HTMLResponse:
        flash: list[tuple[str, str]] = []
        if session is not None and request.headers.get("x-live") != "1":
            flash, session.flash = session.flash, []
        html = self.env.get_template(template).render(
            request_path=request.url.path,
            csrf=session.csrf if session else "",
            flash=flash,
            logged_in=session is not None,
            **ctx,
        )
        return HTMLResponse(html, status)

    def login_needed(self, request: Request) -> HTMLResponse:
        return self.render(request, "login.html", None, 401, title="Log in")

    async def snapshot(self) -> dict[str, Any]:
        snap: dict[str, Any] = fmt.clean_tree(await self.backend.snapshot())
        snap.setdefault("peers", [])
        snap.setdefault("folders", [])
        return snap

    # -- pages ----------------------------------------------------------------------------------

    async def devices(self, request: Request) -> Response:
        got = self.session(request)
        if got is None:
            return self.login_needed(request)
        snap = await self.snapshot()
        peers = snap["peers"]
        requests = [p for p in peers if p.get("trust") in ("pending", "key_changed")]
        needs: dict[str, list[dict[str, Any]]] = {}
        for f in snap["folders"]:
            for fp in f.get("peers", []):
                needs.setdefault(fp.get("device_id", ""), []).append({"folder": f.get("id", ""), **fp})
        return self.render(
            request, "devices.html", got[1], title="Devices", snap=snap, requests=requests, peers=peers, needs=needs
        )

    async def device(self, request: Request) -> Response:
        got = self.session(request)
        if got is None:
            return self.login_needed(request)
        device_id = request.path_params["device_id"]
        snap = await self.snapshot()
        peer = next((p for p in snap["peers"] if p.get("device_id") == device_id), None)
        if peer is None or not fmt.is_device_id(device_id):
            return self.render(request, "notfound.html", got[1], 404, title="No such device")
        me = self.backend.this_device()
        key_changed = peer.get("trust") == "key_changed" and fmt.is_fingerprint(peer.get("pending_fingerprint"))
        compared = peer.get("pending_fingerprint") if key_changed else peer.get("fingerprint")
        safety = grid = None
        if fmt.is_fingerprint(compared) and fmt.is_fingerprint(me.fingerprint):
            safety = await anyio.to_thread.run_sync(fmt.safety, me.device_id, me.fingerprint, device_id, compared)
            grid = fmt.visual_grid(me.fingerprint, compared)
        history = fmt.clean_tree(await self.backend.trust_log(device_id, 50))
        return self.render(
            request,
            "device.html",
            got[1],
            title=fmt.short(str(peer.get("name") or "device"), 40),
            p=peer,
            me=me,
            key_changed=key_changed,
            compared=compared,
            safety=safety,
            grid=grid,
            symbols=fmt.SYMBOLS,
            colours=fmt.COLOURS,
            history=history,
        )

    async def this(self, request: Request) -> Response:
        got = self.session(request)
        if got is None:
            return self.login_needed(request)
        snap = await self.snapshot()
        me = self.backend.this_device()
        return self.render(
            request,
            "this.html",
            got[1],
            title="This machine",
            me=me,
            name=fmt.clean(me.name),
            uri=self._uri(),
            window=snap.get("pairing_window"),
        )

    async def folders(self, request: Request) -> Response:
        got = self.session(request)
        if got is None:
            return self.login_needed(request)
        snap = await self.snapshot()
        names = {p.get("device_id"): p for p in snap["peers"]}
        return self.render(
            request,
            "folders.html",
            got[1],
            title="Folders",
            folders=snap["folders"],
            offered=snap.get("offered_folders") or [],
            names=names,
        )

    async def versions(self, request: Request) -> Response:
        got = self.session(request)
        if got is None:
            return self.login_needed(request)
        snap = await self.snapshot()
        folder = request.query_params.get("folder") or None
        kept: list[dict[str, Any]] | None = None
        error: str | None = None
        with anyio.move_on_after(VERSIONS_WAIT):
            try:
                kept = fmt.clean_tree(await self.backend.versions(folder))
            except UserError as exc:
                error = fmt.clean(str(exc))
            except Exception:
                log.exception("the web page could not list the kept versions")
                error = "listing the kept versions failed inside the agent; see its log"
        if kept is None and error is None:
            error = "the agent did not list the kept versions in time (a folder is busy or starting); reload soon"
        found = kept or []
        return self.render(
            request,
            "versions.html",
            got[1],
            title="Versions",
            kept=found[:VERSIONS_SHOWN],
            total=len(found),
            error=error,
            folder=folder,
            folders=[str(f.get("id", "")) for f in snap["folders"]],
            names={p.get("device_id"): p for p in snap["peers"]},
            me=self.backend.this_device().device_id,
            back="/versions" + (f"?{urlencode({'folder': folder})}" if folder else ""),
        )

    async def anomalies(self, request: Request) -> Response:
        got = self.session(request)
        if got is None:
            return self.login_needed(request)
        snap = await self.snapshot()
        device = request.query_params.get("device") or None
        names = {p.get("device_id"): p for p in snap["peers"]}
        found = [a for p in snap["peers"] for a in p.get("anomalies", []) if device in (None, p.get("device_id"))]
        found.sort(key=lambda a: -float(a.get("last_seen") or 0))
        return self.render(
            request,
            "anomalies.html",
            got[1],
            title="Anomalies",
            found=found,
            names=names,
            device=device,
            peers=snap["peers"],
        )

    async def trust_log(self, request: Request) -> Response:
        got = self.session(request)
        if got is None:
            return self.login_needed(request)
        snap = await self.snapshot()
        device = request.query_params.get("device") or None
        events = fmt.clean_tree(await self.backend.trust_log(device, 500))
        names = {p.get("device_id"): p for p in snap["peers"]}
        return self.render(
            request,
            "log.html",
            got[1],
            title="Trust log",
            events=events,
            names=names,
            device=device,
            peers=snap["peers"],
        )

    def _uri(self) -> str:
        me = self.backend.this_device()
        return fmt.identity_uri(me.device_id, me.name, me.fingerprint)

    async def qr(self, request: Request) -> Response:
        if self.session(request) is None:
            return Response(status_code=401)
        uri = self._uri()
        if self._qr is None or self._qr[0] != uri:
            self._qr = (uri, fmt.qr_svg(uri))
        return Response(self._qr[1], media_type="image/svg+xml")

    async def static_file(self, request: Request) -> Response:
        name = request.path_params["name"]
        body = self.static.get(name)
        if body is None:
            return Response("not found\n", 404, media_type="text/plain")
        kind = "text/css" if name.endswith(".css") else "text/javascript"
        return Response(body, media_type=kind)

    # -- login ----------------------------------------------------------------------------------

    async def login(self, request: Request) -> Response:
        token = request.query_params.get("token", "")
        try:
            got = self.auth.redeem(token, self.clock())
        except RateLimited:
            return self.render(request, "login.html", None, 429, title="Log in", limited=True)
        if got is None:
            return self.render(request, "login.html", None, 403, title="Log in", expired=bool(token))
        response = RedirectResponse(_local_path(request.query_params.get("next")), 303)
        response.set_cookie(self.cookie, got.session_id, httponly=True, samesite="strict", path="/")
        return response

    async def logout(self, request: Request) -> Response:
        got = await self._post_checks(request)
        if isinstance(got, Response):
            return got
        self.auth.end(got[0][0])
        response = RedirectResponse("/", 303)
        response.delete_cookie(self.cookie, path="/")
        return response

    # -- actions --------------------------------------------------------------------------------

    async def _post_checks(self, request: Request) -> tuple[tuple[str, Session], dict[str, str]] | Response:
        """The session, the origin and the CSRF token of a POST; its form fields if all are right."""
        got = self.session(request)
        if got is None:
            return Response("log in first: run tofu-agent ui\n", 401, media_type="text/plain")
        origin = request.headers.get("origin")
        host = request.headers.get("host", "")
        # `Referrer-Policy: no-referrer` makes browsers send `Origin: null` on a form POST; then the
        # browser-set `Sec-Fetch-Site` must say same-origin (a page cannot forge either header).
        if origin is not None and origin != "null":
            same = origin.lower() == f"http://{host.lower()}"
        else:
            same = request.headers.get("sec-fetch-site") == "same-origin"
        if not same:
            return Response("cross-origin request refused\n", 403, media_type="text/plain")
        if "application/x-www-form-urlencoded" not in request.headers.get("content-type", ""):
            return Response("expected a form\n", 415, media_type="text/plain")
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_FORM:
                return Response("form too large\n", 413, media_type="text/plain")
        try:
            form = dict(parse_qsl(body.decode("utf-8"), keep_blank_values=True, max_num_fields=32))
        except (UnicodeDecodeError, ValueError):
            return Response("malformed form\n", 400, media_type="text/plain")
        if not self.auth.csrf_ok(got[1], form.get("csrf")):
            return Response("stale or missing form token: reload the page\n", 403, media_type="text/plain")
        return got, form

    async def act(self, request: Request) -> Response:
        checked = await self._post_checks(request)
        if isinstance(checked, Response):
            return checked
        (_, session), form = checked
        action = form.get("action", "")
        if action not in ACTIONS:
            return Response("unknown action\n", 400, media_type="text/plain")
        device = form.get("device") or None
        if ACTIONS[action] and not fmt.is_device_id(device):
            return Response("this action needs a device\n", 400, media_type="text/plain")
        back = _local_path(form.get("back"), f"/device/{device}" if device else "/")
        args = {k: form[k] for k in ACTION_ARGS if form.get(k)}
        if action in FOLDER_ACTIONS and not args.get("folder"):
            return Response("this action needs a folder\n", 400, media_type="text/plain")
        at = _wall(args.get("at"))
        if action == "restore" and (not args.get("path") or at is None):
            return Response("restore needs a file and the time its version was kept\n", 400, media_type="text/plain")
        if action == "verify" and form.get("matched") != "on":
            session.flash.append(("error", "Tick “the numbers match” only after comparing every group."))
            return RedirectResponse(back, 303)
        if form.get("confirmed") != "yes":
            snap = await self.snapshot()
            peer = next((p for p in snap["peers"] if p.get("device_id") == device), None)
            shown = {k: v for k, v in args.items() if k not in SECRET_ARGS}
            warning = None
            if action in FOLDER_ACTIONS:
                shown, warning = _folder_shown(action, args, at, snap)
            return self.render(
                request,
                "confirm.html",
                session,
                title="Confirm",
                action=action,
                label=action.replace("_", " "),
                text=CONFIRM_TEXT[action],
                device=device,
                p=peer,
                args=args,
                shown=shown,
                back=back,
                matched=form.get("matched"),
                warning=warning,
            )
        try:
            if action == "restore" and at is not None:
                # the very version the person saw: its exact name (the page shows names cleaned of
                # invisible characters) and time; none if it is gone, not an older one
                args["path"] = await self._kept_name(args["folder"], args["path"], at)
                args["at"] = repr(at)
            message = await self.backend.act(action, device, **args)
            session.flash.append(("ok", fmt.clean(message)))
        except UserError as exc:
            session.flash.append(("error", fmt.clean(str(exc))))
        except Exception:
            log.exception("the web page's %s action failed", action)
            session.flash.append(("error", f"{action} failed inside the agent; see its log"))
        return RedirectResponse(back, 303)

    async def _kept_name(self, folder: str, shown: str, at: float) -> str:
        """The name of the version listed as `shown` (cleaned) in `folder`, kept at exactly `at`.

        :raises UserError: it is no longer kept, or two names look the same on the page.
        """
        kept = await self.backend.versions(folder)
        raw = {
            str(k.get("name", ""))
            for k in kept
            if fmt.clean(str(k.get("name", ""))) == shown and _wall(k.get("kept_at")) == at
        }
        if not raw:
            raise UserError("that version is no longer kept (removed by clean-up or for disk space); reload the page")
        if len(raw) > 1:
            raise UserError("several files look like this name here: restore it with `tofu-agent restore`")
        return raw.pop()

    # -- live -----------------------------------------------------------------------------------

    async def events(self, request: Request) -> Response:
        if self.session(request) is None:
            return Response(status_code=401)

        async def stream() -> AsyncIterator[str]:
            seen = self.changes.version
            yield "retry: 1000\n\n"
            while True:
                now = seen
                with anyio.move_on_after(KEEPALIVE):
                    now = await self.changes.wait(seen)
                if self.changes.closed:
                    return
                if now != seen:
                    seen = now
                    yield f"event: change\ndata: {seen}\n\n"
                else:
                    yield ": keepalive\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")


def create_app(
    backend: UiBackend,
    auth: Auth,
    port: int,
    changes: ChangeFeed,
    clock: Callable[[], float] = time.time,
) -> SecurityMiddleware:
    """The ASGI application for `port` (the Host allowlist depends on it)."""
    ui = Ui(backend, auth, port, changes, clock)
    routes = [
        Route("/", ui.devices),
        Route("/device/{device_id}", ui.device),
        Route("/this", ui.this),
        Route("/folders", ui.folders),
        Route("/versions", ui.versions),
        Route("/anomalies", ui.anomalies),
        Route("/log", ui.trust_log),
        Route("/qr.svg", ui.qr),
        Route("/static/{name}", ui.static_file),
        Route("/login", ui.login),
        Route("/logout", ui.logout, methods=["POST"]),
        Route("/act", ui.act, methods=["POST"]),
        Route("/events", ui.events),
    ]
    app = Starlette(routes=routes)
    hosts = frozenset(f"{h}:{port}" for h in ("127.0.0.1", "localhost", "[::1]"))
    return SecurityMiddleware(app, hosts)
