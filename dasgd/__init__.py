"""dasgd: decentralized asynchronous SGD over ZeroMQ, with staleness logging.

n node processes each hold a model replica and a shard of the data, take local
SGD steps and exchange model deltas asynchronously along a NetworkX topology:
no server, no barrier (Tosi & Theobald, arXiv 2309.03754). Where things live,
lowest layer first:

- :mod:`dasgd.errors`    -- ``DasgdError`` and its subclasses (``ConfigError`` ...)
- :mod:`dasgd.validation` -- shared argument checks (``check_int``, ``check_dtype`` ...)
- :mod:`dasgd.config`    -- frozen ``RunConfig`` and its groups, JSON round trip
- :mod:`dasgd.wire`      -- the message format: msgpack header + raw array frame
- :mod:`dasgd.topology`  -- graph builders, graph files, validation, spectral gap
- :mod:`dasgd.data`      -- datasets, splits, shards, mini-batch sampling
- :mod:`dasgd.models`    -- numpy models on a flat parameter vector
- :mod:`dasgd.optim`     -- local update rules returning the parameter change
- :mod:`dasgd.staleness` -- version vectors, apply staleness, model lag (pure)
- :mod:`dasgd.protocol`  -- ``NodeProtocol``: the DASGD node as a sans-IO state machine
- :mod:`dasgd.transport` -- ZeroMQ sockets of one node (bytes only)
- :mod:`dasgd.metrics`   -- JSONL event logs, run summary, tables
- :mod:`dasgd.node`      -- the runtime loop of one node process
- :mod:`dasgd.launch`    -- spawning and supervising the node processes of a run
- :mod:`dasgd.cli`       -- the ``dasgd`` command

Algorithms and staleness definitions: ALGORITHMS.md in the project's shared
notes, summarized in README.md.
"""

__version__ = "0.1.0"
