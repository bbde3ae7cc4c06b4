"""Runs that fail loudly and resume exactly: preemption, rank health, fault injection for tests."""
