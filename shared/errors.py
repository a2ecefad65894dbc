"""The exceptions fedtrak raises for bad input and for runs it ends on purpose."""

from __future__ import annotations

from typing import Any


class FedtrakError(ValueError):
    """A user-facing error: bad input, a wrong model, a corrupt file.

    The message is one line that names the problem; the CLI prints it as
    ``fedtrak: error: <message>`` and exits non-zero.
    """


class RunFailed(FedtrakError):
    """A federated run the server ended on purpose, without results, for a reason it records.

    The run folder's ``summary.json`` then says ``"complete": false`` and holds ``failure``
    (:meth:`fedtrak.results.folder.ResultWriter.fail`): the reason, the step it ended at and the
    details in ``failure``. The message is one line, as for every :class:`FedtrakError`.
    """

    def __init__(self, message: str, failure: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        #: What the run folder records: ``reason`` (the message) first, then the step's details.
        self.failure: dict[str, Any] = {"reason": message, **(failure or {})}


class Refused(FedtrakError):
    """A device's refusal of a job or a request, decided from the job and the device's own settings
    alone (a floor, its budget, a request outside the job's plan): its message says nothing about the
    device's data, so it may reach the server even under differential privacy, where other errors
    reach it only by their step."""
