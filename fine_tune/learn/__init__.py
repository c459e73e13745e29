"""The learning room: data, models, weights, checkpoints, the frozen-feature cache, LoRA, memory, metrics, threads,
pretraining and the training loop. It knows nothing of Optuna or MLflow (the loop logs through the `Tracker` protocol in
train.py) and imports only the root's light modules (config, archs, errors); tests/test_rooms.py holds it to that."""
