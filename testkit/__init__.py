"""What the tests and the benches share to drive real agents: one place for each helper.

- `homes`: a short private `--home` directory, with a `config.toml` if asked.
- `agents`: `tofu-agent` as a subprocess: the CLI (`cli`), an agent on loopback (`AgentProc`),
  stopping and killing, its trust store and status as seen from outside.
- `wait`: the one poll loop (`wait_for`, `seconds_until`).
- `netns` + `lan`: a private LAN in network namespaces and agents that run in it (`LanAgent`);
  `mdns_probe.py` is the script a LAN host runs to watch or forge mDNS.
- `peer`: a scripted malicious peer (raw TCP, raw TLS, a protocol client and server).
- `engines`: sync engines over temp folders joined by an in-memory network (`Net`).

The tests and `bench/` import it from the repository root (`pythonpath = ["."]` for pytest; the
bench scripts put the root on `sys.path`); nothing here imports from `tests/`.
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
