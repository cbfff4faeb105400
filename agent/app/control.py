"""The control socket: a small, versioned, bounded request/response protocol on a Unix socket.

One request per connection: a 4-byte big-endian length, then a UTF-8 JSON object
`{"v": 1, "cmd": str, "args": object}`; the answer has the same framing and is
`{"v": 1, "ok": true, "result": ...}` or `{"v": 1, "ok": false, "error": str}`. Requests are at
most 64 KiB, answers at most 4 MiB. The socket is mode 0600 inside a 0700 directory, so only
this user can talk to the agent.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.errors import TofuError, UserError

if TYPE_CHECKING:
    import anyio.abc

log = logging.getLogger(__name__)

VERSION = 1
MAX_REQUEST = 64 * 1024
MAX_RESPONSE = 4 * 1024 * 1024
SERVER_READ_TIMEOUT = 5.0

Handler = Callable[[str, dict[str, Any]], Awaitable[Any]]


class AgentNotRunning(TofuError):
    """No agent answers on the control socket."""


class ControlError(TofuError):
    """The agent answered with an error, or the answer was not understood."""


def _frame(obj: object) -> bytes:
    body = json.dumps(obj, separators=(",", ":")).encode("utf-8")
    return struct.pack(">I", len(body)) + body


# -- client (blocking; used by the CLI) --------------------------------------------------------


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < n:
        chunk = sock.recv(min(65536, n - len(chunks)))
        if not chunk:
            raise ControlError("the agent closed the control connection early")
        chunks += chunk
    return bytes(chunks)


def request(path: Path, cmd: str, args: dict[str, Any] | None = None, timeout: float = 5.0) -> Any:
    """Send one command to the running agent and return its result.

    :raises AgentNotRunning: nothing listens on the socket.
    :raises UserError: the agent refused the request (message for the user).
    :raises ControlError: the answer was malformed or late.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(os.fspath(path))
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise AgentNotRunning(f"no agent is running (nothing listens on {path})") from exc
        sock.sendall(_frame({"v": VERSION, "cmd": cmd, "args": args or {}}))
        (length,) = struct.unpack(">I", _recv_exact(sock, 4))
        if length > MAX_RESPONSE:
            raise ControlError(f"control answer too large ({length} bytes)")
        answer = json.loads(_recv_exact(sock, length))
    except TimeoutError as exc:
        raise ControlError(f"the agent did not answer within {timeout:g} s") from exc
    except OSError as exc:
        raise ControlError(f"control socket failed: {exc}") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ControlError("the agent's answer is not JSON") from exc
    finally:
        sock.close()
    if not isinstance(answer, dict) or answer.get("v") != VERSION:
        raise ControlError("the agent speaks another control protocol version")
    if not answer.get("ok"):
        raise UserError(str(answer.get("error", "the agent refused the request")))
    return answer.get("result")


# -- server (async; run by the daemon) -----------------------------------------------------------


# The server half imports anyio inside its functions: the CLI's client half stays quick to start.


async def _read_request(stream: anyio.abc.ByteStream) -> tuple[str, dict[str, Any]]:
    import anyio

    buf = bytearray()
    with anyio.fail_after(SERVER_READ_TIMEOUT):
        while len(buf) < 4:
            buf += await stream.receive(4 - len(buf))
        (length,) = struct.unpack(">I", buf[:4])
        if length > MAX_REQUEST:
            raise ControlError(f"request too large ({length} bytes)")
        body = bytearray()
        while len(body) < length:
            body += await stream.receive(length - len(body))
    try:
        req = json.loads(body)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, deep nesting
        raise ControlError("request is not JSON") from exc
    if not isinstance(req, dict) or req.get("v") != VERSION:
        raise ControlError(f"unsupported control protocol version (this agent speaks v{VERSION})")
    cmd, args = req.get("cmd"), req.get("args", {})
    if not isinstance(cmd, str) or not isinstance(args, dict):
        raise ControlError("request needs a `cmd` string and an `args` object")
    return cmd, args


async def _serve_one(stream: anyio.abc.ByteStream, handler: Handler) -> None:
    import anyio

    async with stream:
        try:
            cmd, args = await _read_request(stream)
        except Exception as exc:
            # Whatever a local client sends must not take the agent down.
            log.debug("bad control request: %s", exc)
            with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                await stream.send(_frame({"v": VERSION, "ok": False, "error": str(exc)}))
            return
        try:
            answer: dict[str, Any] = {"v": VERSION, "ok": True, "result": await handler(cmd, args)}
        except UserError as exc:
            answer = {"v": VERSION, "ok": False, "error": str(exc)}
        except Exception:
            # One bad command must never take the agent down; the CLI gets a plain message.
            log.exception("control command %r failed", cmd)
            answer = {"v": VERSION, "ok": False, "error": f"internal error while running {cmd!r}"}
        with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            await stream.send(_frame(answer))


async def serve(path: Path, handler: Handler, *, task_status: anyio.abc.TaskStatus[None]) -> None:
    """Listen on `path` (mode 0600) and answer requests with `handler` until cancelled."""
    import anyio

    _remove_stale(path)
    old = os.umask(0o177)
    try:
        listener = await anyio.create_unix_listener(path)
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    try:
        async with listener:
            task_status.started()
            await listener.serve(lambda s: _serve_one(s, handler))
    finally:
        _remove_stale(path)


def _remove_stale(path: Path) -> None:
    # A socket left by a crashed agent; `run` has checked that no live agent answers on it.
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def notify_trust_changed(path: Path, device_id: str) -> None:
    """Tell a running agent that a device's trust changed, so it drops or re-admits it now.

    Nothing happens if no agent runs; a failure is a warning, since the store already holds the change.
    """
    try:
        request(path, "trust_changed", {"device_id": device_id}, timeout=2.0)
    except AgentNotRunning:
        pass
    except TofuError as exc:
        log.warning("the running agent did not take the change yet: %s", exc)


def agent_running(path: Path) -> bool:
    """True if an agent answers `ping` on the control socket."""
    try:
        request(path, "ping", timeout=2.0)
    except (AgentNotRunning, ControlError):
        return False
    return True
