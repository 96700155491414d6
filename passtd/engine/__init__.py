"""The L2 <-> L4 translator: qemu's frames in, host sockets out (see docs/ARCHITECTURE.md)."""
