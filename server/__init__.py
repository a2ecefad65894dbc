"""Server side of fedtrak: the ServerApp that drives the attribution protocol,
aggregates client releases into the kernel, preconditions queries and
ensembles scores. The math it uses lives in :mod:`shared`."""
