"""Start-up recovery of the ranker's state on disk: derived data is rebuilt, records are kept.

Under A2V_RANKER_DATA_DIR:
  qdrant/versions/<v>/  derived from the bundle (and the added anime): a collection that does not
                        open and read back (anime2vec/index/shard_check.py) is moved aside and
                        built again from the bundle
  qdrant/users/<v>/     derived from the feedback store: moved aside, user vectors are recomputed
                        on each user's next request
  qdrant/aliases.json   which version serves: unreadable → moved aside; the ranker serves the
                        configured bundle, else the newest bundle that verifies, and writes a
                        new alias for it
  added_anime.sqlite,   stores of record: unreadable → moved aside (never deleted), an ERROR line
  feedback.sqlite       says where, and the ranker starts with an empty store
Each thing moved aside goes to <data dir>/quarantine/<UTC time>/, its path under the data dir kept,
and gets one log line naming the problem, where it went and what happens instead. The ranker
used to exit with a traceback on each of these and, restarted, fail the same way forever.

The SQLite stores may be shared by several ranker processes on one machine (A2V_RANKER_STORE_DIR,
`make run`): `StoreDirLock` lets one process at a time open them (and recover a damaged one), so two
processes starting together never both move a store aside (the second would move the first one's
fresh empty store), and a store that another running process has open is never moved at all.
"""

from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from anime2vec.index.base import AliasUnreadable, IndexUnavailable
from anime2vec.index.edge import EdgeItemIndex

log = logging.getLogger("services.ranker")
Store = TypeVar("Store")


class StoreUnavailable(Exception):
    """A store that cannot be opened right now (locked, no such directory, I/O error): nothing is
    known about its content, so it is left alone and the ranker does not start."""


def quarantine(path: Path, data_dir: Path) -> Path:
    """Move `path` (and an SQLite file's -wal / -shm beside it) to the quarantine folder; returns
    where it went."""
    try:
        rel = path.resolve().relative_to(data_dir.resolve())
    except ValueError:
        rel = Path(path.name)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]
    dest = data_dir / "quarantine" / stamp / rel
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.rename(path, dest)
    for suffix in ("-wal", "-shm", "-journal"):
        side = path.with_name(path.name + suffix)
        if side.exists():
            os.rename(side, dest.with_name(dest.name + suffix))
    return dest


class StoreDirLock:
    """Two lock files (flock) in a directory of SQLite stores shared by ranker processes:
    `.stores-opening.lock`, held exclusively while a process opens the stores (and recovers a
    damaged one), and `.stores-in-use.lock`, held shared by every process for as long as it has
    them open. The kernel drops both when a process exits, however it exits."""

    OPENING, IN_USE = ".stores-opening.lock", ".stores-in-use.lock"

    def __init__(self, directory: Path, timeout_s: float = 300.0):
        directory.mkdir(parents=True, exist_ok=True)
        self.directory, self.timeout_s = directory, timeout_s
        self._opening = open(directory / self.OPENING, "a")
        self._in_use = open(directory / self.IN_USE, "a")

    @contextmanager
    def opening(self) -> Iterator[None]:
        """One process at a time; StoreUnavailable when another has been opening them for timeout_s."""
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                fcntl.flock(self._opening, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise StoreUnavailable(
                        f"another ranker process has been opening the stores in {self.directory} for "
                        f"{self.timeout_s:.0f} s"
                    ) from None
                time.sleep(0.1)
        try:
            yield
        finally:
            fcntl.flock(self._opening, fcntl.LOCK_UN)

    def alone(self) -> bool:
        """No other process has the stores open (call inside `opening`: none can start meanwhile)."""
        try:
            fcntl.flock(self._in_use, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(self._in_use, fcntl.LOCK_UN)
        return True

    def hold(self) -> None:
        """Mark the stores in use by this process (until close)."""
        fcntl.flock(self._in_use, fcntl.LOCK_SH)

    def close(self) -> None:
        self._opening.close()
        self._in_use.close()


def open_store(
    open_fn: Callable[[Path], Store],
    path: Path,
    data_dir: Path,
    what: str,
    may_move: Callable[[], bool] = lambda: True,
) -> Store:
    """open_fn(path); when the file is not a sound SQLite database: quarantine it, log an ERROR,
    and open an empty store in its place. `what` names the store in the log ("the feedback store").
    A store that cannot be opened for another reason (SQLite's OperationalError: locked by another
    replica on a shared volume, a missing directory, an I/O error) is never moved: StoreUnavailable.
    Neither is an unreadable one while may_move() is False (another ranker process has it open)."""
    try:
        return open_fn(path)
    except sqlite3.OperationalError as e:
        raise StoreUnavailable(f"{what} at {path} cannot be opened: {e}") from e
    except sqlite3.DatabaseError as e:
        if not may_move():
            raise StoreUnavailable(
                f"{what} at {path} is unreadable ({str(e)[:200]}), but another ranker process has it open: "
                f"not moved aside; stop every ranker process that uses {path.parent}, then start again"
            ) from e
        moved = quarantine(path, data_dir)
        log.error(
            "%s at %s is unreadable (%s): moved to %s and kept, NOT deleted; this ranker starts with an "
            "EMPTY store. What it acknowledged before is in the moved file (try `sqlite3 %s .recover`)",
            what,
            path,
            str(e)[:200],
            moved,
            moved,
            extra={"reason": "store_unreadable", "quarantined": str(moved)},
        )
        return open_fn(path)


def recover_alias(index: EdgeItemIndex, data_dir: Path) -> None:
    """An aliases.json that does not name a version is moved aside (the alias is then unset)."""
    try:
        index.alias_target()
    except AliasUnreadable as e:
        moved = quarantine(index.alias_file, data_dir)
        log.error(
            "the collection alias is unreadable (%s): moved to %s; serving the configured bundle or "
            "the newest bundle that verifies, and pointing the alias at it",
            e,
            moved,
            extra={"reason": "alias_unreadable", "quarantined": str(moved)},
        )


def recover_collections(index: EdgeItemIndex, version: str, data_dir: Path) -> None:
    """Check the stored collections of `version` before this process opens them; move a damaged
    one aside (activation then builds the items again from the bundle; users are recomputed)."""
    for kind, check, where, then in (
        ("collection", index.check_stored_version, index.version_dir, "rebuilding it from the bundle"),
        (
            "users collection",
            index.check_stored_users,
            index.users_dir,
            "user vectors are recomputed from the feedback store on each user's next request",
        ),
    ):
        health = check(version)
        if health.in_use:
            raise IndexUnavailable(f"the Qdrant {kind} of {version} at {where(version)} is held by another process")
        if health.problem:
            moved = quarantine(where(version), data_dir)
            log.error(
                "the Qdrant %s of %s is damaged (%s): moved to %s; %s",
                kind,
                version,
                health.problem,
                moved,
                then,
                extra={"reason": "collection_damaged", "quarantined": str(moved)},
            )
