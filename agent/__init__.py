"""tofu-agent: zero-setup LAN discovery and folder sync with trust-on-first-use key pinning."""

from __future__ import annotations

__version__ = "0.1.0"
