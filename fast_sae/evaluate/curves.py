"""Training curves from a run's metrics.jsonl, and whether an SAE's training had plateaued.

Why in the evaluation: a comparison of regimes is only fair when every SAE was trained to the same
standard, i.e. long enough that more training would not change its metrics much. The train stage
logs windowed means of the training MSE and L0 every ``log_every`` steps (``metrics.jsonl``
beside each run's checkpoint folders, lines with ``split: train``); this module reads them back.

Plateau criterion (``plateau``), stated once here and in docs/metrics.md: over the second half of
the run the training MSE without position 0 (``mse_no_pos0``; runs that predate it: the all-token
``mse``, which the attention sink dominates) fell by less than ``MSE_TOLERANCE`` (5%) and L0 moved by less than
``L0_TOLERANCE`` (10%), comparing the mean of the logged points in (40%, 50%] of the steps with the
mean of those in (90%, 100%]. In words: doubling the training from half to full length bought less
than 5% MSE. A training MSE that *rose* by 5% or more over the second half is not a plateau
either (``mse_rose_second_half``: the run is unstable, e.g. latents dying faster than AuxK revives
them). The last fifth of a run decays the learning rate to zero, so a flat end alone would
prove nothing; the comparison spans the whole second half.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

METRICS_FILE = "metrics.jsonl"
MSE_TOLERANCE = 0.05
L0_TOLERANCE = 0.10
MID_WINDOW = (0.4, 0.5)
END_WINDOW = (0.9, 1.0)


def load_curve(metrics_file: Path, sae_name: str) -> dict[str, np.ndarray] | None:
    """The logged training points of one SAE: steps, tokens, mse (raw units), l0, explained variance."""
    try:
        lines = metrics_file.read_text().splitlines()
    except OSError:
        return None
    pts = []
    for line in lines:
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if isinstance(r, dict) and r.get("split") == "train" and r.get("sae") == sae_name:
            pts.append(r)
    if not pts:
        return None
    pts.sort(key=lambda r: r["step"])

    def col(key: str) -> np.ndarray:
        return np.array([float(r[key]) if r.get(key) is not None else np.nan for r in pts])

    return {"step": col("step"), "tokens": col("tokens"), "mse": col("mse"), "l0": col("l0"),
            "explained_variance": col("explained_variance"), "mse_no_pos0": col("mse_no_pos0")}


def _window_mean(curve: dict[str, np.ndarray], key: str, window: tuple[float, float]) -> float | None:
    total = curve["step"][-1]
    m = (curve["step"] > window[0] * total) & (curve["step"] <= window[1] * total) & np.isfinite(curve[key])
    return float(curve[key][m].mean()) if m.any() else None


def plateau(curve: dict[str, np.ndarray]) -> dict[str, Any]:
    """The plateau criterion of the module docstring: ``{plateaued, mse_drop_second_half, l0_change_second_half}``."""
    key = "mse_no_pos0" if np.isfinite(curve.get("mse_no_pos0", np.array([np.nan]))).all() else "mse"
    mse_mid, mse_end = _window_mean(curve, key, MID_WINDOW), _window_mean(curve, key, END_WINDOW)
    l0_mid, l0_end = _window_mean(curve, "l0", MID_WINDOW), _window_mean(curve, "l0", END_WINDOW)
    if mse_mid is None or mse_end is None or not mse_mid > 0:
        return {"plateaued": None, "mse_drop_second_half": None, "l0_change_second_half": None,
                "note": "too few logged points to judge"}
    drop = (mse_mid - mse_end) / mse_mid
    l0_change = abs(l0_end - l0_mid) / l0_mid if l0_mid and l0_end is not None else 0.0
    rose = bool(drop <= -MSE_TOLERANCE)
    return {"plateaued": bool(abs(drop) < MSE_TOLERANCE and l0_change < L0_TOLERANCE), "mse_drop_second_half": drop,
            "mse_rose_second_half": rose, "l0_change_second_half": l0_change,
            "mse_tokens": "without position 0" if key == "mse_no_pos0" else
            "all tokens (the run logged no sink-free MSE)",
            "criterion": f"training MSE fell < {MSE_TOLERANCE:.0%} and L0 moved < {L0_TOLERANCE:.0%} between the "
                         f"mean of steps ({MID_WINDOW[0]:.0%}, {MID_WINDOW[1]:.0%}] and ({END_WINDOW[0]:.0%}, "
                         f"{END_WINDOW[1]:.0%}]"}


def training_summary(sae_path: Path) -> dict[str, Any] | None:
    """The curve summary of the SAE at ``sae_path`` (a checkpoint folder inside a run folder), or None."""
    metrics = Path(sae_path).parent / METRICS_FILE
    curve = load_curve(metrics, Path(sae_path).name)
    if curve is None:
        return None
    return {"metrics_file": str(metrics), "steps": int(curve["step"][-1]), "tokens": int(curve["tokens"][-1]),
            "final_mse": float(curve["mse"][-1]), "final_mse_no_pos0": _finite_or_none(curve["mse_no_pos0"][-1]),
            "final_l0": float(curve["l0"][-1]), **plateau(curve)}


def _finite_or_none(v: float) -> float | None:
    return float(v) if np.isfinite(v) else None
