"""How an engine file fails: one error type whose message says what, where and what was expected.

Every stage that reads a model (the file, its manifest, a backend) raises it,
so hot swap can reject a bad file with its reason while the service goes on.
"""
from __future__ import annotations


class EngineError(RuntimeError):
    """An engine file that cannot serve: the message says what, where and what was expected."""


class BackendUnavailable(EngineError):
    """The file was not judged: the library its type needs is not installed here."""


def first_line(exc: BaseException) -> str:
    """For one-line reports (systemd's STATUS=, a verdict): the journal and the log get the whole message."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
