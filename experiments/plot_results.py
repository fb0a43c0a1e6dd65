"""The README's result charts, drawn from the benchmark JSON files kept in `docs/benchmarks/`.

  python -m experiments.plot_results [--data_dir=docs/benchmarks] [--out_dir=docs/benchmarks]

Writes four PNG files:

  prefill_attention.png   TFLOP/s of the paged prefill kernel against its peers (prefill_attention_h200.json).
  decode_attention.png    effective TB/s of paged decode against its peers, with the card's copy bandwidth and
                          datasheet (decode_attention_h200.json).
  engine_decode.png       the engine's decode step against its floor (engine_decode_h200.json).
  policies_azure.png      the scheduling policies on the Azure conversation trace: goodput, SLO attainment and
                          P99 TTFT against the offered rate (policies_azure_sim.json, the metrics.json of a rate
                          sweep of `configs/validate_gpu.py` in the simulator with the shipped H100 step costs;
                          command in BENCHMARKS.md).

Each JSON names its card, versions, date, commit and command; each chart's title names the card and date.
BENCHMARKS.md holds the same numbers as tables.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

from absl import app, flags

from pdopt.benchmark import cli

_DATA = flags.DEFINE_string("data_dir", "docs/benchmarks", "Directory of the benchmark JSON files.")
_OUT = flags.DEFINE_string("out_dir", "docs/benchmarks", "Directory for the PNG files.")


def _figure(width: float, height: float, cols: int = 1):
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=import-outside-toplevel
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
  fig = Figure(figsize=(width, height), dpi=110)
  FigureCanvasAgg(fig)
  return fig, fig.subplots(1, cols, squeeze=False)[0]


def _mid(value: Any) -> float:
  """A number, or the middle of a [low, high] range."""
  return sum(value) / 2 if isinstance(value, list) else float(value)


def _bars(ax, groups: list[str], series: dict[str, list[float | None]], ylabel: str) -> None:
  """Grouped bars: one group per x label, one bar per series (None: no bar)."""
  width = 0.8 / len(series)
  for i, (name, values) in enumerate(series.items()):
    xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
    ax.bar([x for x, v in zip(xs, values) if v is not None], [v for v in values if v is not None], width,
           label=name)
  ax.set_xticks(range(len(groups)))
  ax.set_xticklabels(groups)
  ax.set_ylabel(ylabel)
  ax.grid(True, axis="y", alpha=0.3)


def prefill_chart(data: dict[str, Any], path: pathlib.Path) -> pathlib.Path:
  """TFLOP/s per shape, ours against the peers."""
  shown = ["ours", "cuDNN (JAX)", "tokamax mosaic", "torch cuDNN", "Pallas mgpu f16", "torch flash", "ours triton"]
  rows = data["rows"]
  fig, (ax,) = _figure(10, 4.2)
  _bars(ax, [f"K={r['kv_heads']}\nS={r['seq_len']}" for r in rows], {n: [r[n] for r in rows] for n in shown},
        "TFLOP/s (causal)")
  ax.set_title(f"Prefill attention, bf16, 32 heads, D=128: ours on 16-token pages, peers on contiguous K/V\n"
               f"{data['card']}, JAX {data['versions']['jax']}, {data['date']}, commit {data['commit']}",
               fontsize=10)
  ax.set_ylim(0, 1.25 * max(v for r in rows for n in shown if (v := r[n]) is not None))  # room for the legend
  ax.legend(fontsize=8, ncol=4, loc="upper left")
  return _save(fig, path)


def decode_chart(data: dict[str, Any], path: pathlib.Path) -> pathlib.Path:
  """Effective TB/s per shape (page 16), ours against the peers, under the copy bandwidth and datasheet."""
  shown = {"ours bf16": "ours bf16", "ours int8": "ours int8", "JAX paged_attention": "JAX paged_attention",
           "XLA": "XLA (contiguous)", "torch SDPA": "torch SDPA (contiguous)"}
  rows = [r for r in data["rows"] if r["page_size"] == 16]
  fig, (ax,) = _figure(10, 4.2)
  _bars(ax, [f"B={r['batch']}\nL={r['kv_len']}" for r in rows],
        {label: [r[k]["tbps"] if r[k] else None for r in rows] for k, label in shown.items()},
        "effective TB/s (K+V bytes / time)")
  ax.axhline(data["copy_tbps"]["torch"], color="0.3", linestyle="--", linewidth=1,
             label=f"copy bandwidth {data['copy_tbps']['torch']} TB/s")
  ax.axhline(data["datasheet_tbps"], color="0.6", linestyle=":", linewidth=1,
             label=f"datasheet {data['datasheet_tbps']} TB/s")
  ax.set_title(f"Paged decode attention, 32/8 heads, D=128, page 16 (device time)\n"
               f"{data['card']}, JAX {data['versions']['jax']}, {data['date']}, commit {data['commit']}", fontsize=10)
  ax.set_ylim(0, 1.3 * data["datasheet_tbps"])  # room for the legend
  ax.legend(fontsize=8, ncol=3, loc="upper left")
  return _save(fig, path)


def engine_chart(data: dict[str, Any], path: pathlib.Path) -> pathlib.Path:
  """Floor, device time and busy time of a decode step per batch size: the 1B shape's synchronous engine and
  the 8B shape's blocks of 4 steps (with the engine's time per token)."""
  panels = [("1B", "synchronous"), ("8B", "blocks of 4 steps")]
  fig, axes = _figure(10, 4.2, cols=2)
  for ax, (model, engine) in zip(axes, panels):
    rows = [r for r in data["rows"] if r["model"] == model and r["engine"] == engine]
    series = {"floor": [_mid(r["floor_ms"]) for r in rows], "device": [_mid(r["device_ms"]) for r in rows],
              "GPU busy": [_mid(r["busy_ms"]) for r in rows]}
    if all(r["engine_ms_per_token"] is not None for r in rows):
      series["engine per token"] = [_mid(r["engine_ms_per_token"]) for r in rows]
    _bars(ax, [f"batch {r['batch']}\n{_mid(r['device_over_floor']):.2f}x floor" for r in rows], series,
          "ms per decode step")
    ax.set_title(f"Llama-{'3.2-1B' if model == '1B' else '3.1-8B'} shape, {engine}, 2k-token histories",
                 fontsize=9)
    ax.legend(fontsize=8)
  fig.suptitle(f"The engine's decode step against its floor ((weights + KV) / copy bandwidth)\n"
               f"{data['card']}, JAX {data['versions']['jax']}, {data['date']}", fontsize=10)
  return _save(fig, path)


def policies_chart(metrics: dict[str, dict[str, Any]], path: pathlib.Path) -> pathlib.Path:
  """Goodput, SLO attainment and P99 TTFT against the offered rate, one line per policy (a metrics.json of a
  rate sweep)."""
  by_policy: dict[str, list[dict[str, Any]]] = {}
  for entry in metrics.values():
    by_policy.setdefault(entry["policy"], []).append(entry)
  first = next(iter(metrics.values()))
  fig, axes = _figure(12, 3.8, cols=3)
  for ax, (key, label) in zip(axes, [("request_goodput", "goodput (req/s)"), ("slo_attainment", "SLO attainment"),
                                     ("p99_ttft_ms", "P99 TTFT of finished requests (ms)")]):
    for policy, entries in by_policy.items():
      entries = sorted(entries, key=lambda e: e["rate"])
      ax.plot([e["rate"] for e in entries], [e[key] for e in entries], marker="o", label=policy)
    ax.set_xlabel("offered rate (req/s)")
    ax.set_ylabel(label)
    ax.grid(True, alpha=0.3)
  axes[0].legend(fontsize=8)
  where = (f"simulated with {pathlib.Path(first['step_cost']).name}" if first["backend"] == "sim"
           else f"{first['device_kind']} x{first['device_count']}")
  fig.suptitle(f"Scheduling policies on the Azure conversation trace (SLO {first['slo']} ms)\n"
               f"{where}, JAX {first['jax_version']}, {first['date'][:10]}, commit {first['git_commit'][:7]}",
               fontsize=10)
  return _save(fig, path)


def _save(fig, path: pathlib.Path) -> pathlib.Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.tight_layout()
  fig.savefig(path, format="png")
  return path


def plot_all(data_dir: pathlib.Path, out_dir: pathlib.Path) -> list[pathlib.Path]:
  """Draws the four charts from the JSON files in `data_dir` into `out_dir`; returns the paths written."""
  def load(name: str) -> Any:
    return json.loads((data_dir / name).read_text())

  return [
      prefill_chart(load("prefill_attention_h200.json"), out_dir / "prefill_attention.png"),
      decode_chart(load("decode_attention_h200.json"), out_dir / "decode_attention.png"),
      engine_chart(load("engine_decode_h200.json"), out_dir / "engine_decode.png"),
      policies_chart(load("policies_azure_sim.json"), out_dir / "policies_azure.png"),
  ]


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    cli.fail(f"unexpected arguments: {' '.join(argv[1:])}; valid: --data_dir, --out_dir")
  data_dir = pathlib.Path(_DATA.value)
  if not data_dir.is_dir():
    cli.fail(f"--data_dir={_DATA.value}: no such directory; valid: docs/benchmarks")
  for path in plot_all(data_dir, pathlib.Path(_OUT.value)):
    print(f"wrote {path}")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.flags_parser())
