"""Hostile peers against real agent processes: attacks, faults and the checks that they held."""
