"""Atomic writes: a crash leaves either the old file or the new one, never half of one.

A write in progress is a hidden temporary beside its target (`.NAME.XXXX.tmp`), locked (flock)
by the process writing it for as long as it writes. What a killed process leaves behind is
unlocked: `remove_stale_temporaries` clears it on the next start of whatever owns the folder.

Reading what a user hands over (a model's files, a settings file) goes through `read_regular_text`
or `check_regular`: a named pipe there would block its reader forever, a device never ends.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path

import platformdirs

TEMP_SUFFIX = ".tmp"
# What atomic_directory moves aside while it swaps a directory in: .NAME.old-PID
MOVED_ASIDE = re.compile(r"^\.(?P<name>.+)\.old-(?P<pid>\d+)$")


def kettle_home() -> Path:
    """`KETTLE_HOME` if set, else the platform's user data folder; created on first use."""
    root = os.environ.get("KETTLE_HOME") or platformdirs.user_data_dir("kettle", appauthor=False)
    path = Path(root).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def fsync_dir(path: str | Path) -> None:
    """Make a rename inside `path` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(path: str | Path) -> None:
    """fsync every file below `path`, then the directories."""
    for root, _dirs, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(root)


def is_temporary(name: str) -> bool:
    """A name only Kettle's atomic writes use for work in progress (never a result)."""
    return name.startswith(".") and (name.endswith(TEMP_SUFFIX) or bool(MOVED_ASIDE.match(name)))


@contextlib.contextmanager
def _locked(fd: int):
    fcntl.flock(fd, fcntl.LOCK_EX)
    yield


@contextlib.contextmanager
def atomic_file(path: str | Path):
    """Yield a temporary path beside `path` to write; on success it is fsynced and becomes
    `path` in one rename (for writers that want a file name, like torch.save)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        with _locked(fd):
            yield Path(tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        _name_the_target(exc, tmp, path=path)
        raise
    finally:
        os.close(fd)
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_directory(path: str | Path, overwrite: bool = False):
    """Yield a temporary directory beside `path`; on success it becomes `path` in one rename.

    With `overwrite`, an existing `path` is replaced: it is moved aside first and removed only
    once the new directory is in place, so a crash never leaves neither.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if os.path.lexists(path) and not overwrite:
        raise FileExistsError(path)
    check_target(path, folder=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent))
    lock = os.open(tmp, os.O_RDONLY)
    try:
        with _locked(lock):
            yield tmp
            fsync_tree(tmp)
            old = None
            if path.exists():
                check_ours(path, os.listdir(tmp))
                old = path.with_name(f".{path.name}.old-{os.getpid()}")
                os.replace(path, old)
            os.replace(tmp, path)
            fsync_dir(path.parent)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        _name_the_target(exc, tmp, path=path)
        raise
    finally:
        os.close(lock)


def _name_the_target(exc: BaseException, tmp: Path | str, *, path: Path) -> None:
    """A failed write names what was being written, not the temporary that is gone now."""
    if isinstance(exc, OSError) and exc.filename and str(exc.filename).startswith(str(tmp)):
        exc.filename = str(path)


def remove_stale_temporaries(folder: str | Path) -> list[str]:
    """Remove the temporaries in `folder` that no live process is writing (a killed write's
    leftovers); a directory that was moved aside to be replaced, and whose replacement never
    arrived, is put back. Returns the names removed or restored."""
    folder = Path(folder)
    try:
        names = sorted(os.listdir(folder))
    except OSError:  # missing or unreadable: nothing to clear
        return []
    cleared = []
    for name in names:
        if not is_temporary(name):
            continue
        path = folder / name
        aside = MOVED_ASIDE.match(name)
        if aside:
            if process_alive(int(aside["pid"])):
                continue
            target = folder / aside["name"]
            with contextlib.suppress(OSError):
                if target.exists():
                    shutil.rmtree(path)
                else:
                    os.replace(path, target)
                cleared.append(name)
            continue
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # locked: a live writer's
            os.close(fd)
            continue
        try:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
            cleared.append(name)
        except OSError:
            pass
        finally:
            os.close(fd)
    return cleared


