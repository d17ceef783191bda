-- The feedback store's file (feedback.sqlite). IF NOT EXISTS: files written before migrations
-- were versioned (user_version 0) already hold this table.
CREATE TABLE IF NOT EXISTS events (
    event_id TEXT PRIMARY KEY, user_id INTEGER NOT NULL, anime_id INTEGER NOT NULL,
    kind TEXT NOT NULL, score INTEGER, occurred_at REAL, received_at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS events_user ON events(user_id);
