"""The one kind of error a user can fix: bad input.

Whatever module raises it, the CLI turns a ``UserError`` into one line on stderr and exit code 2
(``--debug`` or ``MIMSCALE_DEBUG=1`` shows the traceback). Anything else is a bug and keeps its
traceback. Subclasses say where the bad input was; the message says what is wrong and what works.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input: a config value, a path, a file's contents. The message is shown as it is."""


class CheckpointError(UserError):
    """A checkpoint that is missing, incomplete, unreadable, unsafe to unpickle or of the wrong
    shape for the model it should load into."""


class DataError(UserError, ValueError):
    """Data that cannot be read as asked: shard patterns, indexes, shards without samples, too few
    samples for a batch. (A ``ValueError`` too, for the callers that catch one.)"""


class MissingExtraError(UserError, ImportError):
    """An optional extra that the asked-for feature needs is not installed; the message says how
    to install it."""
