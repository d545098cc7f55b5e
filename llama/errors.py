"""The one base class for errors a user can fix: bad input, a missing file, a wrong setting.

Every command line (generate.py, train.py, python -m llama.*) catches `UserError` (and only it),
prints its message on one line and exits with status 1. Anything else is a bug and keeps its
traceback. Messages name the file or argument, the value, and the fix.

It subclasses ValueError so code that already catches ValueError for bad input keeps working.
"""


class UserError(ValueError):
    """Bad input that the user can fix; the message says how."""
