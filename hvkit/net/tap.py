"""Tap devices for virtio-net, created and configured with pyroute2.

``Tap.create()`` makes a tap (pyroute2's tuntap support), attaches hvkit's
file descriptor with the virtio-net header enabled (``IFF_VNET_HDR``, 12-byte
``virtio_net_hdr_v1``), sets MTU, MAC, bridge and network namespace, and
brings it up. The tap is then made non-persistent: the kernel removes it
when the last descriptor closes, so nothing is left behind even if the VMM
dies. ``close()`` removes it explicitly as well. ``remove_stale()`` deletes
persistent taps with hvkit's prefix that an interrupted start left behind.
A name that already exists is refused: hvkit does not take over a tap it
did not create.
"""
from __future__ import annotations

import errno
import fcntl
import os
import re
import struct
from typing import Any

from hvkit.errors import ConfigError, HvkitError

TUN_DEV = "/dev/net/tun"
TUNSETIFF = 0x400454CA
TUNSETPERSIST = 0x400454CB
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFF_PERSIST = 0x0800

TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08
TUN_F_UFO = 0x10

#: sizeof(struct virtio_net_hdr_v1) (= virtio_net_hdr_mrg_rxbuf)
VNET_HDR_SIZE = 12
PREFIX = "hvtap"
NETNS_DIR = "/var/run/netns"
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")


class TapError(HvkitError, OSError):
    """The kernel refused a tap operation (the message names it)."""


def _ipr(netns: str | None):
    from pyroute2 import IPRoute, NetNS
    return NetNS(netns, flags=0) if netns else IPRoute()


def _exists(name: str, netns: str | None = None) -> bool:
    with _ipr(netns) as ipr:
        return bool(ipr.link_lookup(ifname=name))


def tun_available() -> str | None:
    """None if taps can be made here, else the reason they cannot."""
    if not os.path.exists(TUN_DEV):
        return f"{TUN_DEV} is missing"
    if os.geteuid() != 0:
        return "creating a tap needs root (CAP_NET_ADMIN)"
    try:
        os.close(os.open(TUN_DEV, os.O_RDWR))
    except OSError as exc:
        return f"cannot open {TUN_DEV}: {exc.strerror}"
    return None


