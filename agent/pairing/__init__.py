"""Pairing by code (SPAKE2), safety numbers and their word list: pure, no I/O."""
