"""dasgd: decentralized asynchronous SGD over ZeroMQ, with staleness logging.

n node processes each hold a model replica and a shard of the data, take local
SGD steps and exchange model deltas asynchronously along a NetworkX topology:
no server, no barrier (Tosi & Theobald, arXiv 2309.03754). The folders are the
layers, lowest first; a module imports only from its own layer or below:

- :mod:`dasgd.errors`, :mod:`dasgd.validation` -- the exception hierarchy; shared argument checks
- :mod:`dasgd.core` -- the pure core: no clock, socket or file
    - :mod:`~dasgd.core.wire` -- the message format: msgpack header + raw array frame
    - :mod:`~dasgd.core.staleness` -- version vectors, apply staleness, model lag
    - :mod:`~dasgd.core.protocol` -- ``NodeProtocol``: DASGD bookkeeping (relay, de-duplication, drain)
    - :mod:`~dasgd.core.node` -- ``DasgdNode``: every decision of a DASGD node, handed ``now``
    - :mod:`~dasgd.core.ps` -- ``PSWorker``, ``PSServer``: the parameter-server baselines, likewise
    - :mod:`~dasgd.core.emulation`, :mod:`~dasgd.core.actions` -- straggler/latency/compute-time specs; waits
- :mod:`dasgd.ml` -- the numerical parts: :mod:`~dasgd.ml.models`, :mod:`~dasgd.ml.optim`, :mod:`~dasgd.ml.data`
- :mod:`dasgd.config`, :mod:`dasgd.topology` -- the frozen ``RunConfig``; graph builders and files
- :mod:`dasgd.analysis` -- event logs and run summaries (:mod:`~dasgd.analysis.metrics`), the
  HTML report of `dasgd report` (:mod:`~dasgd.analysis.report`)
- :mod:`dasgd.build`, :mod:`dasgd.rundir` -- a machine from a config; the run directory's layout,
  preparation and summary (shared by the runtime and the simulator)
- :mod:`dasgd.runtime` -- processes and sockets: :mod:`~dasgd.runtime.transport` (ZeroMQ),
  :mod:`~dasgd.runtime.node` (the ``Driver`` of one process), :mod:`~dasgd.runtime.control`,
  :mod:`~dasgd.runtime.launch` (``dasgd run``)
- :mod:`dasgd.sim` -- ``dasgd simulate``: the same machines in virtual time
- :mod:`dasgd.cli` -- the ``dasgd`` command

Algorithms and staleness definitions: ALGORITHMS.md in the project's shared
notes, summarized in README.md.
"""

__version__ = "0.1.0"
