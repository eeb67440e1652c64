"""PostgreSQL, the record: the schema (``migrations/``), its runner, typed queries.

``engine.store.migrate.migrate(dsn)`` applies pending migrations;
``engine.store.queries`` holds the queries the engine, writer and API share.
"""
