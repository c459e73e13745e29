"""Reports built from what the stores hold (the Optuna study and its MLflow runs); never imports fine_tune.

`stores` loads a study into pandas, `stats` holds the bootstrap and McNemar tests, `plots` draws the figures,
`report` and `compare` assemble the sections, `render` writes them as Markdown and self-contained HTML.
"""
