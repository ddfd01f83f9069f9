-- contract (0003): the second step of notes.body -> notes.text, shipped one release
-- after 0002. It runs once no release that may serve still reads or writes body:
-- the release that shipped 0002 reads and writes text only, so it (the release
-- before this one) runs on this schema too. What expand kept for older code goes.
DROP TRIGGER IF EXISTS notes_text_and_body ON notes;
DROP FUNCTION IF EXISTS notes_text_and_body();
ALTER TABLE notes DROP COLUMN IF EXISTS body;
ALTER TABLE notes ALTER COLUMN text SET NOT NULL;
