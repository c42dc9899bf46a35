"""hivemindd: a per-host daemon for collaborative training with hivemind."""

__version__ = "0.1.0"
