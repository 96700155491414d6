"""The project's own VM test guest: a Debian kernel + busybox initramfs booted under qemu TCG."""

from .vm import (
    GuestError,
    GuestTimeout,
    GuestVM,
    ensure_image,
    libvirt_domain_xml,
    parse_net_line,
    write_initramfs,
)

__all__ = [
    "GuestError",
    "GuestTimeout",
    "GuestVM",
    "ensure_image",
    "libvirt_domain_xml",
    "parse_net_line",
    "write_initramfs",
]
