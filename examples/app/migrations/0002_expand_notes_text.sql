-- expand (0002): notes.body becomes notes.text, in two releases. This first step
-- only adds and relaxes, so the release before it runs on this schema unchanged
-- (it serves while this migrates, and stays a rollback target):
--   * text, a new nullable column, filled from body;
--   * body may be left out now (the new code writes text only);
--   * a trigger fills whichever of the two an insert leaves out, so rows written
--     by either release read the same in both.
ALTER TABLE notes ADD COLUMN IF NOT EXISTS text text;
UPDATE notes SET text = body WHERE text IS NULL;
ALTER TABLE notes ALTER COLUMN body DROP NOT NULL;

CREATE OR REPLACE FUNCTION notes_text_and_body() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.text := COALESCE(NEW.text, NEW.body);
    NEW.body := COALESCE(NEW.body, NEW.text);
    RETURN NEW;
END
$$;
DROP TRIGGER IF EXISTS notes_text_and_body ON notes;
CREATE TRIGGER notes_text_and_body BEFORE INSERT ON notes
    FOR EACH ROW EXECUTE FUNCTION notes_text_and_body();
