"""Stores of record: feedback events and the anime added at run time.

Two backends behind one interface each (the same methods; typed as `AnyAddedAnimeStore` in added_anime.py
and `AnyFeedbackStore` in feedback_postgres.py):
- SQLite files beside the ranker (anime2vec/feedback.py, added_anime.py): the
  embedded default, for one ranker on one machine (`make run`);
- PostgreSQL (postgres.py, feedback_postgres.py, added_anime.py):
  one database shared by every ranker replica and read by retraining, when a DSN is configured.
Schemas are versioned SQL under anime2vec/store/sql/, migrated at start-up (migrations.py).
"""
