"""Files the pipeline stages hand to each other; dvc.yaml lists the same paths.

The shared model's stages use the module constants. A tenant with a model of its own
(params.yaml `tenants.<id>`) has the same files under its own folders: `layout(tenant)`,
so no stage of one tenant ever reads another's files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Layout:
    """Where one pipeline (the shared one, or a tenant's) keeps each file it hands on."""

    tenant: str | None = None

    def _under(self, top: str) -> Path:
        return Path(top) if self.tenant is None else Path(top) / "tenants" / self.tenant

    @property
    def SNAPSHOT(self) -> Path:  # noqa: N802 - reads like the constants it stands beside
        """A tenant's training data as read from its source, DVC-tracked (`snapshot` stage)."""
        return self._under("data") / "snapshot.parquet"

    @property
    def PRODUCTION(self) -> Path:  # noqa: N802
        """A tenant's labelled production rows the retrain flow exports (`data.production_dir`)."""
        return self._under("data") / "production"

    @property
    def PREPARED(self) -> Path:  # noqa: N802
        return self._under("data") / "prepared"

    @property
    def TRAIN(self) -> Path:  # noqa: N802
        return self.PREPARED / "train.parquet"

    @property
    def HOLDOUT(self) -> Path:  # noqa: N802
        return self.PREPARED / "holdout.parquet"

    @property
    def REFERENCE(self) -> Path:  # noqa: N802
        return self.PREPARED / "reference.parquet"

    @property
    def VALIDATION_REPORT(self) -> Path:  # noqa: N802
        return self._under("reports") / "validation.json"

    @property
    def TRAIN_RUN(self) -> Path:  # noqa: N802
        return self._under("reports") / "train.json"

    @property
    def METRICS(self) -> Path:  # noqa: N802
        return self._under("metrics") / "holdout.json"

    @property
    def CONFUSION(self) -> Path:  # noqa: N802
        return self._under("plots") / "confusion.csv"

    @property
    def ROC(self) -> Path:  # noqa: N802
        return self._under("plots") / "roc.csv"

    @property
    def REGISTER_REPORT(self) -> Path:  # noqa: N802
        return self._under("reports") / "register.json"


def layout(tenant: str | None = None) -> Layout:
    """The files of `tenant`'s pipeline; None: the shared model's."""
    return Layout(tenant)


SHARED = Layout()
PREPARED = SHARED.PREPARED
TRAIN = SHARED.TRAIN
HOLDOUT = SHARED.HOLDOUT
REFERENCE = SHARED.REFERENCE
VALIDATION_REPORT = SHARED.VALIDATION_REPORT
TRAIN_RUN = SHARED.TRAIN_RUN
METRICS = SHARED.METRICS
CONFUSION = SHARED.CONFUSION
ROC = SHARED.ROC
REGISTER_REPORT = SHARED.REGISTER_REPORT
REGISTRY_TARGET = Path("reports/registry_target.json")
"""Which registry (store, environment, model) the pipeline writes to; the shared model's
and every tenant's train/register stages depend on it (`registry-target` stage)."""
