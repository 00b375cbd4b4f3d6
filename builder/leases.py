"""Exclusion across the nodes of a Ray cluster: one lease per artifact folder, whichever submitter asks.

The flock a local build takes (`builder.pipeline`) holds on one host only. `ArtifactLeases` is a detached named
actor on the head node; a build task takes its artifact's lease before building and renews it every RENEW_SECONDS
from a thread. A lease lapses when its holder has not renewed it for LEASE_SECONDS (a killed worker) or when the
holder's node is no longer alive, so a dead build never keeps the lock. The holder is the Ray task's id, which
its retries keep: a retry takes over the lease of its dead attempt at once, and the submitter, once the task is
final, finds which node a dead task held its lease on (`builder.cluster` removes what it left there).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import ray

from builder.console import say

LEASES_ACTOR = "builder-artifact-leases-v2"
NAMESPACE = "builder"
LEASE_SECONDS = 20.0
"""A lease not renewed for this long is free: its holder was killed (renewals come every RENEW_SECONDS)."""
RENEW_SECONDS = 2.0


def node_id() -> str:
    """This process's Ray node."""
    return ray.get_runtime_context().get_node_id()


def task_id() -> str:
    """The Ray task this process runs (its retries keep the id): the holder of the leases it takes."""
    task = ray.get_runtime_context().get_task_id()
    assert task is not None, "called outside a Ray task"
    return task


def alive_nodes() -> list[dict]:
    """`ray.nodes()` entries of the nodes that are alive."""
    return [node for node in ray.nodes() if node["Alive"]]


@dataclass
class _Lease:
    holder: str
    node: str
    expires: float


class ArtifactLeases:
    """One lease per artifact folder for the whole cluster (a detached actor on the head node, shared by every
    submitter). A lease lapses when its holder stops renewing it or its node is no longer alive."""

    def __init__(self, seconds: float = LEASE_SECONDS) -> None:
        self._seconds = seconds
        self._leases: dict[str, _Lease] = {}

    def acquire(self, key: str, holder: str, node: str) -> str | None:
        """Take the lease; None when taken, else the node id of its live holder."""
        lease = self._leases.get(key)
        if lease is not None and lease.holder != holder and not self._lapsed(lease):
            return lease.node
        self._leases[key] = _Lease(holder, node, time.monotonic() + self._seconds)
        return None

    def renew(self, key: str, holder: str) -> bool:
        """Extend the holder's lease; False when it lapsed and another took it."""
        lease = self._leases.get(key)
        if lease is None or lease.holder != holder:
            return False
        lease.expires = time.monotonic() + self._seconds
        return True

    def holder_node(self, key: str, holder: str) -> str | None:
        """The node of `holder`'s lease of `key`, lapsed or not; None once released or taken by another."""
        lease = self._leases.get(key)
        return lease.node if lease is not None and lease.holder == holder else None

    def release(self, key: str, holder: str) -> None:
        if (lease := self._leases.get(key)) is not None and lease.holder == holder:
            del self._leases[key]

    def held(self) -> dict[str, str]:
        """Artifact folder -> node id of its holder, for the leases that have not lapsed."""
        return {key: lease.node for key, lease in self._leases.items() if not self._lapsed(lease)}

    def _lapsed(self, lease: _Lease) -> bool:
        return time.monotonic() > lease.expires or lease.node not in {node["NodeID"] for node in alive_nodes()}


def leases_actor():
    """The cluster's `ArtifactLeases` actor, created on the head node by its first user."""
    return (
        ray.remote(ArtifactLeases)
        .options(
            name=LEASES_ACTOR,
            namespace=NAMESPACE,
            lifetime="detached",
            get_if_exists=True,
            num_cpus=0,
            resources={"node:__internal_head__": 0.001},
        )
        .remote()
    )


@contextmanager
def leased(key: str, name: str, holder: str) -> Iterator[None]:
    """Hold the cluster lease of `key` for the block as `holder`, waiting (and saying so once) while another live
    holder has it. A holder that had it before (a retry of a task whose worker died) takes it back at once."""
    leases = leases_actor()
    node = node_id()
    said = False
    while (other := ray.get(leases.acquire.remote(key, holder, node))) is not None:
        if not said:
            say(f"{name}: waiting for another build of it on the cluster (node {other[:8]})")
            said = True
        time.sleep(1)
    stop = threading.Event()
    renewer = threading.Thread(target=_renew, args=(leases, key, holder, name, stop), daemon=True)
    renewer.start()
    try:
        yield
    finally:
        stop.set()
        renewer.join()
        ray.get(leases.release.remote(key, holder))


def _renew(leases, key: str, holder: str, name: str, stop: threading.Event) -> None:
    while not stop.wait(RENEW_SECONDS):
        if not ray.get(leases.renew.remote(key, holder)):
            say(f"{name}: warning: this build's cluster lease lapsed (a stall past {LEASE_SECONDS:.0f} s)")
            return
