-- The change order replicas follow on PostgreSQL, kept here too so both backends answer the same
-- questions (changes_since). A table beside added_anime rather than a new column: a ranker of an
-- earlier version (a rolled-back image) still writes added_anime as it always did; its rows read as
-- revision 0. Existing rows get revisions in the order they were last written.
CREATE TABLE IF NOT EXISTS added_anime_revision (
    anime_id INTEGER PRIMARY KEY, revision INTEGER NOT NULL);
INSERT OR REPLACE INTO added_anime_revision (anime_id, revision)
    SELECT anime_id, (SELECT COUNT(*) FROM added_anime AS o
                      WHERE o.updated_at < a.updated_at
                         OR (o.updated_at = a.updated_at AND o.anime_id <= a.anime_id))
    FROM added_anime AS a;
CREATE INDEX IF NOT EXISTS added_anime_revision_order ON added_anime_revision(revision);
