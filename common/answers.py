"""What a scored record becomes: the answer a client reads and the prediction-log row.

One shape for `POST /predict` and for the job workers' results (request id, predicted class,
probabilities, the model name and version that scored it, the variant (`champion` or
`challenger`) it was, `warnings` when out-of-range values are flagged), so a job's answers
are exactly what /predict would have said. A shadow's rows are logged, never answered.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from common.registry.served import ServedModel
from common.store import Prediction


def answer_records(
    served: ServedModel,
    rows: Sequence[dict[str, Any]],
    results: Sequence[Any],
    request_ids: Sequence[str],
    *,
    tenant: str,
    now: datetime,
    per_row_ms: float,
    flagged: Sequence[list[str]] | None = None,
    variant: str = "champion",
) -> tuple[list[dict[str, Any]], list[Prediction]]:
    """Each record's answer and its prediction-log row, in order.

    `results` are `served.scorer.predict(rows)`'s; `flagged` the out-of-range warnings of
    each row (PREDICT_OUT_OF_RANGE=flag), or None; `variant` the alias `served` answers as.
    """
    said: list[dict[str, Any]] = []
    logged: list[Prediction] = []
    for i, (rid, row, result) in enumerate(zip(request_ids, rows, results, strict=True)):
        answer: dict[str, Any] = {
            "request_id": rid,
            "predicted_class": result.label,
            "probabilities": result.probabilities,
            "model_name": served.name,
            "model_version": served.version,
            "variant": variant,
        }
        if flagged is not None:
            answer["warnings"] = flagged[i]
        said.append(answer)
        logged.append(
            Prediction(
                rid,
                now,
                served.name,
                served.version,
                row,
                result.label,
                result.probabilities,
                per_row_ms,
                tenant,
                variant,
            )
        )
    return said, logged
