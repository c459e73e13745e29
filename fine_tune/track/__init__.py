"""The tracking room: where runs and trials are stored and how: the stores (SQLite, PostgreSQL, an MLflow server),
MLflow runs and their one lifecycle, the registry, provenance, figures logged with runs, and interrupt-safe writes.
It may import the learning room and the root, never the study room; MLflow is imported only here."""
