"""nomoat's exceptions: one small hierarchy, each carrying the message for the user and a hint of what to do.

Library code raises these; only the command line (`nomoat.cli`) turns them into exit codes and printed errors.
Each kind also derives from the built-in exception that `except` clauses expect of it (ValueError, LookupError),
so a library class can become a NomoatError without changing who catches it.
"""

from __future__ import annotations


class NomoatError(Exception):
    """An error the user can act on: `message` says what is wrong (file, line, value), `hint` what to do.

    `exit_code` is the command line's exit status for it: 2 for anything the user can fix (the convention of the
    `nomoat` commands, like click's usage errors); 1 stays for failures that are not the user's to fix.
    """

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class UsageError(NomoatError, ValueError):
    """Bad arguments or options: a value out of range, options that cannot go together."""


class InputError(NomoatError, ValueError):
    """A file or folder the user gave is missing, unreadable or not of the expected form."""


class ModelError(InputError):
    """A model folder or file that cannot be loaded (unknown family, missing weights, unsupported option)."""


class DataError(InputError):
    """A dataset file with a bad record (the message names the file and line)."""


class NotFoundError(NomoatError, LookupError):
    """A name that names nothing: no adapter of that name in the registry, no such model on a server."""


class BusyError(NomoatError, RuntimeError):
    """A bounded resource is full (a queue, adapter slots): the same request can succeed later."""
