"""Emulated hosts on one machine: Linux network namespaces joined by a bridge (root only).

Used by the multi-host tests and ``benchmarks/bench_hosts.py``: each emulated
host is a network namespace with its own loopback and one interface
``eth0`` (address ``10.<net>.0.<k+1>/24``), a veth pair to a bridge that lives
in a namespace of its own (so nothing is added to the machine's own network),
and optionally a ``tc`` token-bucket (tbf) bandwidth limit on its link in both
directions. The kernel here has no netem: latency is emulated inside dasgd
(``--latency``), not here.

Commands run inside a host with :meth:`EmulatedHosts.command` (``ip netns exec``).
A host's link is cut and restored with :meth:`EmulatedHosts.set_link_up` (its
port on the bridge goes down: a real partition, TCP retransmits when it is
back; ``--partition`` emulates the same inside dasgd without root).
"""

from __future__ import annotations

import os
import shutil
import subprocess

__all__ = ["EmulatedHosts", "netns_unavailable"]


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


def netns_unavailable() -> str | None:
    """Why namespaces cannot be used here (a reason for a skip), or None if they can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` (Debian iproute2) is not installed"
    name = f"dasgd-probe-{os.getpid()}"
    try:
        _ip("netns", "add", name)
    except (subprocess.SubprocessError, OSError) as exc:
        return f"`ip netns add` failed: {getattr(exc, 'stderr', exc)}".strip()
    subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
    return None


class EmulatedHosts:
    """``n`` namespaces on a bridge; a context manager that removes everything it made.

    Parameters
    ----------
    n : int
        Hosts.
    rate : str or None
        ``tc`` rate of each host's link, e.g. ``"100mbit"`` or ``"1gbit"``,
        applied on both ends of its veth pair (upload and download); None: no limit.
    net : int
        Second octet of the ``10.<net>.0.0/24`` subnet.
    tag : str
        Short prefix of the namespace and interface names (kept under 15 bytes).

    Attributes
    ----------
    addresses : list of str
        Host k's address.
    """

    def __init__(self, n: int, *, rate: str | None = None, net: int = 77, tag: str | None = None):
        self.n = n
        self.rate = rate
        self.tag = tag or f"d{os.getpid() % 100000}"
        self.switch = f"{self.tag}sw"
        self.names = [f"{self.tag}h{k}" for k in range(n)]
        self.addresses = [f"10.{net}.0.{k + 1}" for k in range(n)]
        self._made: list[str] = []

    def __enter__(self) -> EmulatedHosts:
        try:
            self._create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _create(self) -> None:
        sw = self.switch
        _ip("netns", "add", sw)
        self._made.append(sw)
        _ip("-n", sw, "link", "add", "br0", "type", "bridge")
        _ip("-n", sw, "link", "set", "br0", "up")
        for k, (name, address) in enumerate(zip(self.names, self.addresses, strict=True)):
            _ip("netns", "add", name)
            self._made.append(name)
            _ip("-n", name, "link", "set", "lo", "up")
            port = self.port(k)
            _ip(
                "-n", name, "link", "add", "eth0", "type", "veth", "peer", "name", port, "netns", sw
            )
            _ip("-n", name, "addr", "add", f"{address}/24", "dev", "eth0")
            _ip("-n", name, "link", "set", "eth0", "up")
            _ip("-n", sw, "link", "set", port, "master", "br0")
            _ip("-n", sw, "link", "set", port, "up")
            if self.rate:
                for ns, dev in ((name, "eth0"), (sw, port)):
                    subprocess.run(
                        [
                            "ip",
                            "netns",
                            "exec",
                            ns,
                            "tc",
                            "qdisc",
                            "add",
                            "dev",
                            dev,
                            "root",
                            "tbf",
                            "rate",
                            self.rate,
                            "burst",
                            "256kb",
                            "latency",
                            "100ms",
                        ],  # fmt: skip
                        check=True,
                        capture_output=True,
                        timeout=30,
                    )

    def port(self, k: int) -> str:
        """The name of host ``k``'s port on the bridge (in the switch namespace)."""
        return f"{self.tag}p{k}"

    def set_link_up(self, k: int, up: bool) -> None:
        """Cut (``up=False``) or restore host ``k``'s link to the bridge.

        The host's port on the bridge goes down (``ip link set PORT down`` in the
        switch namespace): nothing crosses in either direction, the host's own
        interface and addresses stay as they are, and TCP connections survive
        a cut shorter than their retransmission limit (minutes).

        Raises
        ------
        subprocess.CalledProcessError
            If ``ip`` fails.
        """
        _ip("-n", self.switch, "link", "set", self.port(k), "up" if up else "down")

    def link_is_up(self, k: int) -> bool:
        """True if host ``k``'s port on the bridge is administratively up."""
        out = subprocess.run(
            ["ip", "-n", self.switch, "-o", "link", "show", self.port(k)],
            check=True,
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout
        flags = out.split("<", 1)[1].split(">", 1)[0].split(",")
        return "UP" in flags

    def command(self, k: int, argv: list[str]) -> list[str]:
        """``argv`` run inside host ``k``'s namespace."""
        return ["ip", "netns", "exec", self.names[k], *argv]

    def close(self) -> None:
        """Delete every namespace made (their interfaces go with them)."""
        for name in reversed(self._made):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
        self._made.clear()
