"""One writer at a time; readers never block, and keep their version while they use it.

* The writer takes an exclusive ``fcntl.flock`` on ``MAP/LOCK`` without waiting and writes its
  PID there. A second writer fails at once, naming that PID. The kernel drops the lock when the
  holder exits, however it exits (SIGKILL included): there is no stale lock to clean.
* A reader takes no lock on the map. It reads ``CURRENT`` and holds a *shared* flock on that
  version's manifest (``versions/vNNNNNN.json``) for as long as the loaded map lives: its lease.
* The writer deletes an old version only after taking an *exclusive* flock on its manifest
  without waiting; a version with a reader's lease is kept and tried again by the next writer.
  Segments and index files are deleted only when no kept version lists them.
"""
from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path
from typing import IO, Optional

from .layout import MapError, current_version, version_path

LOCK_NAME = "LOCK"
LEASE_TRIES = 20


class WriterLock:
    """Exclusive, non-blocking writer lock on a map folder (a context manager)."""

    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / LOCK_NAME
        self._file: Optional[IO] = None

    def acquire(self) -> "WriterLock":
        f = open(self.path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                f.close()
                raise
            f.seek(0)
            holder = f.read().strip() or "?"
            f.close()
            raise MapError(f"{self.path.parent}: another process (PID {holder}) is writing this map; "
                           "wait for it to finish (one writer at a time)") from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        self._file = f
        return self

    @property
    def held(self) -> bool:
        return self._file is not None

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing the descriptor drops the flock
            self._file = None

    def __enter__(self) -> "WriterLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


class Lease:
    """A reader's shared flock on one version's manifest; released by ``close`` or at exit."""

    def __init__(self, version: str, file: IO) -> None:
        self.version = version
        self.file = file

    def close(self) -> None:
        self.file.close()


def take_lease(folder: Path) -> Lease:
    """Lease the current version. Never waits: if a writer is deleting the version just read
    from CURRENT (it is no longer current), read CURRENT again."""
    for _ in range(LEASE_TRIES):
        version = current_version(folder)
        path = version_path(folder, version)
        try:
            f = open(path, "rb")
        except FileNotFoundError:
            if current_version(folder) == version:
                raise MapError(f"{path}: missing (the version CURRENT names); rebuild the map") from None
            continue
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
            if os.fstat(f.fileno()).st_ino == os.stat(path).st_ino:
                return Lease(version, f)
        except OSError:
            pass  # being deleted, or already gone: CURRENT has moved on
        f.close()
    raise MapError(f"{folder}: the current version changed {LEASE_TRIES} times while being opened; try again")


def try_claim(path: Path) -> Optional[IO]:
    """An exclusive flock on a version manifest if no reader holds it (for deletion), else None."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return f
    except OSError:
        f.close()
        return None
