"""Runs that fail loudly and resume exactly: preemption, rank health, fault injection for tests.

The timing of rank health lives here, free of torch, for the launch scripts (launch/multinode.sh sizes its ssh
keepalives with :func:`silence_limit_s`).
"""
from __future__ import annotations


def heartbeat_interval(timeout_s: float) -> float:
    """Seconds between two heartbeats of a rank (pipeline.resilience.rank_health) for train.collective_timeout_s."""
    return min(10.0, max(0.5, timeout_s / 5))


def silence_limit_s(timeout_s: float) -> float:
    """The longest a surviving rank takes to name a peer that fell silent: train.collective_timeout_s, plus up to
    two heartbeat intervals (the peer's last heartbeat is read up to one interval late, and judged once a tick)."""
    return timeout_s + 2 * heartbeat_interval(timeout_s)
