"""Reports built from what the stores hold (the Optuna study and its MLflow runs), rebuildable from the stores alone.

From fine_tune it imports only what names and opens the stores (names, track.stores), the metrics (learn.metrics), the
confusion-matrix drawing (track.figures) and the command line's config reader; tests/test_rooms.py holds it to that.
`read` loads a study into pandas, `stats` holds the intervals, bootstrap and McNemar tests, `plots` draws the figures,
`findings` says in words what a study shows, `report`, `hyperparams`, `compare` and `curve` assemble the sections,
`render` writes them as Markdown and self-contained HTML.
"""
