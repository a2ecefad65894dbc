"""Client side of fedtrak: the ClientApp that featurizes a device's own data,
keeps its local store and scores its own examples. The math it uses lives in
:mod:`shared`."""
