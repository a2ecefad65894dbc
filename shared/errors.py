"""The one exception type fedtrak raises for bad input."""


class FedtrakError(ValueError):
    """A user-facing error: bad input, a wrong model, a corrupt file.

    The message is one line that names the problem; the CLI prints it as
    ``fedtrak: error: <message>`` and exits non-zero.
    """
