"""Attacks of a curious server on what fedtrak releases (``fedtrak attack``).

The server of fedtrak's threat model is honest but curious: it knows the
checkpoint, the model, the projection seed, k, the clip norm C and the noise
multiplier sigma, and receives exactly what the protocol releases. These
modules play that server and measure what it recovers:

- :mod:`.view`: the server's knowledge, and the releases made with the
  clients' own clipping and noise functions;
- :mod:`.inversion`: optimize an input (and choose its label) so that its
  projected gradient matches a released feature, or lies in a released span;
- :mod:`.small_owner`: the span of a small client's features from its Gram, or
  its owner summary under secure aggregation;
- :mod:`.membership`: is a given example in a client's data, from the client's
  private-mode releases, with an empirical epsilon lower bound;
- :mod:`.metrics`: PSNR and SSIM (scikit-image) against the true examples,
  and the class-mean baseline that needs no release;
- :mod:`.suite`: the attacks on a run folder, for ``fedtrak attack``.
"""
