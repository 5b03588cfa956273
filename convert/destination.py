"""The destination folder: lock, staging, checks and the final rename.

Contract:
- `claim(dst, source, overwrite, force)` checks the destination before anything is written: it must not be the
  source, contain the source or be the current folder; with `overwrite` an existing folder is replaced only if it is
  empty or a checkpoint folder (safetensors plus config, index or our sidecar, no sub-folders) unless `force`.
- The lock is an exclusive `flock` on `.<name>.lock` beside the destination, held from the start check to the final
  rename. A second writer to the same destination fails at once with one line. The lock file is removed by its
  holder (a waiter that then locks an unlinked file notices and retries).
- Staging is the hidden sibling `.<name>.partial-<pid>-<hex>`; long names are shortened (prefix + hash) so that the
  hidden names stay within the 255-byte file-name limit. Partials of processes that no longer exist are removed at
  the next run (`clean_stale_partials`) and reported; an old destination moved aside by a killed fallback
  `--overwrite` is put back if the destination is missing.
- `commit(staging, dst, replace)` is the final step, with SIGINT/SIGTERM blocked:
  - no replacement: `renameat2(RENAME_NOREPLACE)` (a destination that appeared during the run makes it fail; the
    fallback without renameat2 is `link`-free: `mkdir`-probe then `rename`, which can only lose against a folder
    created in the microseconds between the two);
  - replacement: `renameat2(RENAME_EXCHANGE)` swaps the two folders atomically (no moment without a destination),
    then the old content is removed. The fallback moves the old folder aside, moves the new one in, and moves the
    old one back if that fails.
  A signal that arrives during the commit is delivered after it: `Interrupted(committed=True)` then says the new
  destination is complete.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import fnmatch
import hashlib
import os
import shutil
import signal
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import ConvertError

MAX_NAME = 255
_TERMINATING = (signal.SIGINT, signal.SIGTERM)
CHECKPOINT_MARKERS = ("config.json", "model.safetensors.index.json", "automodel_convert.json")
CHECKPOINT_FILES = (
    "*.safetensors",
    "*.json",
    "*.model",
    "*.tiktoken",
    "*.jinja",
    "tokenizer*",
    "merges.txt",
    "vocab.txt",
    "README*",
    "LICENSE*",
    ".gitattributes",
)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM; `committed` says whether the destination was already complete when it arrived."""

    def __init__(self, committed: bool, dst: Path) -> None:
        super().__init__("terminated")
        self.committed = committed
        self.dst = dst


def hidden_stem(dst: Path) -> str:
    """`.<name>` for the lock and staging names, shortened (prefix + hash) when `<name>` is long."""
    name = dst.name
    if len(name.encode()) <= 180:
        return f".{name}"
    digest = hashlib.sha256(name.encode()).hexdigest()[:16]
    return f".{name.encode()[:120].decode(errors='ignore')}~{digest}"


def staging_path(dst: Path) -> Path:
    return dst.parent / f"{hidden_stem(dst)}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _dead_writer_folders(dst: Path, kind: str) -> list[Path]:
    """`.<dst>.<kind>-<pid>-*` folders whose writer process no longer exists."""
    prefix = f"{hidden_stem(dst)}.{kind}-"
    found = []
    for p in dst.parent.iterdir():
        if not p.name.startswith(prefix) or not p.is_dir() or p.is_symlink():
            continue
        pid_text = p.name[len(prefix) :].split("-", 1)[0]
        if pid_text.isdigit() and not _pid_alive(int(pid_text)):
            found.append(p)
    return found


def clean_stale_partials(dst: Path) -> list[str]:
    """Tidy up after killed runs; return what was done, one phrase each.

    - `.<dst>.partial-<pid>-*` of dead processes: removed (incomplete output, or the old content after an exchange);
    - `.<dst>.old-<pid>-*` of dead processes (a fallback --overwrite killed between its two renames): put back as
      `dst` when `dst` is absent, else removed (the new checkpoint was already in place).
    """
    done = []
    for p in _dead_writer_folders(dst, "partial"):
        remove_tree(p)
        done.append(f"removed the stale partial folder {p.name}")
    for p in _dead_writer_folders(dst, "old"):
        if not os.path.lexists(dst):
            os.rename(p, dst)
            done.append(f"restored {dst.name} from {p.name}, left by an interrupted --overwrite")
        else:
            remove_tree(p)
            done.append(f"removed the stale old folder {p.name}")
    return done


