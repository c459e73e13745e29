"""fine_tune: fine-tune pretrained PyTorch models with Optuna studies tracked end to end in MLflow.

Three rooms and a light root: `learn/` (data, models, the training loop; no Optuna, no MLflow), `track/` (stores,
MLflow runs, registry, provenance), `study/` (sweeps, workers, single runs, confirm, curve). The root holds the CLI,
the one config type, its search space, the experiment reader, the architectures' names, the names every store
shares (names.py) and the user errors; none of it imports torch, Optuna or MLflow.
"""
