"""The one rule for every file a command writes, and the only module that renames or removes what it wrote.

    check_output_file(path, ...)    an output file: never an input, never an existing file without
                                    --overwrite, never a directory, never an empty name
    check_output_dir(out, ...)      an output directory: never an input, a folder holding one, a folder
                                    inside one, or the working directory; non-empty only with --overwrite
    atomic_write(path, write)       write(f) into a temporary sibling, fsync, rename over `path`
    with atomic_dir(out) as tmp:    build a directory in a temporary sibling, then rename it into place
    lock_dir(folder, fix)           one writer at a time (a training run's out_dir); check_not_locked
    read_text_file(path, what)      a text file the user named: UTF-8, not binary

A reader of `path` sees the old file or the new one, never half of one; an error or Ctrl-C
(KeyboardInterrupt) removes the temporary and leaves the previous state as it was. Temporary
directories carry a marker file, so cleaning up a stale one (left by a killed process) can never
remove a directory this module did not create.
"""

import errno
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Optional

from llama.common.errors import UserError

MARKER = ".llama-ref-temp"  # inside every temporary directory we create, and only there


class OutputError(UserError):
    """An output path the command must not write: an input, a file of the wrong kind, one in use."""


class OutputExistsError(OutputError):
    """The output holds files that the command would replace (without --overwrite)."""


class InputFileError(UserError):
    """A file the user named is of the wrong kind: a directory, binary, not UTF-8."""


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
    path.parent.mkdir(parents=True, exist_ok=True)  # an output in a new folder: checked by check_output_file
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


def check_not_input(out, inputs: Iterable = (), flag: str = "--out") -> None:
    """An output is never an input, a folder holding one, or a path inside an input folder (a
    corpus folder read again would take the output for data). `inputs`: the paths the command reads
    (None and "" are skipped)."""
    target = Path(out).resolve()
    for item in inputs:
        if item is None or str(item) == "":
            continue
        p = Path(item).resolve()
        if not p.exists():
            continue  # a name (kjv-genesis, llama3) or a missing path: nothing there to lose
        if _contains(target, p) or _same_file(target, p):
            what = "is" if target == p or _same_file(target, p) else "contains"
            raise OutputExistsError(f"{_label(flag, out)} {what} the input {item}: an output never replaces an input; "
                                    f"choose another path")
        if p.is_dir() and _contains(p, target):
            raise OutputExistsError(f"{_label(flag, out)} is inside the input folder {item}: write it outside the input")


def _label(flag: str, out) -> str:
    """`--out x.json`, `out_dir=runs/a` (a config key), `the output x`."""
    return f"{flag}={out}" if flag.isidentifier() else f"{flag} {out}"


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)  # hard links and bind mounts name one file twice
    except OSError:
        return False


def _check_parent(out: Path, flag: str) -> None:
    """Every existing ancestor of `out` must be a directory (the missing ones are created on write)."""
    for parent in out.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutputError(f"{_label(flag, out)}: {parent} is a file, not a directory: choose another path")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise OutputError(f"{_label(flag, out)}: the folder {parent} is not writable: choose another path")
            return


def add_output_argument(parser, *flags, kind: str, **kwargs):
    """parser.add_argument for an output path, marked as one (`action.output` = "file" or "dir") so
    that tests/test_outputs.py finds every output of every command line and tries it as an input."""
    action = parser.add_argument(*flags, **kwargs)
    action.output = kind
    return action


def check_output_file(path, overwrite: bool = False, inputs: Iterable = (), flag: str = "--out",
                      overwrite_flag: str = "--overwrite") -> Path:
    """The rule for an output file, checked before any work: a name, not a directory, never an input
    (nor inside an input folder), an existing file only with `overwrite`. Missing parent folders are
    fine (atomic_write creates them)."""
    if path is None or not str(path).strip():
        raise OutputError(f"{flag} is empty: name the file to write")
    out = Path(path)
    check_not_input(out, inputs, flag)
    if out.is_dir():
        raise OutputError(f"{_label(flag, out)} is a directory: name a file inside it (e.g. {out / 'result.json'})")
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise OutputExistsError(f"{_label(flag, out)} already exists: choose a new name, or pass {overwrite_flag} to "
                                f"replace it")
    _check_parent(out, flag)
    return out


