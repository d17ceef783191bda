-- The store of added anime's file (added_anime.sqlite). IF NOT EXISTS: files written before
-- migrations were versioned (user_version 0) already hold this table.
CREATE TABLE IF NOT EXISTS added_anime (
    anime_id INTEGER PRIMARY KEY, fields TEXT NOT NULL, raw_vector BLOB NOT NULL,
    encoder_fingerprint TEXT NOT NULL, updated_at REAL NOT NULL);
