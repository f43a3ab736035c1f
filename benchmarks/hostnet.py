"""Worker "hosts" for benchmarks/multihost.py: network namespaces linked to the root one.

Host ``n`` is the network namespace ``taskq-bmh-<x>``, joined to the root
namespace by the veth pair ``tqbmh0<x>`` (root side, 10.233.<n>.1/30) and
``tqbmh1<x>`` (namespace side, 10.233.<n>.2/30). Names and subnet differ from
tests/test_multihost.py's (10.232.0.0/16), so both can run at once.

Network safety: the only traffic is between the root namespace and the
namespaces made here. While they exist, a blackhole route for all of
10.233.0.0/16 in the root namespace drops any packet for the subnet that
finds no veth route, so none leaves by the default route. Namespaces, links
and the route are removed in a ``finally`` (and leftovers of a crashed run, by
their exact names, first); runs on one machine take turns on a lock file.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

SUBNET = "10.233.0.0/16"
LOCK = Path("/tmp/taskq-multihost-bench.lock")


class NetworkUnavailable(Exception):
    """This machine cannot make the namespaces (not root, no iproute2, no netns support)."""


@dataclass(frozen=True)
class Host:
    name: str  # its host name, in a UTS namespace of its own: recorded in worker ids
    netns: str
    veth_root: str
    veth_ns: str
    root_addr: str  # where its relay listens
    ns_addr: str


HOSTS = [
    Host(f"bmh-{x}", f"taskq-bmh-{x}", f"tqbmh0{x}", f"tqbmh1{x}", f"10.233.{n}.1", f"10.233.{n}.2")
    for n, x in enumerate("abc", start=1)
]


def missing_requirement() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "no `ip` command (Debian package iproute2)"
    if shutil.which("unshare") is None:
        return "no `unshare` command (Debian package util-linux)"
    return None


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def _remove(hosts: list[Host]) -> None:
    """Everything of ours, by its exact name: namespaces, links (if left behind), the route."""
    for h in hosts:
        _ip("netns", "delete", h.netns, check=False)
        _ip("link", "delete", h.veth_root, check=False)
    while _ip("route", "delete", "blackhole", SUBNET, check=False).returncode == 0:
        pass


def _build(hosts: list[Host]) -> None:
    # The safety net first: subnet traffic that finds no veth route is dropped here.
    _ip("route", "add", "blackhole", SUBNET)
    for h in hosts:
        made = _ip("netns", "add", h.netns, check=False)
        if made.returncode != 0:
            raise NetworkUnavailable(f"cannot make a network namespace: {made.stderr.strip()}")
        _ip("link", "add", h.veth_root, "type", "veth", "peer", "name", h.veth_ns, "netns", h.netns)
        _ip("addr", "add", f"{h.root_addr}/30", "dev", h.veth_root)
        _ip("link", "set", h.veth_root, "up")
        _ip("-n", h.netns, "addr", "add", f"{h.ns_addr}/30", "dev", h.veth_ns)
        _ip("-n", h.netns, "link", "set", h.veth_ns, "up")
        _ip("-n", h.netns, "link", "set", "lo", "up")


def leftovers() -> list[str]:
    """What of ours the machine still has (empty after a clean run)."""
    found = [h.netns for h in HOSTS if h.netns in _ip("netns", "list").stdout.split()]
    if "10.233." in _ip("route", "show").stdout:
        found.append(f"a route in {SUBNET}")
    links = _ip("link", "show").stdout
    found += [h.veth_root for h in HOSTS if h.veth_root in links]
    return found


@contextlib.contextmanager
def network() -> Iterator[list[Host]]:
    """The three hosts' namespaces and links, for as long as the block runs."""
    reason = missing_requirement()
    if reason:
        raise NetworkUnavailable(reason)
    LOCK.touch()
    with LOCK.open("r+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another run of this benchmark uses the same names
        _remove(HOSTS)
        try:
            _build(HOSTS)
            yield HOSTS
        finally:
            _remove(HOSTS)
            if left := leftovers():
                raise RuntimeError(f"could not remove {left}")


def in_host(host: Host | None, name: str, argv: list[str]) -> list[str]:
    """``argv`` in the host's network namespace (``None``: the root one) under host name ``name``.

    ``ip netns exec``, ``unshare`` (without ``--fork``) and ``sh`` each exec
    the next, so ``argv`` keeps the PID of the process started with this.
    """
    named = ["unshare", "--uts", "--", "sh", "-c", 'hostname "$0" && exec "$@"', name, *argv]
    return named if host is None else ["ip", "netns", "exec", host.netns, *named]
