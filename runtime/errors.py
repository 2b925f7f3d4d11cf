"""The one error class for what a user can cause: a bad path, a bad file, a bad option, an
incompatible bundle or map. Every CLI prints it as one line and exits with code 2
(``runtime.cli_util.run_cli``); anything else is a bug and keeps its traceback."""
from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix; the message names the file or option and what to do."""


class PathError(UserError, FileNotFoundError):
    """A path that is missing, of the wrong kind (a file where a folder is expected), empty, or
    already taken by something that must not be replaced."""


class OptionError(UserError, ValueError):
    """An option that cannot work as given (a value out of range, a device that is absent)."""
