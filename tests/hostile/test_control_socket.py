"""The control socket is local (0600) but its parser must not take the agent down either."""

from __future__ import annotations

import shutil
import socket
import struct

from agent.app import control
from agent.host.paths import resolve_paths
from testkit.agents import AgentProc
from testkit.homes import configure, new_home
from testkit.wait import wait_for


def test_nested_json_on_the_control_socket_does_not_kill_the_agent() -> None:
    home = configure(new_home("ta-c-"))
    agent = AgentProc(home, "ctl").start()
    try:
        path = resolve_paths(home).control_socket
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(str(path))
            body = b"[" * 60000
            s.sendall(struct.pack(">I", len(body)) + body)
            try:
                s.recv(4096)
            except OSError:
                pass
        wait_for(lambda: control.agent_running(path) or (agent.proc is not None and agent.proc.poll() is not None), 5)
        assert agent.proc is not None and agent.proc.poll() is None, "the agent died"
        assert control.request(path, "ping") == "pong"
    finally:
        agent.kill()
        shutil.rmtree(home, ignore_errors=True)
