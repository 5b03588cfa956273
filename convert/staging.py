"""The atomic output folder: a hidden staging sibling that becomes the destination only when complete.

Contract: `atomic_folder(dst, overwrite, ...)` takes the destination lock, tidies the partial folders of dead runs,
checks the destination, and yields a staging folder `.<dst>.partial-*`; when the block completes the folder is
fsynced and committed with a rename that never replaces a folder that appeared meanwhile (with `--overwrite` an
atomic exchange, `destination.py`); on any error, Ctrl-C or SIGTERM it is removed, so `dst` is either absent, the
old folder or the complete new checkpoint. `copy_extra_files` copies the source's non-weight files, fsynced;
`write_small_file` writes one small file (index, sidecar) with the source's permission bits, fsynced.
`FSYNC` (env `AUTOMODEL_CONVERT_FSYNC=0` turns it off, for measurements only) governs every fsync before the rename.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .checkpoint import INDEX_NAME, PICKLE_SUFFIXES, SIDECAR_NAME
from .destination import (
    Interrupted,
    check_destination,
    clean_stale_partials,
    commit,
    destination_lock,
    fsync_dir,
    remove_tree,
    signals_deferred,
    sigterm_interrupts,
    staging_path,
)
from .errors import ConvertError

CHUNK = 16 << 20
NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)

# fsync every output file and folder before the final rename (measured cost: see docs); "0" turns it off for
# measurements only.
FSYNC = os.environ.get("AUTOMODEL_CONVERT_FSYNC", "1") != "0"


def fsync_fd(fd: int) -> None:
    if FSYNC:
        os.fsync(fd)


def pwrite_all(fd: int, data: bytes | memoryview, off: int) -> None:
    view = memoryview(data)
    while view:
        k = os.pwrite(fd, view, off)
        view, off = view[k:], off + k


def _remove_quietly(folder: Path) -> None:
    """Remove a staging folder; a second Ctrl-C / SIGTERM must not interrupt it."""
    with signals_deferred():
        remove_tree(folder)


@contextmanager
def atomic_folder(
    dst: Path,
    overwrite: bool,
    *,
    source: Path | None = None,
    force: bool = False,
    notes: list[str] | None = None,
    dir_mode: int | None = None,
) -> Iterator[Path]:
    """Yield a staging folder that becomes `dst` only if the block completes (see `destination.py`)."""
    dst = Path(os.path.abspath(dst))
    if not dst.name:
        raise ConvertError(f"destination {str(dst)!r} is a filesystem root; write to a new folder")
    if not dst.parent.is_dir():
        raise ConvertError(f"the parent folder of {str(dst)!r} does not exist; create it first")
    with sigterm_interrupts(), destination_lock(dst):  # SIGTERM from here on cleans up like Ctrl-C (the lock too)
        tidied = clean_stale_partials(dst)  # first: it may put back a destination a killed run moved aside
        if notes is not None:
            notes.extend(tidied)
        check_destination(dst, source, overwrite, force)
        staging = staging_path(dst)
        try:
            _make_staging(staging, dst)
            yield staging
            if dir_mode is not None:
                os.chmod(staging, dir_mode)
            if FSYNC:
                fsync_dir(staging)
            commit(staging, dst, overwrite, force)
        except BaseException as e:
            if not (isinstance(e, Interrupted) and e.committed):
                _remove_quietly(staging)
            raise


def _make_staging(staging: Path, dst: Path) -> None:
    try:
        staging.mkdir()
    except OSError as e:
        raise ConvertError(f"cannot write to {str(dst.parent)!r} ({e.strerror}); choose a writable destination") from e


def no_space_error(e: OSError, dst: Path) -> ConvertError:
    return ConvertError(
        f"no space left while writing {str(dst)!r} ({e.strerror}); free disk space or choose another destination (nothing was left behind)"
    )


def write_error(e: OSError, dst: Path) -> ConvertError:
    if e.errno in NO_SPACE:
        return no_space_error(e, dst)
    return ConvertError(f"cannot write {str(dst)!r}: {e.strerror or e}; check the destination and free space")


def copy_extra_file(src: Path, dst: Path) -> None:
    """Copy one non-weight file with its permissions and times, fsynced. A failure to read raises an OSError whose
    `filename` is the source path; a failure to write, one whose `filename` is the destination path."""
    with open(src, "rb") as fin, open(dst, "xb") as fout:
        while True:
            try:
                buf = fin.read(CHUNK)
            except OSError as e:
                raise OSError(e.errno, e.strerror, str(src)) from e
            if not buf:
                break
            fout.write(buf)
        fout.flush()
        fsync_fd(fout.fileno())
    shutil.copystat(src, dst)


def copy_extra_files(src: Path, staging: Path, skip: set[str] | None = None) -> list[str]:
    """Copy the source's top-level non-weight files (config, tokenizer, templates...)."""
    copied = []
    for p in sorted(src.iterdir()):
        if not p.is_file() or p.name.startswith("."):
            continue
        if p.name.endswith(".safetensors") or p.name in (INDEX_NAME, SIDECAR_NAME) or p.name.endswith(PICKLE_SUFFIXES):
            continue
        if skip and p.name in skip:
            continue
        try:
            copy_extra_file(p, staging / p.name)
        except OSError as e:
            if e.filename is not None and Path(e.filename) == p:
                raise ConvertError(
                    f"cannot read the source file {p.name!r} ({e.strerror}); check its permissions and disk, or remove it from the source"
                ) from e
            raise
        copied.append(p.name)
    return copied


def write_small_file(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)
        pwrite_all(fd, data, 0)
        fsync_fd(fd)
    finally:
        os.close(fd)
