"""The running agent: its task group, the control socket and the trust report."""
