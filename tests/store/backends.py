"""Open the same store on either backend, as a ranker replica would: each call is a separate
connection (SQLite: another connection to the file; PostgreSQL: another pool to the database)."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

from anime2vec.feedback import FeedbackStore
from anime2vec.store.added_anime import AddedAnimeStore, PostgresAddedAnimeStore
from anime2vec.store.feedback_postgres import PostgresFeedbackStore
from anime2vec.store.postgres import Database


class Opener:
    """Opens stores of one backend (`where`: a directory for SQLite, a DSN for PostgreSQL) and
    closes everything it opened."""

    def __init__(self, backend: str, where: Path | str):
        self.backend, self.where = backend, where
        self._stack = ExitStack()

    def database(self) -> Database:
        db = Database(str(self.where), max_connections=16)
        self._stack.callback(db.close)
        return db

    def feedback(self):
        if self.backend == "sqlite":
            store = FeedbackStore(Path(self.where) / "feedback.sqlite")
        else:
            store = PostgresFeedbackStore(self.database())
        self._stack.callback(store.close)
        return store

    def added(self):
        if self.backend == "sqlite":
            store = AddedAnimeStore(Path(self.where) / "added_anime.sqlite")
        else:
            store = PostgresAddedAnimeStore(self.database())
        self._stack.callback(store.close)
        return store

    def close(self) -> None:
        self._stack.close()