def is_checkpoint_folder(folder: Path) -> bool:
    """What --overwrite may replace: safetensors shards plus a config, an index or our sidecar, no sub-folders, and
    no file a checkpoint would not hold (`CHECKPOINT_FILES`: shards, JSON, tokenizer and template files, README)."""
    entries = list(folder.iterdir())
    if any(p.is_dir() and not p.is_symlink() for p in entries):
        return False
    names = {p.name for p in entries}
    if not all(any(fnmatch.fnmatchcase(n, pat) for pat in CHECKPOINT_FILES) for n in names):
        return False
    return any(n.endswith(".safetensors") for n in names) and any(m in names for m in CHECKPOINT_MARKERS)


def _is_within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_destination(dst: Path, source: Path | None, overwrite: bool, force: bool) -> None:
    """Refuse destinations that would lose data; see the module contract."""
    real = dst.resolve()
    if source is not None and _is_within(source.resolve(), real):
        what = "is" if source.resolve() == real else "contains"
        raise ConvertError(f"destination {str(dst)!r} {what} the source folder; write to a new folder outside it")
    if _is_within(Path.cwd().resolve(), real):
        raise ConvertError(f"destination {str(dst)!r} is the current folder or contains it; write to a new folder")
    if not os.path.lexists(dst):
        return
    if dst.is_symlink() or not dst.is_dir():
        raise ConvertError(f"destination {str(dst)!r} exists and is not a folder; choose a new folder path")
    if not overwrite:
        raise ConvertError(f"destination {str(dst)!r} exists; pass --overwrite to replace it or choose another folder")
    check_replaceable(dst, force)


def check_replaceable(dst: Path, force: bool) -> None:
    """An existing `dst` may be replaced: empty, a checkpoint folder, or anything with `force`."""
    if dst.is_symlink() or not dst.is_dir():
        raise ConvertError(f"destination {str(dst)!r} exists and is not a folder; choose a new folder path")
    if not force and any(dst.iterdir()) and not is_checkpoint_folder(dst):
        raise ConvertError(
            f"destination {str(dst)!r} is not a checkpoint folder (it holds other files or folders); --overwrite replaces checkpoint folders only, pass --force to replace it anyway"
        )


@contextmanager
def destination_lock(dst: Path) -> Iterator[None]:
    """Hold an exclusive lock on `dst` (a lock file beside it) for the whole block; fail at once if it is taken."""
    path = dst.parent / f"{hidden_stem(dst)}.lock"
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise ConvertError(
                f"cannot create the lock file {str(path)!r} ({e.strerror}); choose a writable destination"
            ) from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise ConvertError(
                    f"another automodel-convert run is writing {str(dst)!r} (lock {path.name}); wait for it or choose another destination"
                ) from e
            raise ConvertError(
                f"cannot lock {str(path)!r} ({e.strerror}); choose a destination on a local filesystem"
            ) from e
        if _same_file(fd, path):
            break
        os.close(fd)  # the holder removed the file after we opened it: lock the new one
    try:
        yield
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass
        os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    fst = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (fst.st_dev, fst.st_ino)


# ---------------------------------------------------------------- the final rename

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
AT_FDCWD = -100


