"""The Ray Train layer: one `TorchTrainer` run fed by Ray Data, shared by the sweep's trials
(`search`) and production retraining (`production.retrain`). Starting Ray (`cluster`), building
the Datasets (`ingest`), the worker's loop (`worker`, `loop`) and its settings (`loop_config`).
It never imports Tune, Optuna, the sweep or production."""
