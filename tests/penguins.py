"""A 3-class table with awkward column names (spaces, dots, a leading digit) for BYOD tests."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

SPECIES = ("Adelie", "Chinstrap", "Gentoo")
TARGET = "species"
DATA: dict[str, Any] = {
    "path": "data/raw/penguins.csv",
    "target": TARGET,
    "production_dir": "data/production",
    "features": {
        "bill length (mm)": {"type": "numeric", "min": 20, "max": 70},
        "flipper.length": {"type": "numeric", "min": 150, "max": 260},
        "3d_score": {"type": "numeric", "min": -10, "max": 10},
        "island name": {"type": "categorical", "categories": ["Biscoe", "Dream", "Torgersen"]},
    },
}
"""The `data` section of params.yaml for this table."""
_CENTRES = {
    "Adelie": (38.8, 190.0, -0.5),
    "Chinstrap": (48.8, 196.0, 0.3),
    "Gentoo": (47.5, 217.0, 0.8),
}


def penguins(
    rows: int, seed: int, mix: tuple[float, float, float] = (0.45, 0.2, 0.35)
) -> pd.DataFrame:
    """Species told apart by bill, flipper and a score (not perfectly); Gentoo live on Biscoe.

    `mix` is the species' shares; 3% of bill lengths are missing.
    """
    rng = np.random.default_rng(seed)
    species = rng.choice(SPECIES, rows, p=mix)
    centre = np.array([_CENTRES[s] for s in species])
    island = np.where(
        species == "Gentoo", "Biscoe", rng.choice(["Biscoe", "Dream", "Torgersen"], rows)
    )
    df = pd.DataFrame(
        {
            "bill length (mm)": centre[:, 0] + rng.normal(0, 3.0, rows),
            "flipper.length": centre[:, 1] + rng.normal(0, 7.0, rows),
            "3d_score": centre[:, 2] + rng.normal(0, 1.0, rows),
            "island name": island,
            TARGET: species,
        }
    )
    df.loc[rng.random(rows) < 0.03, "bill length (mm)"] = np.nan
    return df
