"""pisnoop: shared parts of the appliance (config, store, virtual appliance, CLI)."""

__version__ = "0.1.0"