def process_alive(pid: int) -> bool:
    """Whether process `pid` is running: not gone, and not a zombie that has ended and waits
    for its parent to collect it (on Windows, where it cannot be asked safely: assumed so)."""
    if os.name == "nt":  # os.kill(pid, 0) would terminate it there
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):  # no /proc (macOS): kill's answer stands
        return True
    return state not in (b"Z", b"X")


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_writable(path: str | Path) -> None:
    """Refuse, before any work, a result `path` that could not be written: the nearest folder
    above it that exists must take a new entry. Tried rather than asked (access() says yes to
    root in /proc): a hidden temporary is made and removed at once."""
    from gpt.errors import KettleError

    path = Path(path).expanduser()
    folder = path.absolute().parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".kettle-check.", suffix=TEMP_SUFFIX, dir=folder))
    except OSError as exc:
        raise KettleError(f"{path}: cannot be written ({folder}: {exc.strerror or exc})") from None


def shown(path: str | Path) -> str:
    """`path` as text SQLite and any output can hold: a file name that is not UTF-8 reaches
    Python as lone surrogates, which become \\x escapes here."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def check_ours(folder: str | Path, names) -> None:
    """A KettleError unless the existing `folder` is empty or holds one of `names` (what the
    folder replacing it holds): --force replaces what Kettle wrote there before, never a folder of
    the user's (`--out ~/Documents --force` would have removed it whole)."""
    from gpt.errors import KettleError

    try:
        held = os.listdir(folder)
    except OSError as exc:
        raise KettleError(f"{shown(folder)}: cannot read: {exc.strerror or exc}") from exc
    if held and not set(held) & set(names):
        raise KettleError(
            f"{shown(folder)} holds files that are not a model's ({sorted(held)[0]!r}); "
            "--force replaces only a folder Kettle wrote: choose another path"
        )


def check_target(out: str | Path, *, folder: bool = False) -> None:
    """A KettleError unless `out` is absent or a regular file (with `folder`, a folder): a
    result replaces it by a rename, which would put a file or a folder where a device, a FIFO,
    a symbolic link (not what it points to) or the other kind of entry was."""
    from gpt.errors import KettleError

    try:
        mode = os.lstat(out).st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise KettleError(f"{shown(out)}: cannot write: {exc.strerror or exc}") from exc
    if stat.S_ISDIR(mode) if folder else stat.S_ISREG(mode):
        return
    kind = (
        "a symbolic link"
        if stat.S_ISLNK(mode)
        else "a folder"
        if stat.S_ISDIR(mode)
        else "a regular file"
        if stat.S_ISREG(mode)
        else "a named pipe (FIFO)"
        if stat.S_ISFIFO(mode)
        else "a device"
        if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
        else "not a regular file"
    )
    replaces = "a model directory only replaces a folder" if folder else "an export only replaces a regular file"
    raise KettleError(f"{shown(out)} is {kind}; {replaces}: choose another path")


@contextlib.contextmanager
def made_until_error(path: str | Path):
    """Create the folder `path` (with any missing parents) for the block; if the block raises,
    remove what this made, so that a refused command leaves no empty folder behind."""
    path = Path(path)
    top = None
    for folder in (path, *path.parents):
        if folder.exists():
            break
        top = folder
    path.mkdir(parents=True, exist_ok=True)
    try:
        yield path
    except BaseException:
        if top is not None:
            shutil.rmtree(top, ignore_errors=True)
        raise


class NotARegularFile(OSError):
    """A path that names a directory, a named pipe, a device or a socket where a file's bytes
    are read: the message says which."""


def _kind(mode: int) -> str:
    for test, kind in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a named pipe"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return kind
    return "something other than a file"


def _refuse_irregular(mode: int) -> None:
    if not stat.S_ISREG(mode):
        raise NotARegularFile(f"{_kind(mode)}, not a regular file")


def check_regular(path: str | Path) -> None:
    """Raise NotARegularFile unless `path` (its symlinks followed) is a regular file, for a
    reader that opens the file itself (safetensors); FileNotFoundError where nothing is."""
    _refuse_irregular(os.stat(path).st_mode)


def read_regular_text(path: str | Path) -> str:
    """The UTF-8 text of `path`, which must be a regular file: it is opened without waiting
    (O_NONBLOCK: a named pipe opens at once) and checked before a byte is read, so nothing
    stalls on a pipe that has no writer."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        _refuse_irregular(os.fstat(fd).st_mode)
    except BaseException:
        os.close(fd)
        raise
    with open(fd, "rb") as f:
        return f.read().decode("utf-8")
