"""What an experiment's run directory holds and where it came from (`docs/results.md` defines every field).

`run_experiment` validates the whole config first (a config that fails writes nothing), then
`prepare_run_dir` gives it a directory of its own: a rerun with the same `run_name` never mixes its files with
an earlier run's (it gets `<run_name>_2`, `_3`, ... unless told to overwrite, which first removes the files an
earlier run wrote there). When every run has ended, `write_run` writes:

  metrics.json   `{run: entry}`, one flat entry per run (a policy or a deployment, at one rate): the metrics
                 under vLLM's names, the engine stats (`experiment.ENGINE_STATS_KEYS`, "policy" and "rate"
                 among them) and the run's provenance (`PROVENANCE_KEYS`). A run is named by its policy
                 ("chunked"), or "policy@rate" ("chunked@4") in a rate sweep: the same shape either way.
  requests.csv   one row per request of every run: "run", "policy", "rate", then
                 `pdopt.metrics.REQUEST_COLUMNS`; arrival times count from the start of their run.
  ttft_cdf.png, tpot_cdf.png   latency CDFs over every request (those that never finished keep the curve
                 below 1.0), one curve per policy, one panel per rate of a sweep, the SLO drawn.
  goodput_vs_rate.png          with a sweep only: request goodput against the offered rate, per policy.
"""

from __future__ import annotations

import datetime
import json
import pathlib
import platform
import re
import socket
import subprocess
from typing import Any, Mapping

import jax

from pdopt import metrics as metrics_lib

# Where a run came from, stored in every metrics.json entry (see docs/results.md).
PROVENANCE_KEYS: tuple[str, ...] = (
    "date",  # when the run started, ISO 8601 UTC ("2026-12-06T16:40:02Z").
    "git_commit",  # the commit of pdopt's checkout ("" when it is not a git checkout).
    "git_dirty",  # the checkout had changes not committed (null when unknown).
    "device_kind",  # `jax.devices()[0].device_kind` ("cpu", "NVIDIA H200").
    "device_count",  # devices JAX saw, over all processes.
    "process_count",  # JAX processes of the run.
    "jax_version",  # jax.__version__.
    "jaxlib_version",  # jaxlib's version.
    "python_version",  # the interpreter's version.
    "host",  # the host name of process 0.
)

# The files a run writes; `prepare_run_dir(overwrite=True)` removes only these.
RESULT_FILES: tuple[str, ...] = ("config.json", "metrics.json", "requests.csv", "ttft_cdf.png", "tpot_cdf.png",
                                 "goodput_vs_rate.png")

_RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._=+-]*")


def rate_key(rate: float) -> str:
  """How a sweep rate is spelled in run names ("0.5", "2")."""
  return f"{rate:g}"


def run_label(policy: str, rate: float | None) -> str:
  """The name of one run in metrics.json and requests.csv: the policy, or "policy@rate" in a sweep."""
  return policy if rate is None else f"{policy}@{rate_key(rate)}"


def check_run_name(run_name: str) -> None:
  """Raises ValueError unless `run_name` is one plain directory name ("quickstart", "sweep-2")."""
  if not isinstance(run_name, str) or not _RUN_NAME.fullmatch(run_name):
    raise ValueError(f"config.run_name={run_name!r}; valid: a directory name of letters, digits and ._=+- "
                     "(no '/'), e.g. 'quickstart'")


def prepare_run_dir(results_dir: str | pathlib.Path, run_name: str, overwrite: bool = False) -> pathlib.Path:
  """Creates the directory of a new run.

  Args:
    results_dir: the parent of every run directory.
    run_name: the run's name (`check_run_name`).
    overwrite: reuse `<results_dir>/<run_name>` after removing the files an earlier run wrote there;
      otherwise a directory that already holds files is left alone and the run gets the first free
      `<run_name>_<i>` (i = 2, 3, ...).

  Returns:
    The new, empty run directory.

  Raises:
    ValueError: a bad run name, or `overwrite` of a directory holding files no run writes (named).
  """
  check_run_name(run_name)
  base = pathlib.Path(results_dir) / run_name
  if overwrite and base.is_dir():
    foreign = sorted(p.name for p in base.iterdir() if p.name not in RESULT_FILES)
    if foreign:
      raise ValueError(f"will not overwrite {base}/: it holds files no run writes ({', '.join(foreign[:5])}); "
                       "choose another config.run_name or config.results_dir")
    for name in RESULT_FILES:
      (base / name).unlink(missing_ok=True)
  run_dir = base
  i = 2
  while run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
    run_dir = base.with_name(f"{run_name}_{i}")
    i += 1
  run_dir.mkdir(parents=True, exist_ok=True)
  return run_dir


