"""moedb schema v8: passage vectors in a sqlite-vec vec0 table partitioned by expert
(moedb/store/vector_index.py). A file that already has documents gets the index now, filled from
documents.embedding; a file without documents gets it with its first document (vec0 fixes the dimension)."""
from moedb.store import vector_index


def migrate(conn):
    row = conn.execute("SELECT length(embedding) FROM documents WHERE embedding IS NOT NULL LIMIT 1").fetchone()
    if row is not None and not vector_index.exists(conn):
        vector_index.create(conn, row[0] // 4)
