"""A host bridge for guest taps, created with pyroute2 and removed after.

``Bridge.create()`` makes a Linux bridge, optionally gives it an address
(the guests' gateway) and brings it up; taps join it with
``Tap.create(bridge=...)``. A bridge outlives the process that made it, so
hvkit marks each one with its owner in the interface alias
(``hvkit pid=N``); ``remove_stale()`` deletes marked bridges whose owner is
gone, so a crashed VMM leaves nothing behind for long.
"""
from __future__ import annotations

import ipaddress
import os
import re

from hvkit.errors import ConfigError
from hvkit.net.tap import NETNS_DIR, _ipr, tun_available

PREFIX = "hvbr"
ALIAS = "hvkit pid="
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")


class Bridge:
    """A bridge hvkit created."""

    def __init__(self, name: str, index: int, netns: str | None) -> None:
        self.name = name
        self.index = index
        self.netns = netns
        self.closed = False

    @classmethod
    def create(cls, name: str | None = None, *, address: str | None = None,
               netns: str | None = None) -> "Bridge":
        """``address`` is an interface address with prefix, "10.0.0.1/24"."""
        if name is not None and not _NAME.match(name):
            raise ConfigError(f"bridge name {name!r}: 1-15 letters, digits, '_', '.', '-'")
        iface = None
        if address is not None:
            try:
                iface = ipaddress.ip_interface(address)
            except ValueError as exc:
                raise ConfigError(f"bridge address {address!r}: {exc}") from None
        why = tun_available()
        if why:
            raise ConfigError(f"cannot create a bridge: {why}")
        if netns is not None and not os.path.exists(os.path.join(NETNS_DIR, netns)):
            raise ConfigError(f"network namespace {netns!r} does not exist")
        with _ipr(netns) as ipr:
            taken = {link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
            if name is None:
                name = next(f"{PREFIX}{i}" for i in range(4096) if f"{PREFIX}{i}" not in taken)
            elif name in taken:
                raise ConfigError(f"network interface {name!r} already exists; hvkit only "
                                  f"uses bridges it creates")
            ipr.link("add", ifname=name, kind="bridge")
            index = ipr.link_lookup(ifname=name)[0]
            try:
                ipr.link("set", index=index, ifalias=f"{ALIAS}{os.getpid()}")
                if iface is not None:
                    ipr.addr("add", index=index, address=str(iface.ip),
                             prefixlen=iface.network.prefixlen)
                ipr.link("set", index=index, state="up")
            except BaseException:
                ipr.link("del", index=index)
                raise
        return cls(name, index, netns)

    def ports(self) -> list[str]:
        """Names of the interfaces attached to the bridge."""
        with _ipr(self.netns) as ipr:
            return [link.get_attr("IFLA_IFNAME") for link in ipr.get_links()
                    if link.get_attr("IFLA_MASTER") == self.index]

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        with _ipr(self.netns) as ipr:
            if ipr.link_lookup(ifname=self.name):
                ipr.link("del", index=self.index)

    def __enter__(self) -> "Bridge":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Bridge {self.name}>"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(netns: str | None = None) -> list[str]:
    """Delete bridges hvkit made whose owning process is gone."""
    removed = []
    with _ipr(netns) as ipr:
        for link in ipr.get_links():
            alias = link.get_attr("IFLA_IFALIAS") or ""
            if not alias.startswith(ALIAS):
                continue
            try:
                pid = int(alias[len(ALIAS):])
            except ValueError:
                continue
            if not _alive(pid):
                ipr.link("del", index=link["index"])
                removed.append(link.get_attr("IFLA_IFNAME"))
    return removed
