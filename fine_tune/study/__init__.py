"""The study room: Optuna sweeps and their workers, samplers and pruners, the inputs a study resolves once, the
pre-flight checks, single runs (train once, reproduce), seed confirmation and the label-efficiency curve. It
composes the learning and tracking rooms; nothing below it imports it."""
