"""passtd: unprivileged per-VM networking after passt, as a system service."""

__version__ = "0.1.0"
