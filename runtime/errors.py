"""The one error class for what a user can cause: a bad path, a bad file, a bad option, an
incompatible bundle or map. Every CLI prints it as one line and exits with code 2; anything else
is a bug and keeps its traceback."""
from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix; the message names the file or option and what to do."""
