-- The stores of record on PostgreSQL: the same tables and columns as the SQLite files
-- (sqlite_feedback/, sqlite_added_anime/), in one database shared by every ranker replica.

-- Feedback events (anime2vec/feedback.py). event_id is the client's idempotency key: a second
-- INSERT of the same id, from any replica, does nothing. seq is the arrival order (SQLite's rowid).
CREATE TABLE events (
    seq          bigint GENERATED ALWAYS AS IDENTITY,
    event_id     text PRIMARY KEY,
    user_id      bigint NOT NULL,
    anime_id     bigint NOT NULL,
    kind         text NOT NULL,
    score        integer,
    occurred_at  double precision,
    received_at  double precision NOT NULL
);
CREATE INDEX events_user ON events (user_id, seq);
CREATE INDEX events_seq ON events (seq);

-- Anime added through UpsertAnime (anime2vec/store/added_anime.py). revision orders the changes
-- every replica follows: writers hold one advisory lock until commit, so revisions become visible
-- in increasing order and "revision > the last one I applied" never skips a change.
CREATE TABLE added_anime (
    anime_id             bigint PRIMARY KEY,
    fields               text NOT NULL,      -- JSON (ASCII-escaped: PostgreSQL text holds no NUL)
    raw_vector           bytea NOT NULL,     -- float32, native byte order, as in SQLite
    encoder_fingerprint  text NOT NULL,
    updated_at           double precision NOT NULL,
    revision             bigint NOT NULL
);
CREATE UNIQUE INDEX added_anime_revision ON added_anime (revision);
