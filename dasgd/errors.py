"""The exception hierarchy of dasgd.

Every error dasgd raises on purpose derives from :class:`DasgdError`. User
mistakes (bad options, bad files) are :class:`ConfigError` and its subclasses;
the CLI prints them as one line and exits with code 2.
"""

from __future__ import annotations


class DasgdError(Exception):
    """Base class of every error raised by dasgd."""


class ConfigError(DasgdError, ValueError):
    """A user-supplied value is invalid; the message names it and what is valid."""


class TopologyError(ConfigError):
    """A topology spec or graph file is unknown, malformed, or unusable (e.g. disconnected)."""


class DataError(ConfigError):
    """A dataset name or file is unknown or malformed."""


class WireError(DasgdError):
    """A message from the network is malformed; it is counted and dropped, never fatal."""


class TransportError(DasgdError):
    """A socket could not be bound, or a neighbour accepted nothing before a deadline."""


class NodeFailed(DasgdError):
    """A node process of a run failed; the message names the node and its log."""


class Diverged(DasgdError):
    """A node's loss became NaN or infinite: the step size is too large for this run."""
