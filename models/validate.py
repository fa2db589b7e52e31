"""validate: the data contract. Bad data stops the pipeline here, before anything is trained.

Rules come from params.yaml (data.features and the validate section): required columns,
types, ranges, allowed categories, missing share, duplicates, row count, and a target
with at least two classes. The report names the column, the rule and offending rows.
`--tenant <id>` (the `tenant-validate@<id>` stage) checks that tenant's rows by the same contract
(with its `tenants.<id>.validate` overrides), and its message names the tenant.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import pandas as pd

from common import paths
from common.errors import UserError, run_cli
from common.params import DataParams, FeatureSpec, ValidateParams, load_params, stage_tenant


@dataclass(frozen=True)
class Problem:
    """One broken rule: which column, which rule, how many rows, a few examples."""

    column: str
    rule: str
    detail: str
    count: int = 0
    examples: list[dict[str, Any]] = field(default_factory=list)

    def sentence(self) -> str:
        eg = ", ".join(f"row {e['row']}: {e['value']!r}" for e in self.examples)
        return f"column '{self.column}' [{self.rule}]: {self.detail}" + (
            f" (e.g. {eg})" if eg else ""
        )


@dataclass(frozen=True)
class Report:
    source: str
    rows: int
    problems: list[Problem]
    tenant: str | None = None

    @property
    def passed(self) -> bool:
        return not self.problems

    def to_json(self) -> str:
        body = {"source": self.source, "rows": self.rows, "passed": self.passed}
        body |= {"tenant": self.tenant} if self.tenant else {}
        return json.dumps(body | {"problems": [asdict(p) for p in self.problems]}, indent=2)

    def message(self) -> str:
        n = len(self.problems)
        listed = "; ".join(p.sentence() for p in self.problems)
        whose = f"tenant {self.tenant!r}: " if self.tenant else ""
        return (
            f"{whose}{self.source} failed the data contract ({n} problem{'s' * (n != 1)}): "
            f"{listed}. Full report: {paths.layout(self.tenant).VALIDATION_REPORT}. Nothing "
            "after validate ran; the model registry is unchanged."
        )


def _examples(values: pd.Series, k: int) -> list[dict[str, Any]]:
    head = values.head(k)
    return [
        {"row": int(i), "value": _plain(v)}
        for i, v in zip(head.index.tolist(), head.tolist(), strict=True)
    ]


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    return value


def _bound(value: float | None, open_end: str) -> str:
    return open_end if value is None else f"{value:g}"


def _check_numeric(col: str, s: pd.Series, spec: FeatureSpec, k: int) -> list[Problem]:
    problems = []
    numbers = pd.to_numeric(s, errors="coerce") if s.dtype == object else s
    if not pd.api.types.is_numeric_dtype(numbers) or pd.api.types.is_bool_dtype(numbers):
        return [Problem(col, "numeric type", f"expected numbers, found dtype {s.dtype}")]
    bad_type = numbers.isna() & s.notna()
    if bad_type.any():
        problems.append(
            Problem(
                col,
                "numeric type",
                f"{int(bad_type.sum()):,} value(s) are not numbers",
                int(bad_type.sum()),
                _examples(s[bad_type], k),
            )
        )
    finite = numbers.to_numpy(dtype=float, na_value=np.nan)
    infinite = pd.Series(np.isinf(finite), index=s.index)
    if infinite.any():
        problems.append(
            Problem(
                col, "finite", "infinite values", int(infinite.sum()), _examples(s[infinite], k)
            )
        )
    low = spec.min if spec.min is not None else -np.inf
    high = spec.max if spec.max is not None else np.inf
    out = (numbers < low) | (numbers > high)
    out &= ~infinite
    if out.any():
        problems.append(
            Problem(
                col,
                f"range {_bound(spec.min, '-inf')}..{_bound(spec.max, 'inf')}",
                f"{int(out.sum()):,} value(s) out of range",
                int(out.sum()),
                _examples(numbers[out], k),
            )
        )
    return problems


def _check_categorical(col: str, s: pd.Series, spec: FeatureSpec, k: int) -> list[Problem]:
    if spec.categories is None:
        return []
    present = s.dropna()
    present = present[present.astype(str) != ""]
    unseen = ~present.astype(str).isin(spec.categories)
    if not unseen.any():
        return []
    names = sorted({str(v) for v in present[unseen].unique()[:k]})
    return [
        Problem(
            col,
            "allowed categories",
            f"{int(unseen.sum()):,} value(s) outside {spec.categories}: unseen {names}",
            int(unseen.sum()),
            _examples(present[unseen], k),
        )
    ]


def check(df: pd.DataFrame, data: DataParams, params: ValidateParams) -> Report:
    """Apply every rule of the contract; return all problems found, not just the first."""
    k = params.examples
    problems: list[Problem] = []
    required = [data.target, *data.feature_names] + ([data.id_column] if data.id_column else [])
    missing_cols = [c for c in required if c not in df.columns]
    for col in missing_cols:
        problems.append(
            Problem(col, "required column", f"missing; the file has {list(df.columns)}")
        )
    if len(df) < params.min_rows:
        problems.append(
            Problem("*", "row count", f"{len(df):,} rows, need at least {params.min_rows:,}")
        )
    for col, spec in data.features.items():
        if col in missing_cols:
            continue
        s = df[col]
        limit = (
            spec.max_missing_share
            if spec.max_missing_share is not None
            else params.max_missing_share
        )
        share = float(s.isna().mean()) if len(s) else 0.0
        if share > limit:
            problems.append(
                Problem(
                    col,
                    "missing share",
                    f"{share:.1%} missing, at most {limit:.1%} allowed",
                    int(s.isna().sum()),
                )
            )
        if spec.type == "numeric":
            problems.extend(_check_numeric(col, s, spec, k))
        else:
            problems.extend(_check_categorical(col, s, spec, k))
    if data.target not in missing_cols:
        y = df[data.target]
        if y.isna().any():
            problems.append(
                Problem(
                    data.target,
                    "target present",
                    "missing labels",
                    int(y.isna().sum()),
                    _examples(y[y.isna()], k),
                )
            )
        classes = y.dropna().unique()
        if len(df) and len(classes) < 2:
            problems.append(
                Problem(
                    data.target,
                    "two or more classes",
                    f"a single class {[_plain(c) for c in classes]}; a classifier needs two",
                )
            )
    problems.extend(_check_duplicates(df, data, params, missing_cols))
    return Report(source=data.path, rows=len(df), problems=problems)


def _check_duplicates(
    df: pd.DataFrame, data: DataParams, params: ValidateParams, missing_cols: list[str]
) -> list[Problem]:
    if not len(df):
        return []
    key = [data.id_column] if data.id_column and data.id_column not in missing_cols else None
    dup = df.duplicated(subset=key, keep="first")
    share = float(dup.mean())
    if share <= params.max_duplicate_share:
        return []
    what = f"duplicate {data.id_column}" if key else "duplicate rows"
    return [
        Problem(
            key[0] if key else "*",
            "duplicates",
            f"{share:.2%} {what}, at most {params.max_duplicate_share:.2%} allowed",
            int(dup.sum()),
            _examples(
                df.loc[dup, key[0]] if key else pd.Series(df.index[dup], index=df.index[dup]),
                params.examples,
            ),
        )
    ]


def run(data: DataParams, params: ValidateParams, where: paths.Layout = paths.SHARED) -> Report:
    """Check train and holdout together (the whole raw table) and write the report."""
    df = pd.concat([pd.read_parquet(where.TRAIN), pd.read_parquet(where.HOLDOUT)]).sort_index()
    report = replace(check(df, data, params), tenant=where.tenant)
    where.VALIDATION_REPORT.parent.mkdir(parents=True, exist_ok=True)
    where.VALIDATION_REPORT.write_text(report.to_json() + "\n")
    if not report.passed:
        raise UserError(report.message())
    return report


def main() -> None:
    tenant = stage_tenant()
    params = load_params().for_tenant(tenant)
    report = run(params.data, params.validate_, paths.layout(tenant))
    print(f"validate: {report.rows:,} rows of {report.source} meet the data contract")


if __name__ == "__main__":
    run_cli(main)