class Tap:
    """A tap device and hvkit's open descriptor on it."""

    def __init__(self, name: str, fd: int, netns: str | None, vnet_hdr: bool) -> None:
        self.name = name
        self.fd = fd
        self.netns = netns
        self.vnet_hdr = vnet_hdr
        self.offload = 0

    @classmethod
    def create(cls, name: str | None = None, *, mtu: int | None = None,
               mac: str | None = None, bridge: str | None = None,
               netns: str | None = None, vnet_hdr: bool = True, up: bool = True) -> "Tap":
        """Create and configure a tap; every bad argument is a ConfigError
        before anything is created."""
        if name is not None and not _NAME.match(name):
            raise ConfigError(f"tap name {name!r}: 1-15 letters, digits, '_', '.', '-'")
        if mtu is not None and not 68 <= mtu <= 65521:
            raise ConfigError(f"tap MTU {mtu} must be 68..65521")
        if mac is not None and not re.match(r"^([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}$", mac):
            raise ConfigError(f"tap MAC {mac!r} is not aa:bb:cc:dd:ee:ff")
        why = tun_available()
        if why:
            raise ConfigError(f"cannot create a tap: {why}")
        if netns is not None and not os.path.exists(os.path.join(NETNS_DIR, netns)):
            raise ConfigError(f"network namespace {netns!r} does not exist")
        if name is None:
            name = _free_name(netns)
        elif _exists(name) or (netns and _exists(name, netns)):
            raise ConfigError(f"network interface {name!r} already exists; hvkit only "
                              f"uses taps it creates")
        if bridge is not None:
            with _ipr(netns) as ipr:
                idx = ipr.link_lookup(ifname=bridge)
                kind = _kind(ipr, idx[0]) if idx else None
            if kind != "bridge":
                raise ConfigError(f"bridge {bridge!r} does not exist"
                                  + (f" in namespace {netns!r}" if netns else "")
                                  if kind is None else f"{bridge!r} is a {kind}, not a bridge")
        from pyroute2 import IPRoute
        with IPRoute() as ipr:
            ipr.link("add", ifname=name, kind="tuntap", mode="tap",
                     ifr={"no_pi": True, "vnet_hdr": vnet_hdr})
        try:
            fd = _attach(name, vnet_hdr)
        except BaseException:
            _delete(name, None)
            raise
        tap = cls(name, fd, netns, vnet_hdr)
        try:
            tap._configure(mtu, mac, bridge, up)
        except BaseException:
            tap.close()
            raise
        return tap

    def _configure(self, mtu: int | None, mac: str | None, bridge: str | None,
                   up: bool) -> None:
        from pyroute2 import IPRoute
        if self.netns:
            with IPRoute() as ipr:
                idx = ipr.link_lookup(ifname=self.name)[0]
                ipr.link("set", index=idx, net_ns_fd=self.netns)
        with _ipr(self.netns) as ipr:
            idx = ipr.link_lookup(ifname=self.name)[0]
            attrs: dict[str, Any] = {}
            if mtu is not None:
                attrs["mtu"] = mtu
            if mac is not None:
                attrs["address"] = mac
            if bridge is not None:
                attrs["master"] = ipr.link_lookup(ifname=bridge)[0]
            if attrs:
                ipr.link("set", index=idx, **attrs)
            if up:
                ipr.link("set", index=idx, state="up")

    # -- the descriptor ---------------------------------------------------------

    def set_offload(self, flags: int) -> None:
        """TUNSETOFFLOAD: what the reader (the guest) accepts: TUN_F_* bits."""
        try:
            fcntl.ioctl(self.fd, TUNSETOFFLOAD, flags)
        except OSError as exc:
            raise TapError(exc.errno, f"TUNSETOFFLOAD {flags:#x} on {self.name}: "
                                      f"{exc.strerror}") from exc
        self.offload = flags

    def info(self) -> dict[str, Any]:
        """MTU, MAC, state, master and statistics as the kernel reports them."""
        with _ipr(self.netns) as ipr:
            idx = ipr.link_lookup(ifname=self.name)
            if not idx:
                raise TapError(errno.ENODEV, f"tap {self.name} is gone")
            link = ipr.get_links(idx[0])[0]
        stats = link.get_attr("IFLA_STATS64") or {}
        return {"index": idx[0], "mtu": link.get_attr("IFLA_MTU"),
                "mac": link.get_attr("IFLA_ADDRESS"),
                "state": link.get_attr("IFLA_OPERSTATE"),
                "master": link.get_attr("IFLA_MASTER"),
                "rx_packets": stats.get("rx_packets", 0),
                "tx_packets": stats.get("tx_packets", 0)}

    def close(self) -> None:
        """Close the descriptor; the non-persistent tap goes with it (and is
        deleted explicitly if something else still holds it)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
            try:
                if _exists(self.name, self.netns):
                    _delete(self.name, self.netns)
            except Exception:
                pass

    def __enter__(self) -> "Tap":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        where = f" in {self.netns}" if self.netns else ""
        return f"<Tap {self.name}{where} fd={self.fd}>"


def _attach(name: str, vnet_hdr: bool) -> int:
    flags = IFF_TAP | IFF_NO_PI | (IFF_VNET_HDR if vnet_hdr else 0)
    fd = os.open(TUN_DEV, os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), flags))
        # the kernel removes a non-persistent tap with its last descriptor
        fcntl.ioctl(fd, TUNSETPERSIST, 0)
        if vnet_hdr:
            fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_SIZE))
            fcntl.ioctl(fd, TUNSETOFFLOAD, 0)
    except OSError as exc:
        os.close(fd)
        raise TapError(exc.errno, f"attaching to tap {name}: {exc.strerror}") from exc
    return fd


def _delete(name: str, netns: str | None) -> None:
    with _ipr(netns) as ipr:
        idx = ipr.link_lookup(ifname=name)
        if idx:
            ipr.link("del", index=idx[0])


def _kind(ipr, index: int) -> str | None:
    link = ipr.get_links(index)[0]
    info = link.get_attr("IFLA_LINKINFO")
    return info.get_attr("IFLA_INFO_KIND") if info is not None else "device"


def _free_name(netns: str | None) -> str:
    with _ipr(None) as ipr:
        taken = {l.get_attr("IFLA_IFNAME") for l in ipr.get_links()}
    if netns:
        with _ipr(netns) as ipr:
            taken |= {l.get_attr("IFLA_IFNAME") for l in ipr.get_links()}
    for i in range(4096):
        if f"{PREFIX}{i}" not in taken:
            return f"{PREFIX}{i}"
    raise ConfigError("no free tap name")


def remove_stale(prefix: str = PREFIX) -> list[str]:
    """Delete persistent taps named ``prefix*``: hvkit's own taps are never
    persistent once started, so these are left over from an interrupted
    start. Returns the names removed."""
    removed = []
    base = "/sys/class/net"
    for name in sorted(os.listdir(base)) if os.path.isdir(base) else []:
        if not name.startswith(prefix):
            continue
        try:
            with open(os.path.join(base, name, "tun_flags")) as f:
                flags = int(f.read().strip(), 16)
        except (OSError, ValueError):
            continue
        if flags & IFF_PERSIST:
            _delete(name, None)
            removed.append(name)
    return removed
