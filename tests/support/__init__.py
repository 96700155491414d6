"""Helpers the tests share: containers with real systemd and libvirtd (container.py,
libvirt_env.py), a private dbus-daemon with the project's policy (dbus_bus.py), a qemu
stand-in on an instance's socket (qemu_stub.py), mount namespaces (mounts.py) and the
traffic programs run inside lab namespaces (netprog.py)."""