def libc_function(name: str, argtypes: list, restype=ctypes.c_int):  # noqa: ANN001, ANN201
    """A Linux libc function through ctypes (errno kept), or None elsewhere or where libc lacks it."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        f = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    f.argtypes, f.restype = argtypes, restype
    return f


def _load_renameat2() -> Callable[[str, str, int], int] | None:
    f = libc_function("renameat2", [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint])
    if f is None:
        return None

    def call(a: str, b: str, flags: int) -> int:
        if f(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), flags) == 0:
            return 0
        return ctypes.get_errno()

    return call


_renameat2 = _load_renameat2()


COMMITTED: list[Path] = []  # destinations this process has completed (for truthful interrupt messages)


def commit_rename(a: Path, b: Path, flags: int = 0) -> None:
    """rename(2) of `a` to `b`, or renameat2(2) with `flags` (the one seam every final rename goes through)."""
    if not flags:
        os.rename(a, b)
        return
    if _renameat2 is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available")
    err = _renameat2(str(a), str(b), flags)
    if err:
        raise OSError(err, os.strerror(err), str(b))


def _rename2(a: Path, b: Path, flags: int) -> bool:
    """renameat2 with `flags`; False where the kernel or filesystem lacks it (the caller falls back)."""
    if _renameat2 is None:
        return False
    try:
        commit_rename(a, b, flags)
    except OSError as e:
        if e.errno in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
            return False
        raise
    return True


def _place_new(staging: Path, dst: Path) -> None:
    try:
        if _rename2(staging, dst, RENAME_NOREPLACE):
            return
    except FileExistsError as e:
        raise ConvertError(
            f"destination {str(dst)!r} appeared while this run was writing; it was left as it is, run again to a new folder"
        ) from e
    if os.path.lexists(dst):
        raise ConvertError(
            f"destination {str(dst)!r} appeared while this run was writing; it was left as it is, run again to a new folder"
        )
    commit_rename(staging, dst)


def _replace(staging: Path, dst: Path) -> Path | None:
    """Swap the new folder into `dst`; return the folder now holding the old content (to delete)."""
    if not os.path.lexists(dst):
        _place_new(staging, dst)
        return None
    if _rename2(staging, dst, RENAME_EXCHANGE):
        return staging
    old = dst.parent / f"{hidden_stem(dst)}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    commit_rename(dst, old)
    try:
        commit_rename(staging, dst)
    except OSError as e:
        os.rename(old, dst)
        raise ConvertError(
            f"could not move the new checkpoint into {str(dst)!r} ({e.strerror}); the destination is unchanged"
        ) from e
    return old


@contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt in the main thread during the block, so that it cleans up as Ctrl-C does
    (elsewhere a no-op). An ignored SIGTERM stays ignored."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) is signal.SIG_IGN:
        yield
        return

    def _term(signum, frame):  # noqa: ARG001
        raise KeyboardInterrupt("terminated")

    old = signal.signal(signal.SIGTERM, _term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


@contextmanager
def signals_deferred(on_signal: Callable[[], None] | None = None) -> Iterator[None]:
    """SIGINT/SIGTERM arriving during the block (delivered to any thread, or already pending in Python when it
    starts) are recorded instead of raising (`on_signal` is called for each, e.g. to tell worker threads to stop),
    and delivered again when the block ends. Main thread only (elsewhere a no-op): Python runs signal handlers
    there. Ignored signals stay ignored. A signal arriving while the handlers are being swapped in is delivered as
    if before the block: the handlers swapped so far are put back first."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []

    def record(signum, frame):  # noqa: ARG001
        caught.append(signum)
        if on_signal is not None:
            on_signal()

    old: dict[int, object] = {}
    try:
        for sig in _TERMINATING:
            current = signal.getsignal(sig)
            if current is signal.SIG_IGN:
                continue  # ignored (nohup, a background job): it stays ignored
            old[sig] = current
            signal.signal(sig, record)
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        if caught:
            signal.raise_signal(caught[0])


def commit(staging: Path, dst: Path, replace: bool, force: bool = False) -> None:
    """Make `staging` the destination (see the module contract); signals arriving meanwhile count as after."""
    placed = False
    try:
        with signals_deferred():
            if replace and os.path.lexists(dst):
                check_replaceable(dst, force)  # it may have changed since the start
            old = _replace(staging, dst) if replace else _place_new(staging, dst)
            placed = True
            COMMITTED.append(dst)
            fsync_dir(dst.parent)
            if old is not None:
                remove_tree(old)
    except KeyboardInterrupt as e:
        raise Interrupted(placed, dst) from e


def remove_tree(folder: Path) -> None:
    """rmtree that also removes a folder whose permission bits (copied from a read-only source) forbid writing."""
    try:
        os.chmod(folder, 0o700)
    except OSError:
        pass
    shutil.rmtree(folder, ignore_errors=True)


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on folders
    finally:
        os.close(fd)
