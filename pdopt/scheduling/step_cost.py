"""The step-cost model: how long an engine step takes, predicted from what it holds.

A step runs `T` tokens of `S` sequences; sequence s has `q_s` query tokens and attends to `kv_s` keys (its
cached prefix plus its queries). Its time is modelled as roofline terms, each in seconds on the device,
weighted by coefficients fitted to profiled real steps (`pdopt.sim.fit`):

  seconds = c_step                                    fixed cost of a step (host work, launches)
          + c_token * T + c_seq * S                   per padded token and per padded sequence
          + c_linear * max(W / BW, (F_tok * T + F_seq * S) / PEAK)
                                                      the weight matmuls: memory-bound (weight bytes W over
                                                      the bandwidth) until the token count makes them
                                                      compute-bound (F_tok FLOPs per token, F_seq per
                                                      sequence for the logits, over the matmul rate)
          + c_attention * sum_s A * q_s * (kv_s - (q_s - 1) / 2) / PEAK
                                                      causal attention FLOPs (A per query-key pair)
          + c_kv * sum_s kv_s * B_kv / BW             KV bytes read (B_kv per token, all layers)
          + c_dense * A * T * K / PEAK                attention over every padded key: the `jnp` reference
                                                      (CPUs) gathers each token's sequence into K padded
                                                      keys, whatever the sequence's length
          + c_waiting * N_waiting                     the host's work that grows with the queue (the policy
                                                      sees every waiting request at every step)

`T`, `S` and `K` are the padded sizes the engine compiles (its shape buckets; K = pages * page_size) where
they are known; `ModelSizes`
holds W, F_tok, F_seq, A and B_kv of one tensor-parallel shard, `DeviceSpec` BW and PEAK. With every
coefficient 1 and no fixed costs (`StepCostModel.roofline`), the model is a roofline estimate from the
model's shape and the device's datasheet alone, a lower bound that ignores the host.

Policies (`slo_aware`) and the simulator predict with the same object; it is plain host data. A fitted model
is stored as JSON (`save`, `load`): coefficients, sizes, device, and the provenance and residuals of its fit.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from typing import Any, Literal, Sequence, get_args

import numpy as np

FEATURES: tuple[str, ...] = ("step", "token", "seq", "linear", "attention", "kv", "dense_attention", "waiting")

# "scaled": fitted (or a roofline) at one tensor-parallel degree, its sizes divided for another, plus the
# all-reduces of tensor parallelism from a measured collective bandwidth (`with_tensor_parallel`).
CostKind = Literal["fitted", "roofline", "scaled"]
COST_KINDS: tuple[str, ...] = get_args(CostKind)


@dataclasses.dataclass(frozen=True)
class ModelSizes:
  """What a step's cost depends on, of one tensor-parallel shard of the model and its KV cache.

  Attributes:
    weight_bytes: parameter bytes a step reads.
    flops_per_token: matmul FLOPs per token of the weight matmuls (q/k/v, o, MLP), 2 per multiply-add.
    flops_per_seq: matmul FLOPs of one sequence's logits (2 * hidden * vocab).
    attention_flops: FLOPs per query-key pair over all layers (2 matmuls, 2 FLOPs per multiply-add).
    kv_bytes_per_token: bytes of one token's K and V (and quantization scales) over all layers.
    tensor_parallel: the shards the model is split into (the sizes are one shard's).
  """
  weight_bytes: float
  flops_per_token: float
  flops_per_seq: float
  attention_flops: float
  kv_bytes_per_token: float
  tensor_parallel: int = 1


@dataclasses.dataclass(frozen=True)
class DeviceSpec:
  """A device's roofline: `memory_bandwidth` in bytes/s and `matmul_flops` in FLOP/s (dense bf16 matmuls on
  accelerators, float32 on CPUs); `host_bandwidth` in bytes/s between the device and host memory (swapping
  pages out and in; the default is PCIe 5.0 x16's usable rate, about 25 GB/s each way, where unmeasured);
  `source` says where the numbers come from (a datasheet, a measurement)."""
  name: str
  memory_bandwidth: float
  matmul_flops: float
  source: str = "datasheet"
  host_bandwidth: float = 25e9


# Vendors' datasheets (dense, no sparsity), keyed by `jax.Device.device_kind`.
DATASHEETS: dict[str, DeviceSpec] = {
    "NVIDIA H100 80GB HBM3": DeviceSpec("NVIDIA H100 80GB HBM3", 3.35e12, 989e12),
    "NVIDIA H200": DeviceSpec("NVIDIA H200", 4.8e12, 989e12),
    "NVIDIA A100-SXM4-80GB": DeviceSpec("NVIDIA A100-SXM4-80GB", 2.0e12, 312e12),
    "TPU v5 lite": DeviceSpec("TPU v5 lite", 8.19e11, 197e12),
    "TPU v6 lite": DeviceSpec("TPU v6 lite", 1.64e12, 918e12),
    # A generic server CPU core pair: no datasheet applies; fitted models replace it.
    "cpu": DeviceSpec("cpu", 2.0e10, 1.0e11, source="nominal"),
}


def datasheet(device_kind: str) -> DeviceSpec:
  """The datasheet of `device_kind`, or the nominal CPU entry for a device kind not in the table."""
  return DATASHEETS.get(device_kind, dataclasses.replace(DATASHEETS["cpu"], name=device_kind))


@dataclasses.dataclass(frozen=True)
class AllReduce:
  """Tensor parallelism's all-reduces in a step: `per_step` of them (2 per layer: after attention and after
  the MLP), each of `bytes_per_token` per token of the step, over `bandwidth` bytes/s (bus bandwidth, so the
  ring's 2 (n - 1) / n is in it) after `latency` seconds; `source` names the measurement."""
  per_step: int
  bytes_per_token: float
  bandwidth: float
  latency: float
  source: str = ""

  def seconds(self, num_tokens):
    return self.per_step * (self.latency + self.bytes_per_token * num_tokens / self.bandwidth)


@dataclasses.dataclass(frozen=True)
class StepCostModel:
  """Predicts a step's seconds (see the module docstring).

  Attributes:
    sizes: the model shard's sizes.
    device: the device's roofline numbers.
    coefficients: one per `FEATURES` entry.
    kind: "fitted" (coefficients from profiled steps) or "roofline" (all terms at face value).
    source: where it came from (a file, or the roofline's device), for results to name.
    metadata: the fit's provenance (device, versions, date, commit, residuals) as stored in its file.
    allreduce: tensor parallelism's all-reduces, added to every step, or None (the fit has them in its terms).
  """
  sizes: ModelSizes
  device: DeviceSpec
  coefficients: tuple[float, ...]
  kind: CostKind = "fitted"
  source: str = ""
  metadata: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False)
  allreduce: AllReduce | None = None

  def __post_init__(self):
    if len(self.coefficients) != len(FEATURES):
      raise ValueError(f"StepCostModel.coefficients has {len(self.coefficients)} values; valid: one per feature "
                       f"{FEATURES}")
    if self.kind not in COST_KINDS:
      raise ValueError(f"StepCostModel.kind={self.kind!r}; valid: {', '.join(COST_KINDS)}")

  @classmethod
  def roofline(cls, sizes: ModelSizes, device: DeviceSpec) -> StepCostModel:
    """The model's shape against the device's roofline, no fixed costs."""
    return cls(sizes, device, (0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0), kind="roofline",
               source=f"roofline of {device.name} ({device.source})")

  def features(self, query_lens: Sequence[int], kv_lens: Sequence[int], num_tokens: int | None = None,
               num_seqs: int | None = None, max_keys: int | None = None, num_waiting: int = 0) -> np.ndarray:
    """The feature vector of one step.

    Args:
      query_lens: tokens each sequence runs this step.
      kv_lens: keys each sequence attends to (its cached tokens plus its queries).
      num_tokens, num_seqs, max_keys: the padded sizes the step runs at: tokens, sequences, and keys per
        sequence (pages * page_size); None: the real ones (the longest `kv_lens` for the keys).
      num_waiting: requests waiting when the step was planned.

    Returns:
      [len(FEATURES)] float64, in the order of `FEATURES`.
    """
    return self.totals_features(*_totals(query_lens, kv_lens, num_tokens, num_seqs, max_keys), num_waiting)

  def totals_features(self, num_tokens: float, num_seqs: float, attention_pairs: float, kv_tokens: float,
                      dense_pairs: float, num_waiting: float = 0.0) -> np.ndarray:
    """`features` from a step's totals: tokens, sequences, causal query-key pairs (sum of
    q * (kv - (q - 1) / 2)), keys read (sum of kv), padded query-key pairs (tokens * keys per sequence) and
    waiting requests."""
    m, d = self.sizes, self.device
    linear = max(m.weight_bytes / d.memory_bandwidth,
                 (m.flops_per_token * num_tokens + m.flops_per_seq * num_seqs) / d.matmul_flops)
    return np.asarray([1.0, num_tokens, num_seqs, linear, m.attention_flops * attention_pairs / d.matmul_flops,
                       m.kv_bytes_per_token * kv_tokens / d.memory_bandwidth,
                       m.attention_flops * dense_pairs / d.matmul_flops, float(num_waiting)])

  def seconds(self, query_lens: Sequence[int], kv_lens: Sequence[int], num_tokens: int | None = None,
              num_seqs: int | None = None, max_keys: int | None = None, num_waiting: int = 0) -> float:
    """Predicted seconds of one step (arguments as for `features`)."""
    return float(self.totals_seconds(*_totals(query_lens, kv_lens, num_tokens, num_seqs, max_keys), num_waiting))

  def totals_seconds(self, num_tokens: float, num_seqs: float, attention_pairs, kv_tokens, dense_pairs,
                     num_waiting: float = 0.0):
    """`seconds` from a step's totals (`totals_features`), in scalar arithmetic (policies call it many times
    per decision); `attention_pairs`, `kv_tokens` and `dense_pairs` may also be arrays of several steps' totals
    (the simulator's blocks), which give the same results element by element."""
    m, d, c = self.sizes, self.device, self.coefficients
    linear = max(m.weight_bytes / d.memory_bandwidth,
                 (m.flops_per_token * num_tokens + m.flops_per_seq * num_seqs) / d.matmul_flops)
    return (c[0] + c[1] * num_tokens + c[2] * num_seqs + c[3] * linear
            + (c[4] * attention_pairs + c[6] * dense_pairs) * m.attention_flops / d.matmul_flops
            + c[5] * m.kv_bytes_per_token * kv_tokens / d.memory_bandwidth + c[7] * num_waiting
            + (self.allreduce.seconds(num_tokens) if self.allreduce is not None else 0.0))

  def decode_block_seconds(self, kv_lens: Sequence[int], num_steps: int, num_tokens: int | None = None,
                           num_seqs: int | None = None, max_keys: int | None = None) -> np.ndarray:
    """Seconds of each of `num_steps` decode steps in a row, every sequence one token per step, its keys one
    more at each step (`kv_lens` at the first), at fixed padded sizes. Every term is linear in the keys, so
    the times are an arithmetic sequence: [num_steps] float64."""
    first = self.seconds([1] * len(kv_lens), kv_lens, num_tokens, num_seqs, max_keys)
    c, m, d = self.coefficients, self.sizes, self.device
    n = len(kv_lens)
    per_step = c[4] * m.attention_flops * n / d.matmul_flops + c[5] * m.kv_bytes_per_token * n / d.memory_bandwidth
    return first + per_step * np.arange(num_steps)

  def alone_seconds(self, prompt_len: int, output_len: int, chunk: int) -> float:
    """A request's end-to-end seconds alone on an idle engine: its prompt in chunks of at most `chunk` tokens
    (the first token at the end of the last), then `output_len - 1` decode steps of one sequence."""
    seconds, done = 0.0, 0
    while done < prompt_len:
      q = min(chunk, prompt_len - done)
      seconds += self.seconds([q], [done + q])
      done += q
    if output_len > 1:
      seconds += float(self.decode_block_seconds([prompt_len + 1], output_len - 1).sum())
    return seconds

  def with_tensor_parallel(self, tp: int, allreduce: AllReduce) -> StepCostModel:
    """The model of the same shape sharded `tp` ways: weights, FLOPs and KV bytes per shard divided accordingly
    (the fitted efficiencies kept), plus `allreduce`; this model itself at its own degree.

    Raises:
      ValueError: a degree that is not a positive int.
    """
    if not isinstance(tp, int) or tp < 1:
      raise ValueError(f"tensor-parallel degree {tp!r}; valid: an int >= 1")
    if tp == self.sizes.tensor_parallel:
      return self
    f = self.sizes.tensor_parallel / tp
    m = self.sizes
    sizes = ModelSizes(m.weight_bytes * f, m.flops_per_token * f, m.flops_per_seq * f, m.attention_flops * f,
                       m.kv_bytes_per_token * f, tp)
    return dataclasses.replace(self, sizes=sizes, kind="scaled", allreduce=allreduce if tp > 1 else None,
                               source=f"{self.source} scaled from TP {m.tensor_parallel} to TP {tp} "
                                      f"(all-reduce: {allreduce.source})")

  # ------------------------------------------------------------------ files

  def to_json(self) -> dict[str, Any]:
    return {"features": list(FEATURES), "coefficients": list(self.coefficients), "kind": self.kind,
            "sizes": dataclasses.asdict(self.sizes), "device": dataclasses.asdict(self.device), **self.metadata}

  def save(self, path: str | pathlib.Path) -> None:
    pathlib.Path(path).write_text(json.dumps(self.to_json(), indent=2) + "\n")

  @classmethod
  def load(cls, path: str | pathlib.Path) -> StepCostModel:
    """Reads a cost file.

    Raises:
      ValueError: a missing or unreadable file, or a missing or malformed field, naming the file and the field.
    """
    path = pathlib.Path(path)
    try:
      data = json.loads(path.read_text())
    except FileNotFoundError:
      raise ValueError(f"cost model file {str(path)!r} does not exist") from None
    except (OSError, json.JSONDecodeError) as e:
      raise ValueError(f"cost model file {str(path)!r} is not readable JSON: {e}") from None
    if not isinstance(data, dict):
      raise ValueError(f"cost model file {str(path)!r}: expected a JSON object, got {type(data).__name__}")

    def field(name: str, kind: type = object):
      if name not in data:
        raise ValueError(f"cost model file {str(path)!r}: missing field {name!r}")
      if not isinstance(data[name], kind):
        raise ValueError(f"cost model file {str(path)!r}: field {name!r} must be a {kind.__name__}, got "
                         f"{data[name]!r:.60}")
      return data[name]

    if field("features", list) != list(FEATURES):
      raise ValueError(f"cost model file {str(path)!r}: field 'features' is {data['features']}; valid: "
                       f"{list(FEATURES)}")
    coefficients = field("coefficients", list)
    if len(coefficients) != len(FEATURES) or not all(_finite(c) for c in coefficients):
      raise ValueError(f"cost model file {str(path)!r}: field 'coefficients' must be {len(FEATURES)} finite numbers, "
                       f"got {coefficients!r:.80}")
    sizes = _record(path, "sizes", field("sizes", dict), ModelSizes)
    device = _record(path, "device", field("device", dict), DeviceSpec)
    metadata = {k: v for k, v in data.items() if k not in ("features", "coefficients", "kind", "sizes", "device")}
    try:
      return cls(sizes, device, tuple(float(c) for c in coefficients), kind=data.get("kind", "fitted"),
                 source=str(path), metadata=metadata)
    except ValueError as e:
      raise ValueError(f"cost model file {str(path)!r}: {e}") from None


