"""The one exception type for user errors.

Anything the user can fix (a missing file, a bad value, a task vector built on another base model)
raises :class:`TaskArithError` with a message naming the file, key or value at fault. The CLI prints
that message without a traceback and exits non-zero; every other exception is a bug.
"""


class TaskArithError(Exception):
    """A problem with the user's input, files or environment, explained in the message."""
