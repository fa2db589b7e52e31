"""Files the pipeline stages hand to each other; dvc.yaml lists the same paths."""

from __future__ import annotations

from pathlib import Path

PREPARED = Path("data/prepared")
TRAIN = PREPARED / "train.parquet"
HOLDOUT = PREPARED / "holdout.parquet"
REFERENCE = PREPARED / "reference.parquet"
VALIDATION_REPORT = Path("reports/validation.json")
TRAIN_RUN = Path("reports/train.json")
METRICS = Path("metrics/holdout.json")
CONFUSION = Path("plots/confusion.csv")
ROC = Path("plots/roc.csv")
REGISTER_REPORT = Path("reports/register.json")
