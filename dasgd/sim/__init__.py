"""The discrete-event simulator: the same node state machines in virtual time.

- :mod:`dasgd.sim.simulator` -- :func:`simulate` (``dasgd simulate``), :class:`SimCosts`
"""

from .simulator import SimCosts, SimulationStalled, simulate

__all__ = ["SimCosts", "SimulationStalled", "simulate"]
