-- The change order replicas follow on PostgreSQL; kept here too so both backends answer the same
-- questions (changes_since). Existing rows get revisions in the order they were last written.
ALTER TABLE added_anime ADD COLUMN revision INTEGER NOT NULL DEFAULT 0;
UPDATE added_anime SET revision = (
    SELECT COUNT(*) FROM added_anime AS o
    WHERE o.updated_at < added_anime.updated_at
       OR (o.updated_at = added_anime.updated_at AND o.anime_id <= added_anime.anime_id));
CREATE INDEX IF NOT EXISTS added_anime_revision ON added_anime(revision);