def check_output_dir(out, overwrite: bool = False, inputs: Iterable = (), flag: str = "--overwrite",
                     name: str = "") -> None:
    """Refuse an output directory whose replacement would lose a user's files.

    Never an input, a folder holding one or inside one (check_not_input); an existing non-empty
    directory only with `overwrite`, and even then never the current working directory or a folder
    holding it. `name` is the option naming the output ("--out"), for the message."""
    if out is None or not str(out).strip():
        raise OutputError(f"{name or 'the output directory'} is empty: name a directory to write")
    label = f"{name} {out}" if name else str(out)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{label} exists and is not a directory: choose a new output directory")
    non_empty = out.exists() and any(out.iterdir())
    if non_empty and overwrite and _contains(out.resolve(), Path.cwd().resolve()):
        raise OutputExistsError(f"{label} is or contains the current directory: {flag} never replaces that; "
                                f"choose a new output directory")
    check_not_input(out, inputs, name or "the output")
    if non_empty and not overwrite:
        raise OutputExistsError(f"{label} already exists and is not empty: choose a new directory, "
                                f"or pass {flag} to replace it")
    _check_parent(out, name or "the output")


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
def atomic_dir(final, overwrite: bool = False, inputs: Iterable = (), flag: str = "--overwrite", name: str = ""):
    """Yield a temporary sibling of `final` to fill; on success it replaces `final` (checked first by
    check_output_dir); on any exception, Ctrl-C included, it is removed and `final` is untouched."""
    check_output_dir(final, overwrite, inputs, flag, name)
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


# ---------------------------------------------------------------------------- one writer at a time

LOCK = ".llama-ref.lock"


class FolderLock:
    """A held lock on a folder (lock_dir); release() gives it up. The kernel releases it when the
    process dies, however it dies, so a killed run never leaves its folder locked."""

    def __init__(self, fd: int, path: Path):
        self.fd, self.path = fd, path

    def release(self) -> None:
        if self.fd is None:
            return
        self.path.unlink(missing_ok=True)  # while still held: a waiter that opened it re-checks the inode
        os.close(self.fd)
        self.fd = None


_HELD = {}  # resolved folder -> this process's FolderLock on it


def _busy(folder, fd: int, fix: str) -> OutputError:
    holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
    return OutputError(f"{folder} is being written by another process (pid {holder}): {fix}")


def lock_dir(folder, fix: str) -> FolderLock:
    """Take `folder`'s lock (flock on folder/.llama-ref.lock, created if missing), or raise an
    OutputError naming the process that holds it and `fix`. A lock this process holds already is
    returned as it is (a second setup() of the same run in one process)."""
    import fcntl
    import time

    key = Path(folder).resolve()
    if key in _HELD and _HELD[key].fd is not None:
        return _HELD[key]
    path = Path(folder) / LOCK
    tries = 10  # a check_not_locked probe holds a shared lock for an instant: wait that out, not a run
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            tries -= 1
            error = _busy(folder, fd, fix) if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES) else e
            os.close(fd)
            if error is e or tries == 0:
                raise error from None
            time.sleep(0.05)
            continue
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder released and removed it between our open and flock: try again
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _HELD[key] = FolderLock(fd, path)
    return _HELD[key]


def check_not_locked(folder, fix: str) -> None:
    """Refuse at once if another process holds `folder`'s lock: before reading what that process may
    be replacing (a run resumed into a folder a live run writes). A shared lock for an instant, so
    that two probes never refuse each other."""
    import fcntl

    if Path(folder).resolve() in _HELD:
        return
    try:
        fd = os.open(Path(folder) / LOCK, os.O_RDONLY)
    except (FileNotFoundError, NotADirectoryError):
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise
        raise _busy(folder, fd, fix) from None
    finally:
        os.close(fd)  # closing gives the shared lock back


def unlock_dir(folder) -> None:
    """Release this process's lock on `folder` (nothing if it holds none)."""
    held = _HELD.pop(Path(folder).resolve(), None)
    if held is not None:
        held.release()


# ---------------------------------------------------------------------------- a user's text files


def read_text_file(path, what: str) -> str:
    """The text of a file the user named (`what`: how the message names it, e.g. "--data"): a file,
    not binary (a NUL byte), UTF-8. Counting bytes or tokens of anything else would be wrong
    silently (bits per byte over a decoded-with-replacements text)."""
    p = Path(path)
    if p.is_dir():
        raise InputFileError(f"{what} {p} is a directory: give a text file")
    if not p.is_file():
        raise InputFileError(f"{what} {p}: no such file")
    data = p.read_bytes()
    nul = data.find(b"\0")
    if nul >= 0:
        raise InputFileError(f"{what} {p} looks binary (a NUL byte at offset {nul}): give a UTF-8 text file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputFileError(f"{what} {p} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}): "
                             f"convert it first, e.g. iconv -f latin1 -t utf-8") from None
