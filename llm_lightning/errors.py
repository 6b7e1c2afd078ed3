"""Errors a user can fix, told apart from bugs.

Every entry point prints a `UserError` as a short message and exits with status 2 (see
`llm_lightning.runtime.user_errors`); anything else is a bug and keeps its traceback. The message
says what was wrong, the value seen, the valid choices and the config key to change.

The classes subclass the builtin a caller would expect (`ValueError`, `FileNotFoundError`,
`RuntimeError`), so `except ValueError` in a library user's code keeps working.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input (a config value, a file, a label): the message says what to change."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the user named is not there, or is not what was asked for."""


class UnsupportedError(UserError, RuntimeError):
    """The choice is valid, but this platform (or an optional package) cannot run it."""


class SplitMismatchError(UserError):
    """A model is about to be scored on texts that are not the splits it was trained against."""