def _totals(query_lens: Sequence[int], kv_lens: Sequence[int], num_tokens: int | None, num_seqs: int | None,
            max_keys: int | None) -> tuple[float, float, float, float, float]:
  """A step's totals (`StepCostModel.totals_features`) from its sequences (token counts) and padded sizes.

  In Python's arithmetic: a step has tens of sequences, too few for NumPy to pay, and every total of integer
  counts is exact (the pairs too: q * (q - 1) / 2 is a whole number), whatever the order of the sums."""
  t = float(sum(query_lens)) if num_tokens is None else float(num_tokens)
  keys = float(max(kv_lens, default=0)) if max_keys is None else float(max_keys)
  pairs = sum([q * kv - q * (q - 1) // 2 for q, kv in zip(query_lens, kv_lens)])
  return (t, float(len(query_lens)) if num_seqs is None else float(num_seqs), float(pairs), float(sum(kv_lens)),
          t * keys)


def _finite(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _record(path: pathlib.Path, name: str, values: dict, kind: type):
  fields = {f.name: f for f in dataclasses.fields(kind)}
  for key in values:
    if key not in fields:
      raise ValueError(f"cost model file {str(path)!r}: field '{name}.{key}' is unknown; valid: {sorted(fields)}")
  for key, f in fields.items():
    if key not in values:
      if f.default is dataclasses.MISSING:
        raise ValueError(f"cost model file {str(path)!r}: missing field '{name}.{key}'")
      continue
    value = values[key]
    if f.type in ("float", "int") and (not _finite(value) or value < 0):
      raise ValueError(f"cost model file {str(path)!r}: field '{name}.{key}' must be a number >= 0, got {value!r}")
  return kind(**values)
