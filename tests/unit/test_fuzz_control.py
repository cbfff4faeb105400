"""Fuzz the control socket: the agent's request parser and the CLI's answer parser.

The server half must turn any bytes into a framed JSON answer (or a silent close) and never raise
past `_serve_one`, because anyio's listener would take the agent down with it.
"""

from __future__ import annotations

import json
import socket
import struct
import tempfile
import threading
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.app import control
from agent.errors import TofuError, UserError


class ScriptedStream(anyio.abc.ByteStream):
    """A byte stream that yields `data` in `chunk`-sized pieces, then EOF; records what is sent."""

    def __init__(self, data: bytes, chunk: int) -> None:
        self._data = data
        self._chunk = max(1, chunk)
        self.sent = bytearray()

    async def receive(self, max_bytes: int = 65536) -> bytes:
        if not self._data:
            raise anyio.EndOfStream
        n = min(max_bytes, self._chunk)
        piece, self._data = self._data[:n], self._data[n:]
        return piece

    async def send(self, item: bytes) -> None:
        self.sent += item

    async def send_eof(self) -> None:
        pass

    async def aclose(self) -> None:
        pass


async def _handler(cmd: str, args: dict[str, Any]) -> Any:
    if cmd == "boom":
        raise RuntimeError("a handler bug")
    if cmd == "refuse":
        raise UserError("no")
    return {"cmd": cmd, "n": len(args)}


def _serve(data: bytes, chunk: int) -> dict[str, Any] | None:
    """Run `_serve_one` on `data`; the decoded answer, or None if it closed without one."""
    stream = ScriptedStream(data, chunk)
    anyio.run(control._serve_one, stream, _handler)
    if not stream.sent:
        return None
    (length,) = struct.unpack(">I", stream.sent[:4])
    assert length == len(stream.sent) - 4
    answer: dict[str, Any] = json.loads(stream.sent[4:])
    assert answer["v"] == control.VERSION and isinstance(answer["ok"], bool)
    return answer


def _framed(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
requests = st.fixed_dictionaries(
    {},
    optional={
        "v": st.sampled_from([1, 2, "1", None]),
        "cmd": st.sampled_from(["ping", "status", "boom", "refuse", ""]) | json_values,
        "args": json_values,
    },
).map(lambda d: json.dumps(d).encode())


@settings(max_examples=300, deadline=None)
@given(
    body=st.one_of(st.binary(max_size=200).map(_framed), st.binary(max_size=40), requests.map(_framed)),
    chunk=st.integers(1, 64),
)
def test_any_request_gets_an_answer_or_a_close(body: bytes, chunk: int) -> None:
    answer = _serve(body, chunk)
    if answer is not None and answer["ok"]:
        assert isinstance(answer["result"], dict)


@pytest.mark.parametrize("cmd", ["ping", "boom", "refuse"])
def test_handler_failures_are_answers(cmd: str) -> None:
    answer = _serve(_framed(json.dumps({"v": 1, "cmd": cmd, "args": {}}).encode()), 7)
    assert answer is not None
    assert answer["ok"] is (cmd == "ping")


def test_oversized_request_is_refused_before_reading_it() -> None:
    answer = _serve(struct.pack(">I", control.MAX_REQUEST + 1), 4)
    assert answer is not None and not answer["ok"] and "too large" in answer["error"]


@pytest.mark.parametrize("opener", [b"[", b'{"a":'])
def test_deeply_nested_json_request_is_an_error_answer(opener: bytes) -> None:
    body = opener * (control.MAX_REQUEST // len(opener) - 1)
    answer = _serve(_framed(body), 65536)
    assert answer is not None and not answer["ok"]


# -- the client half: whatever an "agent" answers, `request` raises only our errors ----------------


def _fake_agent(path: Path, answer: bytes) -> threading.Thread:
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(1)

    def run() -> None:
        conn, _ = srv.accept()
        with conn, srv:
            conn.settimeout(2)
            try:
                conn.recv(65536)
                conn.sendall(answer)
            except OSError:
                pass

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


answers = st.one_of(
    st.binary(max_size=64),
    st.binary(max_size=64).map(_framed),
    json_values.map(lambda v: _framed(json.dumps(v).encode())),
    st.builds(
        lambda ok, r: _framed(json.dumps({"v": 1, "ok": ok, "result": r, "error": r}).encode()),
        json_values,
        json_values,
    ),
    st.just(struct.pack(">I", control.MAX_RESPONSE + 1)),
)


@settings(max_examples=60, deadline=None)
@given(answer=answers)
def test_client_survives_any_answer(answer: bytes) -> None:
    with tempfile.TemporaryDirectory(prefix="ta-", dir="/tmp") as d:
        path = Path(d) / "c.sock"
        thread = _fake_agent(path, answer)
        try:
            control.request(path, "status", timeout=2.0)
        except TofuError:
            pass
        thread.join(3)
