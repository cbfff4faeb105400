"""The CPython 3.11 accept race at shutdown (found by the soak) is logged at debug, not as a traceback;
every other loop exception still reaches the default handler."""

from __future__ import annotations

import asyncio
from typing import Any

from agent.app.daemon import _quiet_accept_race


class Loop:
    def __init__(self) -> None:
        self.reported: list[dict[str, Any]] = []

    def default_exception_handler(self, context: dict[str, Any]) -> None:
        self.reported.append(context)


class Handle:
    def __repr__(self) -> str:
        return "<Handle BaseSelectorEventLoop._sock_accept(<Future cancelled>, <socket.socket fd=7>)>"


def test_the_accept_race_is_quiet_and_other_errors_are_not() -> None:
    loop = Loop()
    race = {
        "message": "Exception in callback",
        "exception": asyncio.InvalidStateError("invalid state"),
        "handle": Handle(),
    }
    _quiet_accept_race(loop, race)  # type: ignore[arg-type]
    assert loop.reported == []
    other = {"message": "Exception in callback", "exception": RuntimeError("boom"), "handle": Handle()}
    _quiet_accept_race(loop, other)  # type: ignore[arg-type]
    elsewhere = {"message": "x", "exception": asyncio.InvalidStateError("invalid state"), "handle": "<Handle other()>"}
    _quiet_accept_race(loop, elsewhere)  # type: ignore[arg-type]
    assert loop.reported == [other, elsewhere]
