"""A bridge in the root namespace and one network namespace per worker, joined by veth pairs.

    root namespace                         namespace bfly-w{i}
    bfly-br0 10.77.0.1/24 ── bfly-h{i} ═══ bfly-n{i} 10.77.0.(10+i)/24, lo

Everything this module creates is named ``bfly-*``, so :func:`purge` can remove the
leftovers of a run that died before it cleaned up (processes still inside the
namespaces included). Cutting a worker off is ``ip link set bfly-h{i} down``: its
process keeps running and its sockets stay open, only the packets stop.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import subprocess

__all__ = ["BRIDGE", "Network", "NetworkSetupError", "purge"]

PREFIX = "bfly-"
BRIDGE = "bfly-br0"
SUBNET = ipaddress.ip_network("10.77.0.0/24")
GATEWAY = "10.77.0.1"
#: The first worker's address is 10.77.0.10, the next .11, ...
FIRST_HOST = 10
MAX_WORKERS = 200
_IP_TIMEOUT_S = 10.0


class NetworkSetupError(RuntimeError):
    """An ``ip`` command failed or the subnet is taken: the drill cannot run here."""


def ip(*args: str, check: bool = True) -> str:
    """Run ``ip ARGS``; its stdout. Raises ``NetworkSetupError`` with ip's message on failure."""
    try:
        done = subprocess.run(
            ["ip", *args], capture_output=True, text=True, timeout=_IP_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired:
        raise NetworkSetupError(
            f"'ip {' '.join(args)}' did not finish within {_IP_TIMEOUT_S:g} s"
        ) from None
    if check and done.returncode != 0:
        raise NetworkSetupError(f"'ip {' '.join(args)}' failed: {done.stderr.strip()}")
    return done.stdout


class Network:
    """The bridge, namespaces and veth pairs for ``workers`` workers; :meth:`destroy` removes them."""

    def __init__(self, workers: int) -> None:
        if not 1 <= workers <= MAX_WORKERS:
            raise ValueError(f"workers must be between 1 and {MAX_WORKERS}, got {workers}")
        self.workers = workers

    @staticmethod
    def namespace(i: int) -> str:
        return f"{PREFIX}w{i}"

    @staticmethod
    def host_end(i: int) -> str:
        """The veth end attached to the bridge: the one a cut takes down."""
        return f"{PREFIX}h{i}"

    @staticmethod
    def namespace_end(i: int) -> str:
        return f"{PREFIX}n{i}"

    @staticmethod
    def address(i: int) -> str:
        return str(SUBNET.network_address + FIRST_HOST + i)

    def create(self) -> None:
        """Bridge up with the gateway address, then one namespace and veth pair per worker."""
        _refuse_taken_subnet()
        ip("link", "add", BRIDGE, "type", "bridge")
        ip("addr", "add", f"{GATEWAY}/{SUBNET.prefixlen}", "dev", BRIDGE)
        ip("link", "set", BRIDGE, "up")
        for i in range(self.workers):
            ns, host, inner = self.namespace(i), self.host_end(i), self.namespace_end(i)
            ip("netns", "add", ns)
            ip("link", "add", host, "type", "veth", "peer", "name", inner)
            ip("link", "set", inner, "netns", ns)
            ip("link", "set", host, "master", BRIDGE)
            ip("link", "set", host, "up")
            ip("-n", ns, "link", "set", "lo", "up")
            ip("-n", ns, "addr", "add", f"{self.address(i)}/{SUBNET.prefixlen}", "dev", inner)
            ip("-n", ns, "link", "set", inner, "up")

    def cut(self, i: int) -> None:
        """Take worker ``i``'s bridge port down: no packet reaches it or leaves it."""
        ip("link", "set", self.host_end(i), "down")

    def restore(self, i: int) -> None:
        ip("link", "set", self.host_end(i), "up")

    def destroy(self) -> list[str]:
        """Remove everything named ``bfly-*``; the problems met (it never raises)."""
        return purge()


def _refuse_taken_subnet() -> None:
    for link in json.loads(ip("-j", "addr", "show") or "[]"):
        for info in link.get("addr_info", []):
            try:
                address = ipaddress.ip_address(info.get("local", ""))
            except ValueError:
                continue
            if address in SUBNET and not link.get("ifname", "").startswith(PREFIX):
                raise NetworkSetupError(
                    f"{SUBNET} is already used on this host ({address} on {link['ifname']}); "
                    "the drill needs that subnet for itself"
                )


def purge() -> list[str]:
    """Kill the processes inside ``bfly-*`` namespaces, delete those namespaces and ``bfly-*`` links.

    Only this drill creates such names, so whatever carries them is a leftover of it.
    Returns what could not be removed.
    """
    problems: list[str] = []
    namespaces = [
        line.split()[0] for line in ip("netns", "list", check=False).splitlines() if line.strip()
    ]
    for ns in [n for n in namespaces if n.startswith(PREFIX)]:
        for pid in ip("netns", "pids", ns, check=False).split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
            except OSError as exc:
                problems.append(f"cannot kill process {pid} in {ns}: {exc}")
        try:
            ip("netns", "del", ns)
        except NetworkSetupError as exc:
            problems.append(str(exc))
    try:
        links = json.loads(ip("-j", "link", "show") or "[]")
    except (NetworkSetupError, json.JSONDecodeError) as exc:
        return [*problems, f"cannot list links: {exc}"]
    # Veth ends first (deleting one end deletes its peer), the bridge last.
    names = sorted(
        (link["ifname"] for link in links if link.get("ifname", "").startswith(PREFIX)),
        key=lambda name: name == BRIDGE,
    )
    for name in names:
        try:
            ip("link", "del", name)
        except NetworkSetupError as exc:
            # The peer of an end deleted a moment ago is already gone.
            if "Cannot find device" not in str(exc):
                problems.append(str(exc))
    return problems
