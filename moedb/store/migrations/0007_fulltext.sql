-- moedb schema v7: a full-text index of passages (FTS5, BM25), kept in step with documents by triggers.
-- Contentless (the text is not stored twice); the title is the passage's metadata.title when it has one.
CREATE VIRTUAL TABLE documents_fts USING fts5(
    title, text, content='', contentless_delete=1, tokenize='porter unicode61 remove_diacritics 2'
);
INSERT INTO documents_fts(rowid, title, text)
    SELECT id, coalesce(json_extract(metadata, '$.title'), ''), text FROM documents ORDER BY id;
CREATE TRIGGER documents_fts_insert AFTER INSERT ON documents BEGIN
    INSERT INTO documents_fts(rowid, title, text)
    VALUES (new.id, coalesce(json_extract(new.metadata, '$.title'), ''), new.text);
END;
CREATE TRIGGER documents_fts_delete AFTER DELETE ON documents BEGIN
    DELETE FROM documents_fts WHERE rowid = old.id;
END;
CREATE TRIGGER documents_fts_update AFTER UPDATE OF text, metadata ON documents BEGIN
    DELETE FROM documents_fts WHERE rowid = old.id;
    INSERT INTO documents_fts(rowid, title, text)
    VALUES (new.id, coalesce(json_extract(new.metadata, '$.title'), ''), new.text);
END;
