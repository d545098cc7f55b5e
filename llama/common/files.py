"""Writing files without ever losing one: the only module that renames or removes what it wrote.

    atomic_write(path, write)       write(f) into a temporary sibling, fsync, rename over `path`
    with atomic_dir(out) as tmp:    build a directory in a temporary sibling, then rename it into place
    check_output_dir(out, ...)      refuse to replace a user's non-empty directory (unless overwrite),
                                    and never the inputs, the working directory or a parent of either

A reader of `path` sees the old file or the new one, never half of one; an error or Ctrl-C
(KeyboardInterrupt) removes the temporary and leaves the previous state as it was. Temporary
directories carry a marker file, so cleaning up a stale one (left by a killed process) can never
remove a directory this module did not create.
"""

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Optional

from llama.common.errors import UserError

MARKER = ".llama-ref-temp"  # inside every temporary directory we create, and only there


class OutputExistsError(UserError):
    """The output directory holds files that the command would replace."""


def fsync_dir(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path, write) -> Path:
    """write(f) with f a binary file open on `.NAME.tmpPID` beside `path`; fsync; rename over `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # KeyboardInterrupt too: never leave the temporary behind
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_bytes(path, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def write_text(path, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def copy_file(src, dst) -> Path:
    """A copy of `src` (contents and mode) at `dst`, written atomically."""
    with open(src, "rb") as source:
        atomic_write(dst, lambda f: shutil.copyfileobj(source, f, 1 << 20))
    shutil.copymode(src, dst)
    return Path(dst)


def _contains(parent: Path, child: Path) -> bool:
    return parent == child or parent in child.parents


def check_output_dir(out, overwrite: bool = False, inputs: Iterable = (), flag: str = "--overwrite") -> None:
    """Refuse an output directory whose replacement would lose a user's files.

    Without `overwrite`, an existing non-empty directory is refused. With it, the output still may not
    be (or contain) an input, the current working directory, or the directory of an input file."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out} exists and is not a directory: choose a new output directory")
    if not out.exists() or not any(out.iterdir()):
        return
    if not overwrite:
        raise OutputExistsError(f"{out} already exists and is not empty: choose a new directory, "
                                f"or pass {flag} to replace it")
    target = out.resolve()
    protected = [("the current directory", Path.cwd().resolve())]
    for item in inputs:
        p = Path(item).resolve()
        protected.append((f"the input {item}", p))
        if p.is_file():
            protected.append((f"the folder of the input {item}", p.parent))
    for what, p in protected:
        if _contains(target, p):
            raise OutputExistsError(f"{out} is or contains {what}: {flag} never replaces that; "
                                    f"choose a new output directory")


def make_temp_dir(final, name: Optional[str] = None) -> Path:
    """An empty, marked `.NAME.tmpPID` directory (or `name`) beside `final`; its parents are created."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(name or f".{final.name}.tmp{os.getpid()}")
    remove_temp_dir(tmp)  # a stale one of ours, from a killed process that had the same pid
    tmp.mkdir()
    (tmp / MARKER).touch()
    return tmp


def remove_temp_dir(tmp) -> None:
    """Remove a temporary directory made by make_temp_dir (or one it had just created, still empty,
    when interrupted); anything else is left alone."""
    tmp = Path(tmp)
    if not tmp.is_dir() or tmp.is_symlink():
        return
    if (tmp / MARKER).is_file():
        shutil.rmtree(tmp, ignore_errors=True)
    elif not any(tmp.iterdir()):
        tmp.rmdir()


def remove_stale_temps(parent, pattern: str = ".*.tmp*") -> None:
    for tmp in Path(parent).glob(pattern):
        remove_temp_dir(tmp)


def replace_dir(tmp, final) -> Path:
    """Rename the finished temporary `tmp` to `final`. An existing `final` is moved aside first and
    removed only once the new one is in place; if the swap fails, it is moved back."""
    tmp, final = Path(tmp), Path(final)
    fsync_dir(tmp)
    if final.exists() and (final.is_symlink() or not final.is_dir() or any(final.iterdir())):
        old = final.with_name(f".{final.name}.old{os.getpid()}")
        os.rename(final, old)
        try:
            os.rename(tmp, final)
        except BaseException:
            os.rename(old, final)
            (tmp / MARKER).touch()
            raise
        if old.is_symlink() or not old.is_dir():
            old.unlink()
        else:
            shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)  # also over an empty directory
    (final / MARKER).unlink(missing_ok=True)  # only now: until the rename, `tmp` must stay removable
    fsync_dir(final.parent)
    return final


@contextmanager
def atomic_dir(final, overwrite: bool = False, inputs: Iterable = (), flag: str = "--overwrite"):
    """Yield a temporary sibling of `final` to fill; on success it replaces `final` (checked first by
    check_output_dir); on any exception, Ctrl-C included, it is removed and `final` is untouched."""
    check_output_dir(final, overwrite, inputs, flag)
    tmp = Path(final).with_name(f".{Path(final).name}.tmp{os.getpid()}")
    with _interrupts_noted() as interrupted:
        try:
            make_temp_dir(final, tmp.name)  # inside the try: Ctrl-C may land while it is being made
            yield tmp
            if interrupted():  # a Ctrl-C whose KeyboardInterrupt Python swallowed (see below)
                raise KeyboardInterrupt
            replace_dir(tmp, final)
        except BaseException:
            remove_temp_dir(tmp)
            raise


@contextmanager
def _interrupts_noted():
    """Note every SIGINT while the block runs. Python raises KeyboardInterrupt wherever the main thread
    happens to be, and one raised inside a weakref callback or __del__ (import machinery has such
    callbacks) is printed as "Exception ignored" and lost: the program would go on and commit an
    output the user asked to abandon. The note lets atomic_dir refuse to commit after such a loss."""
    import signal
    import sys
    import threading

    noted = []
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or previous == signal.SIG_IGN:
        yield lambda: False  # signals only reach the main thread; an ignored SIGINT stays ignored
        return
    previous_hook = sys.unraisablehook

    def note(signum, frame):
        noted.append(signum)
        if callable(previous):
            previous(signum, frame)
        else:
            raise KeyboardInterrupt

    def quiet(unraisable):  # the lost KeyboardInterrupt is noted: no "Exception ignored" traceback
        if not isinstance(unraisable.exc_value, KeyboardInterrupt):
            previous_hook(unraisable)

    signal.signal(signal.SIGINT, note)
    sys.unraisablehook = quiet
    try:
        yield lambda: bool(noted)
    finally:
        signal.signal(signal.SIGINT, previous)
        sys.unraisablehook = previous_hook
