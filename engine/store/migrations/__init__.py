"""Numbered plain-SQL migrations (``NNNN_name.sql``), applied in order by ``engine.store.migrate``.

A file once applied is never edited: the runner refuses a changed checksum.
Add a new numbered file instead.
"""
