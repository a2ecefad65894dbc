"""Drivers that run on one machine: the centralized reference path, the local
simulation runner, evaluations, sweeps and benchmarks, and the ``fedtrak`` CLI."""
