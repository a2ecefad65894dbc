"""Tasks and their data: what a task is (model, data, output function), the built-in datasets and
models, how training data is split over owners and corrupted for evaluation, a user's own model,
and the training checkpoints attribution reads."""
