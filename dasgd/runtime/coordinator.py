"""What a run does about dead node processes: one decision maker, carried out by the launchers.

:class:`FailureCoordinator` holds the run-wide view under ``--on-node-failure
continue`` or ``restart``: the overlay and its repairs, which nodes are dead,
restarting or gone, what the survivors hold of each dead node (``held``
reports), the dead nodes' derived ``fin`` and the restarts. It does no I/O
except writing ``failures.json``, ``restarts.json`` and
``topology-changes.jsonl`` in its run directory. Its methods take what a
launcher saw (a node process died, a survivor reported, a restarted process is
ready, a node left normally, a host went silent) and return **actions**, dicts
with a ``do`` key that every launcher carries out for the nodes it runs:

===========  =======================================================================
``do``       meaning
===========  =======================================================================
``notify``   send control ``message`` to each node of ``to`` that this host runs
``spawn``    start node ``node``'s process again (its host only)
``send``     send control ``message`` to node ``node`` (its host only)
``kill``     kill node ``node``'s process (its host only), ``why`` for its record
``settled``  dead node ``node``'s fate is decided (no restart comes): its host
             stops waiting for it
===========  =======================================================================

On one machine the launcher calls it directly; over several hosts it lives in
host 0's rendezvous thread (:mod:`dasgd.runtime.rendezvous`), every launcher
sends it what it sees, and it broadcasts the actions to every host.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..core.failures import derive_fin, lost_deltas, repair_links

__all__ = ["FailureCoordinator"]


class FailureCoordinator:
    """The run-wide failure bookkeeping and decisions (see the module docstring).

    Parameters
    ----------
    config : dasgd.config.RunConfig
    run_dir : path-like
        Where ``failures.json``, ``restarts.json`` and ``topology-changes.jsonl`` go.
    adjacency : dict of int to set of int or None
        The DASGD topology (node -> neighbours); None for the parameter-server baselines.
    t0_unix_s : float
        The run clock's origin (wall clock).
    addresses : dict of int to str
        Every node's inbox address.
    host_of : callable, optional
        ``host_of(node) -> host rank`` (several hosts); default: all on host 0.
    planned_steps : dict of int to int, optional
        Each node's planned local steps (for the records of a lost host's nodes).

    Attributes
    ----------
    failures : dict of int to dict
        Nodes dead now (``failures.json``), by id.
    restarts : list of dict
        One record per restart (``restarts.json``).
    """

    def __init__(
        self,
        config,
        run_dir,
        adjacency,
        t0_unix_s: float,
        addresses,
        host_of=None,
        planned_steps=None,
    ) -> None:
        self.config = config
        self.run_dir = Path(run_dir)
        self.n = config.n_nodes
        self.dasgd = config.algorithm == "dasgd"
        self.overlay = {k: set(v) for k, v in (adjacency or {}).items()}
        self.original = {k: set(v) for k, v in self.overlay.items()}
        self.t0_unix_s = t0_unix_s
        self.addresses = {int(k): v for k, v in addresses.items()}
        self.host_of = host_of or (lambda node: 0)
        self.planned_steps = planned_steps or {}
        self.failures: dict[int, dict] = {}
        self.restarts: list[dict] = []
        self.joining: dict[int, dict] = {}  # restarted node -> what its `start` needs
        self.ready_early: dict[int, str] = {}  # a rejoined host's node, ready before its turn
        self.awaiting: dict[int, dict] = {}  # dead node -> reports, who was asked, deadline
        self.waiting_host: dict[int, float] = {}  # dead node -> deadline for its host to return
        self.lost_hosts: set[int] = set()
        self.expect_ready: set[int] = set()  # dead nodes a rejoined host is starting again
        self.exited: set[int] = set()

    # -- views ---------------------------------------------------------------------
    def alive(self) -> list[int]:
        """Nodes (and a ps-async server) running now, with a control identity."""
        ids = range(self.n + (not self.dasgd))
        return [
            j
            for j in ids
            if j not in self.failures and j not in self.joining and j not in self.exited
        ]

    def _t_s(self) -> float:
        return round(time.time() - self.t0_unix_s, 3)

    def _write(self, name: str, content) -> None:
        (self.run_dir / name).write_text(json.dumps(content, indent=2) + "\n")

    def _write_failures(self) -> None:
        self._write("failures.json", sorted(self.failures.values(), key=lambda f: f["node"]))

    def _change(self, change: dict) -> None:
        with (self.run_dir / "topology-changes.jsonl").open("a") as f:
            f.write(json.dumps(change) + "\n")

    # -- events ----------------------------------------------------------------------
    def handle(self, event: dict) -> list[dict]:
        """Dispatch a launcher's event (``event``: ``node_down``, ``held``, ``exited``, ``ready``).

        Raises
        ------
        ValueError, KeyError, TypeError
            For a malformed event (the rendezvous counts and drops it).
        """
        kind = event.get("event")
        if kind == "held":
            self.held(event["report"])
            return []
        node = event.get("node")
        if type(node) is not int or not 0 <= node < self.n + (not self.dasgd):
            raise ValueError(f"event {kind!r} for node {node!r}: not a node of the run")
        if kind == "node_down":
            record = event["record"]
            if not isinstance(record, dict) or type(record.get("last_step", 0)) is not int:
                raise TypeError("record is not a failure record")
            return self.node_down(node, record)
        if kind == "exited":
            return self.node_exited(node)
        if kind == "ready":
            if not isinstance(event.get("address"), str):
                raise TypeError("ready without an address")
            return self.node_ready(node, event["address"])
        raise ValueError(f"unknown event {kind!r}")

    def node_down(self, node: int, record: dict) -> list[dict]:
        """Node ``node``'s process died (``record``: its ``failures.json`` entry)."""
        if node in self.failures:  # already dead (its host was lost, or a repeated report)
            settled = node not in self.awaiting and node not in self.waiting_host
            return [{"do": "settled", "node": node}] if settled else []
        self.exited.discard(node)
        joining = self.joining.pop(node, None)
        self.ready_early.pop(node, None)
        self.expect_ready.discard(node)
        record = dict(record)
        record.setdefault("detected_t_s", self._t_s())
        self.failures[node] = record
        if joining is not None:
            # a restarted process that died before it was linked back sent nothing: the
            # survivors hold what they held at its restart (they never took it back)
            return self._decide(node, [], joining["deltas"], joining["steps"], [])
        links = repair_links(self.overlay, node) if self.overlay else []
        if self.dasgd:
            self._change(
                {"t_s": record["detected_t_s"], "removed_node": node, "added_edges": links}
            )
            record["added_edges"] = links
            self.awaiting[node] = {
                "reports": {},
                "deadline": time.monotonic() + self.config.transport.send_timeout_s,
            }
        asked = [j for j in self.alive() if j != node]
        if node in self.awaiting:
            self.awaiting[node]["asked"] = set(asked)
        self._write_failures()
        message = {
            "kind": "failed",
            "node": node,
            "t_s": record["detected_t_s"],
            "links": links,
            "addresses": {str(u): self.addresses[u] for e in links for u in e},
        }
        return [{"do": "notify", "to": asked, "message": message}]

    def host_lost(self, host: int, nodes, why: str) -> list[dict]:
        """A host went silent: each of its live ``nodes`` is dead (``exit_code`` None)."""
        self.lost_hosts.add(host)
        actions = []
        for node in nodes:  # (one that had exited: its final model is lost with the host too)
            if node in self.failures:
                continue
            planned = self.planned_steps.get(node, 0)
            record = {
                "node": node,
                "exit_code": None,
                "host_lost": host,
                "last_step": 0,  # its logs are on the lost host
                "last_record_t_s": None,
                "planned_steps": planned,
                "steps_lost": planned,
                "last_words": why,
            }
            actions += self.node_down(node, record)
        return actions

    def can_return(self, host: int) -> bool:
        """Whether a launcher may join again as lost ``host``: a node of it awaits its restart."""
        return host in self.lost_hosts and bool(self.restartable_on(host))

    def restartable_on(self, host: int) -> list[int]:
        """The nodes of lost ``host`` that await a restart (a launcher joining again starts these)."""
        return sorted(
            k
            for k in self.failures
            if self.host_of(k) == host and (k in self.awaiting or k in self.waiting_host)
        )

    def host_back(self, host: int) -> list[int]:
        """A launcher joined again as lost host ``host``; returns the nodes it is to start."""
        self.lost_hosts.discard(host)
        nodes = self.restartable_on(host)
        self.expect_ready |= set(nodes)
        return nodes

    def held(self, report: dict) -> None:
        """A survivor's ``held`` report on a dead node."""
        if not isinstance(report, dict):
            raise TypeError("held report is not a map")
        entry = self.awaiting.get(report.get("failed"))
        if entry is None:
            return
        fields = ("node", "contiguous", "deltas", "steps")
        if not all(type(report.get(k)) is int and report[k] >= 0 for k in fields):
            raise ValueError(f"held report without {', '.join(fields)} as counts")
        above = report.get("above") or []
        if not isinstance(above, list) or not all(type(q) is int and q >= 0 for q in above):
            raise ValueError("held report's above is not a list of sequence numbers")
        for key in ("fin_deltas", "fin_steps"):
            if report.get(key) is not None and type(report[key]) is not int:
                raise ValueError(f"held report's {key} is not a count")
        entry["reports"][report["node"]] = report

    def node_exited(self, node: int) -> list[dict]:
        """Node ``node``'s process exited normally (done)."""
        if node in self.exited:
            return []
        self.exited.add(node)
        if not ((self.failures or self.restarts) and self.dasgd):
            return []
        # after a repair it may leave before a new neighbour heard its `complete`
        message = {"kind": "finished", "node": node}
        return [{"do": "notify", "to": self.alive(), "message": message}]

    def node_ready(self, node: int, address: str) -> list[dict]:
        """A restarted process of ``node`` bound its inbox at ``address``."""
        self.addresses[node] = address
        self.expect_ready.discard(node)
        if node not in self.joining:  # a rejoined host's node, before its restart was decided
            self.ready_early[node] = address
            return []
        return self._rejoin(node)

    def tick(self) -> list[dict]:
        """Deadlines: settle dead nodes' fins (or restart them), give up on late restarts."""
        actions = []
        now = time.monotonic()
        for dead in list(self.awaiting):
            entry = self.awaiting[dead]
            alive = set(self.alive()) & entry["asked"]
            if not alive <= set(entry["reports"]) and now < entry["deadline"]:
                continue
            del self.awaiting[dead]
            reports = list(entry["reports"].values())
            deltas, steps = derive_fin(reports, self.config.train.send_every)
            end, lost = lost_deltas(reports)
            if lost and not any(r.get("fin_deltas") is not None for r in reports):
                # a second death took deltas no survivor holds: agree on all the others
                deltas, steps = end, end * self.config.train.send_every
            else:
                lost = []
            actions += self._decide(dead, reports, deltas, steps, lost)
        for dead, deadline in list(self.waiting_host.items()):
            if self.host_of(dead) not in self.lost_hosts:
                del self.waiting_host[dead]
                record = self.failures[dead]
                reports = record.pop("reports_for_restart", [])
                actions += self._restart(dead, reports, record["fin"]["deltas"])
            elif now > deadline:  # its host did not come back: as continue
                del self.waiting_host[dead]
                self.failures[dead].pop("reports_for_restart", None)
                actions += self._fin_of(dead)
        for node, entry in list(self.joining.items()):
            if now > entry["deadline"] and not entry.get("killed"):
                entry["killed"] = True
                why = (
                    f"not ready within {self.config.transport.ready_timeout_s:.0f} s of its restart"
                )
                actions.append({"do": "kill", "node": node, "why": why})
        return actions

    # -- decisions ---------------------------------------------------------------------
    def _decide(self, dead: int, reports, deltas: int, steps: int, lost) -> list[dict]:
        """What the survivors hold of ``dead`` is known: restart it, or send its ``fin``."""
        self.failures[dead]["fin"] = {
            "deltas": deltas,
            "steps": steps,
            "reports": len(reports),
            **({"lost": lost} if lost else {}),
        }
        if not lost and self._restartable(dead, reports):
            if self.host_of(dead) in self.lost_hosts:
                self.waiting_host[dead] = time.monotonic() + self.config.transport.ready_timeout_s
                self.failures[dead]["reports_for_restart"] = reports
                return []
            return self._restart(dead, reports, deltas)
        return self._fin_of(dead)

    def _fin_of(self, dead: int) -> list[dict]:
        fin = self.failures[dead]["fin"]
        self._write_failures()
        message = {
            "kind": "fin_of",
            "node": dead,
            "deltas": fin["deltas"],
            "steps": fin["steps"],
            "lost": fin.get("lost", []),
        }
        return [
            {"do": "notify", "to": self.alive(), "message": message},
            {"do": "settled", "node": dead},
        ]

    def _restartable(self, dead: int, reports: list[dict]) -> bool:
        config = self.config
        if config.on_node_failure != "restart" or not self.dasgd:
            return False
        if any(r.get("fin_deltas") is not None for r in reports):
            return False  # it had finished its steps: nothing to redo
        done = sum(r["node"] == dead for r in self.restarts)
        return done < config.max_restarts and bool(self.alive())

    def _restart(self, dead: int, reports: list[dict], deltas: int) -> list[dict]:
        record = self.failures.pop(dead)
        record.pop("fin", None)
        self._write_failures()
        incarnation = 1 + sum(r["node"] == dead for r in self.restarts)
        steps = deltas * self.config.train.send_every  # every window of a live node is full
        last = record.get("last_step") or 0
        record.update(
            incarnation=incarnation,
            deltas_held=deltas,
            steps_held=steps,
            steps_lost=max(0, last - steps),
        )
        self.restarts.append(record)
        self._write("restarts.json", self.restarts)
        best = max(reports, key=lambda r: r["contiguous"], default=None)
        self.joining[dead] = {
            "deltas": deltas,
            "steps": steps,
            "incarnation": incarnation,
            "prefer": best["node"] if best is not None else None,
            "deadline": time.monotonic() + self.config.transport.ready_timeout_s,
        }
        if dead in self.ready_early:  # a rejoined host started it already
            self.addresses[dead] = self.ready_early.pop(dead)
            return self._rejoin(dead)
        if dead in self.expect_ready:  # a rejoined host is starting it: wait for its ready
            return []
        return [{"do": "spawn", "node": dead}]

    def _rejoin(self, node: int) -> list[dict]:
        """Link a ready restarted node up, tell the others, and give it its ``start``."""
        entry = self.joining.pop(node)
        alive = [j for j in self.alive() if j != node]
        if not alive:  # everyone else left meanwhile: nobody to take a state from
            record = dict(
                self.restarts[-1 - [r["node"] for r in reversed(self.restarts)].index(node)]
            )
            record["last_words"] = "restarted when no other node was alive"
            self.failures[node] = record
            self._write_failures()
            why = "no live node to take a state from"
            return [{"do": "kill", "node": node, "why": why}]
        nbrs = sorted(set(self.original[node]) & set(alive)) or alive[:1]
        self.overlay[node] = set(nbrs)
        for u in nbrs:
            self.overlay[u].add(node)
        donor = entry["prefer"] if entry["prefer"] in nbrs else nbrs[0]
        t_s = self._t_s()
        self.restarts[-1 - [r["node"] for r in reversed(self.restarts)].index(node)].update(
            donor=donor, rejoined_t_s=t_s
        )
        self._write("restarts.json", self.restarts)
        self._change(
            {"t_s": t_s, "rejoined_node": node, "added_edges": [sorted((node, u)) for u in nbrs]}
        )
        notice = {
            "kind": "rejoined",
            "node": node,
            "address": self.addresses[node],
            "neighbours": nbrs,
        }
        fins = {
            str(k): [f["fin"]["deltas"], f["fin"]["steps"], f["fin"].get("lost", [])]
            for k, f in self.failures.items()
            if "fin" in f and k not in self.awaiting and k not in self.waiting_host
        }
        start = {
            "kind": "start",
            "addresses": {str(k): v for k, v in self.addresses.items()},
            "t0_unix_s": self.t0_unix_s,
            "restart": {
                "donor": donor,
                "deltas": entry["deltas"],
                "steps": entry["steps"],
                "neighbours": nbrs,
                "failed": sorted(self.failures),
                "fins": fins,
                "incarnation": entry["incarnation"],
            },
        }
        return [
            {"do": "notify", "to": alive, "message": notice},
            {"do": "send", "node": node, "message": start},
        ]
