"""Code that both the server and the clients run.

Tasks (model, data, output function), the featurizer, projectors, the kernel
and score math, checkpoints and the on-disk result format. Everything here is
pure array math or plain I/O: no Flower, no networking.
"""
