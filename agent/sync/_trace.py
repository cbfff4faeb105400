# TEMPORARY profiling helper: remove before finishing
import os, time

_F = open(f"/root/tofu-prof/trace-{os.getpid()}.log", "a", buffering=1) if os.environ.get("TOFU_TRACE") else None


def tr(*a: object) -> None:
    if _F is not None:
        _F.write(f"{time.time():.4f} " + " ".join(map(str, a)) + "\n")
