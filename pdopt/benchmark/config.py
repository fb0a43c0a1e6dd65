"""The experiment config: one `ml_collections.ConfigDict` with every field, and its typed, validated parts.

`configs/<name>.py` files start from `default_config()` and change what they need; `experiments/run.py`
loads them with `lock_config=True`, so a misspelt override is an error. Fields (times in seconds, SLOs in
milliseconds, sizes in tokens unless said otherwise):

  run_name            results go to `<results_dir>/<run_name>/`.
  results_dir         parent directory of the run directories ("results", git-ignored).
  model               a shipped model ("tiny-code", `pdopt.models.pretrained.REGISTRY`), or a `pdopt.preset` name
                      ("tiny") whose weights are random from `model_seed`.
  model_seed          seed of the random weights.
  hf_dir              a Hugging Face checkpoint directory; when set it replaces `model` / `model_seed`.
  dtype               parameter dtype: "float32", "bfloat16" or "float16".
  policies            comma-separated policy names ("chunked,prefill_first"); see `pdopt.scheduling.POLICIES`.
                      "NAME+MODE" runs a policy with preemption MODE ("recompute" or "swap",
                      `pdopt.EngineConfig.preemption_mode`), so "fair+recompute,fair+swap" sweeps the knob.
  rate                mean arrival rate (req/s) that replaces `workload.rate`; None keeps `workload.rate`
                      (for an Azure trace with trace arrivals, None with `workload.rate` None is real time).
  rates               comma-separated rates ("1,2,4") for a sweep: every policy runs at every rate; "" runs
                      once at `rate`.
  slo                 "ttft:MS tpot:MS" (vLLM's `--goodput`): goodput, SLO attainment, and the targets of
                      `slo_aware` unless `engine.ttft_slo_ms` / `engine.tpot_slo_ms` are set.
  batch_slo           the SLO of batch requests (`workload.batch_fraction`), e.g. "e2el:60000"; "" judges
                      them against `slo`. Every report splits its metrics by priority class.
  warmup              compile every shape bucket of each fresh engine before its timed replay.
  progress            tqdm progress bars.
  max_duration        seconds after which a replay aborts what is left (recorded, never lost); None waits.
  compilation_cache_dir  JAX persistent compilation cache: the engines of one run compile each shape once,
                      and later runs start warm. "" leaves JAX's setting alone.
  deployments         multi-instance deployments run after the policies, one OS process per instance
                      (`pdopt.deploy`): "disaggregated:P:D[:policy[:tp]]" and "colocated:N[:policy[:tp]]",
                      comma-separated (see `pdopt.benchmark.deployments`); "" runs none. With deployments,
                      `policies` may be "" (`colocated:1` is one engine in its own process). With
                      `backend="sim"` they run in the simulator instead (`pdopt.sim.deployment`).
  devices             the devices each deployment places its instances on (0 = all of this host's GPUs, or
                      CPU cores; on CPU each instance keeps to its cores).
  router              how a deployment routes new requests: "least_loaded", "round_robin", "prefix_affinity".
  transfer_timeout_s  a KV transfer between instances not done by then fails; its request starts over.
  tensor_parallel     the policies' engine shards the model over a mesh of all devices with this many along
                      `model` (tensor parallelism; 0 = all devices, 1 = one device, no mesh). Required to span
                      the processes of a multi-process run (`pdopt.sharding.distributed`).
  host_devices        CPU only: `experiments/run.py` splits the host into this many virtual devices (0: no).
  speculative_method  speculative decoding for every policy: "" (off), "draft" or "ngram"
                      (`pdopt.engine.speculative`); not with `deployments`.
  speculative_k       guesses verified per decode and step (k >= 1).
  speculative_draft   the draft of method "draft": a shipped model name (`pdopt.models.pretrained.REGISTRY`,
                      e.g. "tiny-code-draft") or a `pdopt.preset` name (random weights from `model_seed + 1`).
  backend             "real" runs the engine on the devices; "sim" replays the same experiment in the simulator
                      (`pdopt.sim`: the engine's own loop on a virtual clock, each step taking the step-cost
                      model's time; no weights are loaded, only the model's shape), and the results say so.
  cost_model          the step-cost model file (`python -m experiments.profile_steps`) that `slo_aware` and the
                      simulator predict with; "" takes the shipped file of the model's shape on the device
                      (`sim_device` with the simulator), else that device's datasheet roofline.
  sim_device          the device the simulator models when `cost_model` is "": a `jax.Device.device_kind`
                      ("NVIDIA H200", "cpu"); "" is this machine's.
  sim_transfer_gbps, sim_transfer_latency_us   simulated deployments: the KV transfer between a prefill and a
                      decode instance (`python -m experiments.bench_transfer` measures it).
  sim_allreduce_gbps  simulated deployments whose instances span several devices: the all-reduce bus bandwidth
                      that scales the step-cost model to their tensor-parallel degree (0: not given; such a
                      deployment is then an error unless the cost file was profiled at that degree).
  workload.*          fields of `pdopt.workloads.WorkloadConfig` (kind, path, start, num_requests, time_window,
                      rate, arrival, cv, prompt_len, output_len, length_distribution, range_ratio,
                      max_prompt_len, max_output_len, seed, low_token_id, shared_prefix_*, batch_fraction,
                      batch_min_prompt_len, num_clients, client_skew); prompts and outputs are also clamped
                      to `engine.max_model_len`.
  engine.*            fields of `pdopt.EngineConfig` except `policy` (page_size, num_pages,
                      max_num_batched_tokens, max_num_seqs, chunk_size, max_model_len, enable_prefix_caching,
                      ttft_slo_ms, tpot_slo_ms, attention_backend, kv_cache_dtype, seed, async_decode,
                      num_scheduler_steps, preemption_mode, token_buckets, seq_buckets, page_buckets). Few
                      buckets keep the warm-up short on CPU.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Mapping

import ml_collections
from ml_collections import config_dict

from pdopt.engine.config import PREEMPTION_MODES, EngineConfig
from pdopt.engine.speculative import SpeculativeConfig
from pdopt.metrics import Slo, parse_slo
from pdopt.scheduling import POLICIES
from pdopt.workloads import WorkloadConfig
from pdopt.workloads.request import PRIORITY_CLASSES
from pdopt.workloads import traces


class ConfigError(ValueError):
  """An experiment config that cannot run; the message names the field, its value and what is valid."""


def default_config() -> ml_collections.ConfigDict:
  """Every experiment field with its default (see the module docstring). Unset optional fields are typed
  placeholders, so that `--config.rate=4` overrides them from the command line."""
  c = ml_collections.ConfigDict()
  c.run_name = "experiment"
  c.results_dir = "results"
  c.model = "tiny"
  c.model_seed = 0
  c.hf_dir = ""
  c.dtype = "float32"
  c.policies = "chunked,prefill_first,decode_first,slo_aware"
  c.rate = config_dict.placeholder(float)
  c.rates = ""
  c.slo = "ttft:2000 tpot:100"
  c.batch_slo = ""
  c.warmup = True
  c.progress = True
  c.max_duration = config_dict.placeholder(float)
  c.compilation_cache_dir = ""
  c.deployments = ""
  c.devices = 0
  c.router = "least_loaded"
  c.transfer_timeout_s = 30.0
  c.tensor_parallel = 1
  c.host_devices = 0
  c.speculative_method = ""
  c.speculative_k = 4
  c.speculative_draft = ""
  c.backend = "real"
  c.cost_model = ""
  c.sim_device = ""
  c.sim_transfer_gbps = 100.0
  c.sim_transfer_latency_us = 100.0
  c.sim_allreduce_gbps = 0.0

  w = ml_collections.ConfigDict()
  w.kind = "synthetic"
  w.name = config_dict.placeholder(str)
  w.path = config_dict.placeholder(str)
  w.start = 0
  w.num_requests = config_dict.placeholder(int)
  w.time_window = config_dict.placeholder(tuple)
  w.rate = config_dict.placeholder(float)
  w.arrival = config_dict.placeholder(str)
  w.cv = 1.0
  w.prompt_len = 128
  w.output_len = 128
  w.length_distribution = "fixed"
  w.range_ratio = 0.0
  w.max_prompt_len = config_dict.placeholder(int)
  w.max_output_len = config_dict.placeholder(int)
  w.seed = 0
  w.low_token_id = 0
  w.shared_prefix_fraction = 0.0
  w.num_shared_prefixes = 1
  w.shared_prefix_len = 0
  w.batch_fraction = 0.0
  w.batch_min_prompt_len = config_dict.placeholder(int)
  w.num_clients = 0
  w.client_skew = 0.0
  c.workload = w

  e = ml_collections.ConfigDict()
  e.page_size = 16
  e.num_pages = 512
  e.max_num_batched_tokens = 512
  e.max_num_seqs = 64
  e.chunk_size = config_dict.placeholder(int)
  e.max_model_len = config_dict.placeholder(int)
  e.enable_prefix_caching = True
  e.ttft_slo_ms = config_dict.placeholder(float)
  e.tpot_slo_ms = config_dict.placeholder(float)
  e.attention_backend = "auto"
  e.kv_cache_dtype = "auto"
  e.seed = 0
  e.async_decode = False
  e.num_scheduler_steps = 1
  e.preemption_mode = "recompute"
  e.token_buckets = config_dict.placeholder(tuple)
  e.seq_buckets = config_dict.placeholder(tuple)
  e.page_buckets = config_dict.placeholder(tuple)
  c.engine = e
  return c


def as_config(config: ml_collections.ConfigDict | Mapping[str, Any]) -> ml_collections.ConfigDict:
  """`default_config()` updated with `config` (a ConfigDict or a plain nested dict of the fields to set).

  Raises:
    ValueError: a field that does not exist, named.
  """
  base = default_config()
  values = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)
  _update(base, values, "config")
  return base


def _update(target: ml_collections.ConfigDict, values: Mapping[str, Any], prefix: str) -> None:
  for key, value in values.items():
    if key not in target:
      raise ValueError(f"unknown experiment field {prefix}.{key}; valid: {', '.join(sorted(target.keys()))}")
    if isinstance(target[key], ml_collections.ConfigDict):
      if not isinstance(value, Mapping):
        raise ValueError(f"{prefix}.{key} must be a mapping of fields, got {value!r}")
      _update(target[key], value, f"{prefix}.{key}")
    else:
      target[key] = value


def parse_policies(spec: str | tuple[str, ...] | list[str], allow_none: bool = False) -> tuple[str, ...]:
  """Policy names from "a,b" (or a sequence), in order, each checked against the registry; a name may carry a
  preemption mode ("fair+swap").

  Args:
    spec: the names.
    allow_none: an empty list is allowed (a run of deployments only).

  Raises:
    ValueError: an empty list (unless allowed), a repeated name, or an unknown name or mode (listing the valid
      ones).
  """
  names = [n.strip() for n in (spec.split(",") if isinstance(spec, str) else spec)]
  names = [n for n in names if n]
  if not names and not allow_none:
    raise ValueError(f"config.policies is empty; valid: {', '.join(sorted(POLICIES))}")
  for name in names:
    split_policy(name)
  if len(set(names)) != len(names):
    raise ValueError(f"config.policies names a policy twice: {spec!r}")
  return tuple(names)


def split_policy(name: str) -> tuple[str, str | None]:
  """("fair", "swap") from "fair+swap", ("fair", None) from "fair".

  Raises:
    ValueError: an unknown policy or preemption mode (listing the valid ones).
  """
  policy, _, mode = name.partition("+")
  if policy not in POLICIES:
    raise ValueError(f"config.policies: unknown policy {policy!r}; valid: {', '.join(sorted(POLICIES))}")
  if mode and mode not in PREEMPTION_MODES:
    raise ValueError(f"config.policies: {name!r} has preemption mode {mode!r}; valid: "
                     f"{', '.join(PREEMPTION_MODES)}")
  return policy, mode or None


def parse_rates(spec: str | float | tuple[float, ...] | list[float] | None) -> tuple[float, ...]:
  """Sweep rates (req/s) from "1,2,4" (or a sequence); () for no sweep.

  Raises:
    ValueError: a value that is not a positive number, or a repeated rate.
  """
  if spec is None or spec == "":
    return ()
  items = spec.split(",") if isinstance(spec, str) else ([spec] if isinstance(spec, (int, float)) else spec)
  rates = []
  for item in items:
    if isinstance(item, str) and not item.strip():
      continue
    try:
      rate = float(item)
    except (TypeError, ValueError):
      raise ValueError(f"config.rates: {item!r} is not a number of requests/s") from None
    if not rate > 0:
      raise ValueError(f"config.rates: {rate!r} must be > 0 requests/s")
    rates.append(rate)
  if len(set(rates)) != len(rates):
    raise ValueError(f"config.rates repeats a rate: {spec!r}")
  return tuple(rates)


def workload_config(config: ml_collections.ConfigDict, rate: float | None = None) -> WorkloadConfig:
  """The `WorkloadConfig` of `config.workload`, at `rate` (else `config.rate`, else `workload.rate`).

  Raises:
    ValueError: an invalid workload field, named.
  """
  fields = dict(config.workload.to_dict())
  if rate is None:
    rate = config.rate
  if rate is not None:
    fields["rate"] = float(rate)
  if fields.get("time_window") is not None:
    fields["time_window"] = tuple(fields["time_window"])
  return WorkloadConfig(**fields)


def check_paths(config: ml_collections.ConfigDict) -> None:
  """Checks that the files the config names exist: `hf_dir`, `workload.path` and `cost_model`.

  Raises:
    ValueError: a missing file or directory, named with what would be valid.
  """
  if config.hf_dir and not (pathlib.Path(config.hf_dir).expanduser() / "config.json").is_file():
    what = "has no config.json" if pathlib.Path(config.hf_dir).expanduser().is_dir() else "does not exist"
    raise ValueError(f"config.hf_dir={config.hf_dir!r} {what}; valid: a Hugging Face checkpoint directory "
                     "(config.json and *.safetensors), or '' to use config.model")
  if config.workload.path:
    try:
      traces.resolve_trace_path(config.workload.path)
    except ValueError:
      shipped = ", ".join(sorted(str(f.relative_to(traces.REPO_ROOT))
                                 for f in traces.DEFAULT_TRACE_DIR.glob("*.csv")))
      raise ValueError(f"config.workload.path={config.workload.path!r}: no such file; valid: a trace file, "
                       f"absolute or relative to the working directory or the repository (shipped: {shipped})"
                       ) from None
  if config.cost_model and not pathlib.Path(config.cost_model).expanduser().is_file():
    raise ValueError(f"config.cost_model={config.cost_model!r}: no such file; valid: a step-cost file of "
                     "`python -m experiments.profile_steps` (shipped: pdopt/step_costs/*.json), or ''")


BACKENDS = ("real", "sim")


def backend(config: ml_collections.ConfigDict) -> str:
  """The run's backend, checked against what the simulator models.

  Raises:
    ValueError: an unknown backend, or a setting the simulator does not model, named.
  """
  if config.backend not in BACKENDS:
    raise ValueError(f"config.backend={config.backend!r}; valid: {', '.join(BACKENDS)}")
  if config.backend == "sim":
    for field, value, off in (("speculative_method", config.speculative_method, ""),
                              ("engine.async_decode", config.engine.async_decode, False),
                              ("tensor_parallel", config.tensor_parallel, 1)):
      if value != off:
        raise ValueError(f"config.{field}={value!r} is not simulated; with config.backend='sim' it must be {off!r}")
  return config.backend


def slo(config: ml_collections.ConfigDict) -> Slo:
  """The run's SLO (`config.slo`), validated."""
  try:
    return parse_slo(config.slo)
  except ValueError as e:
    raise ValueError(f"config.slo: {e}") from None