def provenance(start: datetime.datetime | None = None, devices: tuple[str, int] | None = None) -> dict[str, Any]:
  """Where a run came from: `PROVENANCE_KEYS`.

  Args:
    start: when the run started (default: now).
    devices: (kind, count) of devices this process does not use itself (a deployment's router, whose
      instances run in their own processes); None: this process's JAX devices.

  Returns:
    {key: value} for every `PROVENANCE_KEYS` key.
  """
  start = start or datetime.datetime.now(datetime.timezone.utc)
  commit, dirty = _git_state(pathlib.Path(__file__).resolve().parents[2])
  try:
    import jaxlib  # pylint: disable=import-outside-toplevel
    jaxlib_version = jaxlib.__version__
  except (ImportError, AttributeError):
    jaxlib_version = ""
  out = {
      "date": start.astimezone(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
      "git_commit": commit,
      "git_dirty": dirty,
      "device_kind": devices[0] if devices else jax.devices()[0].device_kind,
      "device_count": devices[1] if devices else jax.device_count(),
      "process_count": 1 if devices else jax.process_count(),
      "jax_version": jax.__version__,
      "jaxlib_version": jaxlib_version,
      "python_version": platform.python_version(),
      "host": socket.gethostname(),
  }
  assert tuple(out) == PROVENANCE_KEYS
  return out


def _git_state(repo: pathlib.Path) -> tuple[str, bool | None]:
  """(commit, dirty) of the checkout at `repo`; ("", None) when git or the checkout is missing."""
  def git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True,
                          timeout=20).stdout

  try:
    commit = git("rev-parse", "HEAD").strip()
  except (OSError, subprocess.SubprocessError):
    return "", None
  try:
    # Untracked files count (a new policy module changes what runs); ignored ones (results/) do not.
    dirty = bool(git("status", "--porcelain").strip())
  except (OSError, subprocess.SubprocessError):
    dirty = None
  return commit, dirty


def write_run(run_dir: pathlib.Path, runs: Mapping[str, Any], *, sweep: bool, slo: metrics_lib.Slo,
              model: str, workload: str) -> dict[str, dict[str, Any]]:
  """Writes metrics.json, requests.csv and the plots of an experiment's runs.

  Args:
    run_dir: the run directory (`prepare_run_dir`).
    runs: run name (`run_label`) -> its `experiment.PolicyRun`, in report order; `entry()` must already hold
      the provenance.
    sweep: whether the runs are a rate sweep (one CDF panel per rate, and goodput_vs_rate.png).
    slo: the SLO, drawn on the CDFs.
    model: the model's name for the plot titles.
    workload: the workload's name for the plot titles.

  Returns:
    The metrics.json content.
  """
  metrics_json = {name: run.entry() for name, run in runs.items()}
  (run_dir / "metrics.json").write_text(json.dumps(metrics_json, indent=2) + "\n")
  metrics_lib.write_requests_csv(
      {name: run.records for name, run in runs.items()}, run_dir / "requests.csv",
      policy={name: run.policy for name, run in runs.items()},
      rate={name: run.stats["rate"] for name, run in runs.items()},
      start={name: run.replay.start for name, run in runs.items()})

  panels: dict[str, dict[str, Any]] = {}  # rate label -> policy -> records
  for run in runs.values():
    panels.setdefault(f"{rate_key(run.stats['rate'])} req/s", {})[run.policy] = run.records
  subject = f"{model}, {workload}"
  for metric, bound in (("ttft", slo.ttft_ms), ("tpot", slo.tpot_ms)):
    title = f"{metric.upper()} CDF: {subject}"
    if not sweep:
      title += f", {next(iter(panels))}"
    metrics_lib.plot_latency_cdfs(panels if sweep else {"": next(iter(panels.values()))},
                                  run_dir / f"{metric}_cdf.png", metric=metric, title=title, log_x=None,
                                  slo_ms=bound)
  if sweep:
    points: dict[str, list[tuple[float, float]]] = {}
    for run in runs.values():
      points.setdefault(run.policy, []).append((run.stats["rate"], run.metrics.request_goodput))
    metrics_lib.plot_goodput_vs_rate(points, run_dir / "goodput_vs_rate.png",
                                     title=f"goodput vs rate: {subject} ({str(slo) or 'no SLO'})")
  return metrics_json


def say_where(run_dir: pathlib.Path, results_dir: str | pathlib.Path, run_name: str) -> str:
  """The closing line of a run: where it wrote, and why there when an earlier run kept the usual place."""
  base = pathlib.Path(results_dir) / run_name
  if run_dir == base:
    return f"wrote {run_dir}/"
  return f"wrote {run_dir}/ ({base}/ holds an earlier run; pass --overwrite to replace it)"

