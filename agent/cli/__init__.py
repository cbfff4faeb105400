"""The `tofu-agent` command: one module per command group."""
