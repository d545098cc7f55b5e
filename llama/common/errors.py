"""The one base class for errors a user can fix: bad input, a missing file, a wrong setting.

Every command line (generate.py, train.py, python -m llama.*) catches `UserError` (and only it),
prints its message on one line and exits with status 1. Anything else is a bug and keeps its
traceback. Messages name the file or argument, the value, and the fix.

It subclasses ValueError so code that already catches ValueError for bad input keeps working.
"""

import json
import os
import sys
import time


class UserError(ValueError):
    """Bad input that the user can fix; the message says how."""


# A missing or unreadable path the user gave: as much their input as a bad value. Other OSErrors
# (a full disk, a broken pipe, a network error) keep their traceback.
USER_ERRORS = (UserError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def one_line(e: BaseException) -> str:
    text = str(e).strip()
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        text = f"{e.filename}: {e.strerror}"
    return text.splitlines()[0] if text else type(e).__name__


def report(e: BaseException, file=None) -> int:
    """What every CLI does with a user error: print `error: <one line>` to stderr and return the exit
    status 1. Under torchrun only rank 0 prints (the ranks fail alike); every rank also records the
    line in torchrun's error file, so the launcher's failure summary shows it instead of a hint to
    enable tracebacks, and the other ranks wait a moment so that rank 0 prints before the launcher
    stops it (torchrun ends the remaining workers as soon as one exits)."""
    line = f"error: {one_line(e)}"
    rank = os.environ.get("RANK", "0")
    if rank == "0":
        print(line, file=file or sys.stderr, flush=True)
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        try:
            with open(error_file, "w") as f:
                info = {"py_callstack": line + "  (a user error: no traceback)", "timestamp": str(int(time.time()))}
                json.dump({"message": {"message": line, "extraInfo": info}}, f)
        except OSError:
            pass
    if rank != "0":
        time.sleep(1.0)
    return 1


class ArgumentError(UserError):
    """A bad argument to a command line flag or a library call (Llama.build, text_completion, ...)."""