def class_slos(config: ml_collections.ConfigDict) -> dict[int, Slo]:
  """{priority: SLO} of the classes judged against their own SLO (`config.batch_slo`), validated."""
  if not config.batch_slo:
    return {}
  try:
    return {PRIORITY_CLASSES.index("batch"): parse_slo(config.batch_slo)}
  except ValueError as e:
    raise ValueError(f"config.batch_slo: {e}") from None


def engine_config(config: ml_collections.ConfigDict, policy: str) -> EngineConfig:
  """The `EngineConfig` of `config.engine` for one policy; SLO targets default to `config.slo`'s.

  Raises:
    ValueError: an unknown policy or an invalid engine field, named.
  """
  fields = dict(config.engine.to_dict())
  target = slo(config)
  if fields.get("ttft_slo_ms") is None:
    fields["ttft_slo_ms"] = target.ttft_ms
  if fields.get("tpot_slo_ms") is None:
    fields["tpot_slo_ms"] = target.tpot_ms
  for name in ("token_buckets", "seq_buckets", "page_buckets"):
    if fields.get(name) is not None:
      fields[name] = tuple(int(b) for b in fields[name])
  unknown = set(fields) - {f.name for f in dataclasses.fields(EngineConfig)}
  if unknown:
    raise ValueError(f"config.engine has fields EngineConfig lacks: {sorted(unknown)}")
  policy, mode = split_policy(policy)
  if mode is not None:
    fields["preemption_mode"] = mode
  return EngineConfig(policy=policy, speculative=speculative_config(config), **fields)


def speculative_config(config: ml_collections.ConfigDict) -> SpeculativeConfig | None:
  """The `speculative_*` fields as a `SpeculativeConfig`, or None when `speculative_method` is "".

  Raises:
    ValueError: an unknown method, a bad k, or method "draft" without `speculative_draft`, named.
  """
  if not config.speculative_method:
    return None
  try:
    spec = SpeculativeConfig(method=config.speculative_method, num_speculative_tokens=config.speculative_k)
  except ValueError as e:
    raise ValueError(f"config.speculative_*: {e}") from None
  if spec.method.value == "draft" and not config.speculative_draft:
    raise ValueError("config.speculative_method='draft' needs config.speculative_draft (a model name)")
  return spec
