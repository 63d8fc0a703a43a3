"""Real network faults for tests: a process in a network namespace of its own reaches each
dependency over a link of its own (a veth pair), which a test cuts and heals.

A cut link drops every packet silently, both ways, with no reset and no ICMP error: what a
partition, a dead NAT entry or a vanished host looks like. The namespace end is set down and both
ends keep permanent neighbour entries, so nothing fails fast: a connected socket's data is
retransmitted into nothing, a new connection's SYN goes unanswered. Healing sets it up again and
TCP's retransmissions get through.

Each dependency has a service address on the root namespace's loopback (10.231.250.x); inside a
namespace, a route sends it over that dependency's link. The servers listen there (Kafka through
a listener of its own, the others through Toxiproxy), so several namespaces (several processor
instances) reach the same servers, each over links that can be cut alone.

Needs root and Debian's iproute2 (`ip`); CI runs as root.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from paystream.errors import DevenvError

DEPENDENCIES = ("database", "broker", "gateway", "log", "control")
"""The links of every namespace; `control` is the test's own way in (metrics, health)."""

_PREFIX = "10.231"
SERVICE_ADDRESSES = {name: f"{_PREFIX}.250.{i + 1}" for i, name in enumerate(DEPENDENCIES[:-1])}
"""Where each dependency is served on the root namespace's loopback."""


def _ip(*args: str, namespace: str | None = None, check: bool = True) -> str:
    argv = ["ip", *(["-n", namespace] if namespace else []), *args]
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    if check and result.returncode != 0:
        raise DevenvError(f"`{' '.join(argv)}` failed: {result.stderr.strip()}")
    return result.stdout


def unavailable_reason() -> str | None:
    """Why namespaces cannot be made here, or None if they can."""
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed (apt-get install iproute2)"
    if os.geteuid() != 0:
        return "network namespaces need root (CI runs as root)"
    return None


@dataclass(frozen=True, slots=True)
class Link:
    """One veth pair: `host_if`/`host_address` in the root namespace, `ns_if`/`ns_address` in
    the test host's."""

    dependency: str
    host_if: str
    ns_if: str
    host_address: str
    ns_address: str


def add_service_addresses() -> None:
    """The service addresses on the root namespace's loopback (idempotent)."""
    for address in SERVICE_ADDRESSES.values():
        _ip("addr", "replace", f"{address}/32", "dev", "lo")


def remove_service_addresses() -> None:
    for address in SERVICE_ADDRESSES.values():
        _ip("addr", "del", f"{address}/32", "dev", "lo", check=False)


class TestHost:
    """A network namespace with one link per dependency. `index` (1-30) chooses its names and
    addresses: 10.231.(8·index + k).0/30 for its k-th link."""

    __test__ = False  # not a pytest test class, despite its name

    def __init__(self, index: int) -> None:
        if not 1 <= index <= 30:
            raise ValueError("index must be in 1..30")
        self.index = index
        self.namespace = f"paystream-test-{index}"
        self.links = {
            name: Link(
                dependency=name,
                host_if=f"pst{index}{k}h",
                ns_if=f"pst{index}{k}n",
                host_address=f"{_PREFIX}.{8 * index + k}.1",
                ns_address=f"{_PREFIX}.{8 * index + k}.2",
            )
            for k, name in enumerate(DEPENDENCIES)
        }

    @property
    def control_address(self) -> str:
        """Where a server in this namespace is reached from the root namespace."""
        return self.links["control"].ns_address

    def create(self) -> None:
        self.destroy()  # whatever a killed run left behind
        _ip("netns", "add", self.namespace)
        _ip("link", "set", "lo", "up", namespace=self.namespace)
        for link in self.links.values():
            _ip("link", "add", link.host_if, "type", "veth", "peer", "name", link.ns_if)
            _ip("link", "set", link.ns_if, "netns", self.namespace)
            _ip("addr", "add", f"{link.host_address}/30", "dev", link.host_if)
            _ip("link", "set", link.host_if, "up")
            ns = self.namespace
            _ip("addr", "add", f"{link.ns_address}/30", "dev", link.ns_if, namespace=ns)
            _ip("link", "set", link.ns_if, "up", namespace=ns)
            self._neighbours(link)
            service = SERVICE_ADDRESSES.get(link.dependency)
            if service is not None:
                _ip("route", "add", f"{service}/32", "via", link.host_address, namespace=ns)

    def destroy(self) -> None:
        for link in self.links.values():
            _ip("link", "del", link.host_if, check=False)
        _ip("netns", "del", self.namespace, check=False)

    def command(self, argv: Sequence[str]) -> list[str]:
        """`argv` run inside this namespace."""
        return ["ip", "netns", "exec", self.namespace, *argv]

    def _neighbours(self, link: Link) -> None:
        """Permanent neighbour entries at both ends: with the link cut, address resolution must
        not fail either (it would answer "no route to host" at once, which a partition does
        not)."""
        ns = self.namespace
        host_mac = Path(f"/sys/class/net/{link.host_if}/address").read_text().strip()
        shown = _ip("-o", "link", "show", link.ns_if, namespace=ns)
        ns_mac = shown.split("link/ether ")[1].split()[0]
        _ip("neigh", "replace", link.ns_address, "lladdr", ns_mac, "dev", link.host_if,
            "nud", "permanent")  # fmt: skip
        _ip("neigh", "replace", link.host_address, "lladdr", host_mac, "dev", link.ns_if,
            "nud", "permanent", namespace=ns)  # fmt: skip

    def cut(self, dependency: str) -> None:
        """Drop every packet on this dependency's link, silently, until `heal`.

        The root namespace's end goes down: the namespace's end keeps its routes (a link
        without carrier) and sends into a device that drops everything, so its sockets see
        silence, not an error."""
        _ip("link", "set", self.links[dependency].host_if, "down")

    def heal_all(self) -> None:
        """Every link up, as after `create`, whatever a failed test left cut."""
        for dependency in self.links:
            self.heal(dependency)

    def heal(self, dependency: str) -> None:
        link = self.links[dependency]
        _ip("link", "set", link.host_if, "up")
        self._neighbours(link)  # setting a device down drops even permanent entries
