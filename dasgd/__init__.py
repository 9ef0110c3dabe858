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
    - :mod:`~dasgd.core.failures` -- a dead node: overlay repair links and its derived ``fin``
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
- :mod:`dasgd.api` -- the Python API: :func:`dasgd.run`, :func:`dasgd.simulate`,
  :func:`dasgd.load_run` and their :class:`~dasgd.api.RunResult`
- :mod:`dasgd.analysis.export` -- a run directory as tables: CSV, Parquet, TensorBoard (``dasgd export``)
- :mod:`dasgd.ml.torch_model` -- any ``torch.nn.Module`` as a model (``--model torch:MODULE:FACTORY``)
- :mod:`dasgd.cli` -- the ``dasgd`` command

Algorithms and staleness definitions: ALGORITHMS.md in the project's shared
notes, summarized in README.md.
"""

__version__ = "0.1.0"

__all__ = ["RunResult", "__version__", "load_run", "run", "simulate"]

_API = ("RunResult", "load_run", "run", "simulate")


def __getattr__(name: str):
    # lazy: `python -m dasgd node` imports this package, and must stay cheap (DESIGN.md §9)
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'dasgd' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_API])
