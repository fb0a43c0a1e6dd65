"""Fitting the step-cost model (`pdopt.scheduling.step_cost`) to profiled steps.

A profiled step is its feature vector and the seconds it took. The coefficients are the non-negative ones
that minimize the squared *relative* error over the steps (steps range from well under a millisecond to
hundreds, and every step counts alike), by non-negative least squares (Lawson and Hanson, "Solving Least
Squares Problems", 1974, ch. 23) on the rows scaled by 1 / seconds. A coefficient the data does not need
stays 0: a term the device never exercised (dense attention on a GPU) drops out rather than going negative.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from pdopt.scheduling.step_cost import FEATURES, DeviceSpec, ModelSizes, StepCostModel


@dataclasses.dataclass(frozen=True)
class ProfiledStep:
  """One measured step: its shape (for the record), its features (`StepCostModel.features`) and its time.

  Attributes:
    shape: what ran, e.g. {"decodes": 16, "context": 2048, "chunk": 0, "prefix": 0}.
    features: [len(FEATURES)] floats.
    seconds: the measured time (median of repeats).
  """
  shape: dict[str, Any]
  features: tuple[float, ...]
  seconds: float


def nnls(a: np.ndarray, b: np.ndarray, max_iter: int | None = None) -> np.ndarray:
  """argmin ||a x - b|| subject to x >= 0 (Lawson-Hanson active set).

  Args:
    a: [m, n] float64.
    b: [m] float64.
    max_iter: outer iterations at most (default 3n).

  Returns:
    [n] float64, every entry >= 0.
  """
  m, n = a.shape
  x = np.zeros(n)
  passive = np.zeros(n, bool)
  tol = 10 * np.finfo(float).eps * np.linalg.norm(a, 1) * max(m, n)
  for _ in range(max_iter or 3 * n):
    w = a.T @ (b - a @ x)
    if passive.all() or w[~passive].max(initial=-np.inf) <= tol:
      break
    passive[np.argmax(np.where(passive, -np.inf, w))] = True
    while True:
      z = np.zeros(n)
      z[passive] = np.linalg.lstsq(a[:, passive], b, rcond=None)[0]
      if (z[passive] > 0).all():
        x = z
        break
      bad = passive & (z <= 0)
      alpha = np.min(x[bad] / (x[bad] - z[bad]))
      x = x + alpha * (z - x)
      passive &= x > tol
      x[~passive] = 0.0
  return x


def fit(steps: Sequence[ProfiledStep], sizes: ModelSizes, device: DeviceSpec,
        metadata: dict[str, Any] | None = None) -> StepCostModel:
  """The non-negative coefficients that best predict `steps` (relative error), with the fit's residuals.

  Args:
    steps: profiled steps (features computed with these `sizes` and `device`).
    sizes, device: the model shard and the device the features were computed with.
    metadata: provenance to store with the model (device, versions, date, commit, the profiled grid).

  Returns:
    A fitted `StepCostModel`; `metadata["residuals"]` has the median, P90 and largest relative error over
    `steps`, and `metadata["steps"]` each step's shape, measured and predicted milliseconds.

  Raises:
    ValueError: fewer steps than features, or a step whose time is not positive.
  """
  if len(steps) < len(FEATURES):
    raise ValueError(f"fit needs at least {len(FEATURES)} profiled steps, got {len(steps)}")
  a = np.asarray([s.features for s in steps], np.float64)
  y = np.asarray([s.seconds for s in steps], np.float64)
  if not (y > 0).all():
    raise ValueError(f"profiled step times must be > 0 seconds, got {y.min()!r}")
  scale = np.abs(a).max(axis=0)  # Columns of very different units: solve in scaled units.
  scale[scale == 0] = 1.0
  coef = nnls(a / y[:, None] / scale, np.ones(len(y))) / scale
  predicted = a @ coef
  rel = np.abs(predicted - y) / y
  meta = dict(metadata or {})
  meta["residuals"] = {"median_rel_error": float(np.median(rel)), "p90_rel_error": float(np.quantile(rel, 0.9)),
                       "max_rel_error": float(rel.max()), "num_steps": len(steps)}
  meta["steps"] = [{**s.shape, "features": list(s.features), "measured_ms": 1e3 * s.seconds,
                    "predicted_ms": 1e3 * float(p)} for s, p in zip(steps, predicted)]
  return StepCostModel(sizes, device, tuple(float(c) for c in coef), kind="fitted", metadata=meta)
