"""Node failures (``--on-node-failure continue``): the launcher's pure decisions.

The process launcher (:mod:`dasgd.runtime.launch`) and the simulator
(:mod:`dasgd.sim`) both handle a dead DASGD node the same way, with these
functions:

- :func:`repair_links` -- the overlay without the dead node, its neighbours
  chained so that the survivors stay connected (``topology-changes.jsonl``);
- :func:`derive_fin` -- the dead node's ``fin`` from what every survivor holds
  of its deltas (:meth:`~dasgd.core.protocol.NodeProtocol.held`), which the
  survivors' drain then waits for
  (:meth:`~dasgd.core.protocol.NodeProtocol.failed_fin`).

No clock, socket or file here.
"""

from __future__ import annotations

__all__ = ["CHILD_POLL_S", "derive_fin", "lost_deltas", "repair_links"]

#: The launcher checks its children at least this often (seconds): the bound on
#: noticing a dead node process, before the ``failed`` message reaches the others.
#: The simulator notices a killed node at the next multiple of it.
CHILD_POLL_S = 0.2


def repair_links(adjacency: dict[int, set[int]], dead: int) -> list[list[int]]:
    """Remove ``dead`` from ``adjacency`` (changed in place) and link up its neighbours.

    The live neighbours of the dead node, in id order, are chained: each is
    linked to the next where no edge exists yet. Every path that went
    through the dead node then goes along the chain, so a connected graph
    stays connected; a ring stays a ring (its two neighbours are linked).

    Parameters
    ----------
    adjacency : dict of int to set of int
        The current overlay, node -> neighbours (undirected); updated.
    dead : int

    Returns
    -------
    list of [int, int]
        The new edges ``[u, v]`` with ``u < v``.
    """
    around = sorted(adjacency.pop(dead, set()))
    for u in around:
        adjacency[u].discard(dead)
    new = []
    for u, v in zip(around, around[1:], strict=False):
        if v not in adjacency[u]:
            adjacency[u].add(v)
            adjacency[v].add(u)
            new.append([u, v])
    return new


def derive_fin(reports: list[dict], send_every: int) -> tuple[int, int]:
    """The ``fin`` of a dead node from what the survivors hold of it (``held`` reports).

    Its own ``fin``, if any survivor received it. Otherwise the longest
    prefix of its deltas that a survivor holds: the dead node sent its
    deltas in order over each link, so every delta below the longest prefix
    reached some survivor. Its steps: that survivor's count of them when it
    holds no delta beyond the prefix, else ``send_every`` per delta (every
    window but a ``fin``'s last one is full).

    Returns
    -------
    deltas, steps : int
    """
    for r in reports:
        if r.get("fin_deltas") is not None:
            return int(r["fin_deltas"]), int(r["fin_steps"])
    if not reports:
        return 0, 0
    best = max(reports, key=lambda r: (r["contiguous"], r["deltas"] == r["contiguous"]))
    deltas = int(best["contiguous"])
    steps = int(best["steps"]) if best["deltas"] == deltas else deltas * send_every
    return deltas, steps


def lost_deltas(reports: list[dict]) -> tuple[int, list[int]]:
    """Gaps in what the survivors hold of a dead node's deltas (after a second failure).

    A dead node sends its deltas in order on each link, so what the
    survivors hold of it is a prefix, unless a node that alone held some
    of them died too: then a survivor may hold a delta (relayed on another
    path) beyond one that none holds. Each delta is an independent update, so
    the survivors can agree on everything any of them holds and count the
    gaps as lost (:meth:`~dasgd.core.protocol.NodeProtocol.failed_fin`).

    Parameters
    ----------
    reports : list of dict
        ``held`` reports with ``contiguous`` and ``above`` (sequence numbers
        held beyond the contiguous ones).

    Returns
    -------
    end : int
        One more than the highest sequence number any survivor holds (0: none).
    lost : list of int
        The sequence numbers below ``end`` that no survivor holds, sorted.
    """
    held: set[int] = set()
    prefix = 0
    for r in reports:
        prefix = max(prefix, int(r["contiguous"]))
        held.update(int(q) for q in r.get("above") or ())
    end = max(prefix, max(held) + 1 if held else 0)
    return end, sorted(q for q in held_gaps(prefix, end, held))


def held_gaps(prefix: int, end: int, held: set[int]):
    """Sequence numbers in ``prefix .. end - 1`` not in ``held``."""
    return (q for q in range(prefix, end) if q not in held)
