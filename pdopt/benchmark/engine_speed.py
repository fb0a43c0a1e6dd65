"""The engine on one accelerator against its roofline and against Hugging Face `transformers`.

Parts (all in one run, on one card, for each model shape; random weights in bfloat16):

  decode    engine steps of B running sequences with `context`-token histories: the device time of one
            step (steps dispatched back to back), the engine's wall time per decode step (`Engine.step`
            calls, scheduling and packing included, divided by the tokens each request gained: with
            `num_scheduler_steps` a call advances several) and their difference, the host overhead (the
            device idles meanwhile); the floor is (weight bytes + KV bytes read) / the copy bandwidth
            measured in the same run; on a GPU, a profiler trace of back-to-back steps adds the time the
            device is busy per step, its kernel launches per step and the kernels that take the most time,
            and a trace of engine steps the host's events (`profile`, `step_host_profile` in the JSON).
  prefill   one step over one 8k prompt and over 16 prompts of 512: tokens/s and MFU against the bf16
            matmul rate measured in the same run (the faster of XLA's and PyTorch's); the peer is one
            `transformers` forward pass over the same prompts (logits of the last token only, as ours).
  serving   the Azure conversation trace, time-scaled, through `chunked` and `prefill_first`.
  hf        output tokens/s of the engine and of `transformers` `generate` (greedy, bf16, same weights
            and prompts; batch 1 with the dynamic cache, larger batches with the static cache).

Everything printed is also written to `--out` as JSON.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import statistics
import tempfile
import time
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import pdopt
from pdopt.benchmark import decode_attention as decode_bench
from pdopt.benchmark import timing
from pdopt.benchmark import config as config_lib
from pdopt.benchmark import experiment
from pdopt.engine.batch import ChunkSpec, StepBatch, build
from pdopt.engine.executor import Work
from pdopt.metrics import report
from pdopt.models.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Settings:
  """What one run measures (see the module docstring)."""
  models: tuple[str, ...] = ("llama-3.2-1b",)
  parts: tuple[str, ...] = ("decode", "prefill", "serving", "hf")
  decode_batches: tuple[int, ...] = (1, 16, 64, 256)
  context: int = 2048
  decode_steps: int = 20
  hf_batches: tuple[int, ...] = (1, 64)
  hf_prompt_len: int = 512
  hf_new_tokens: int = 256
  serving_requests: int = 600
  serving_rate: float = 40.0
  serving_policies: tuple[str, ...] = ("chunked", "prefill_first")
  quick: bool = False  # smoke run (`quick()`): the tiny preset, small shapes
  async_decode: bool = False  # EngineConfig.async_decode for every engine of the run
  scheduler_steps: int = 1  # EngineConfig.num_scheduler_steps (with async_decode) for every engine


QUICK_DECODE_BATCHES = (1, 4)  # decode batch sizes of a smoke run unless others are asked for


def quick(s: Settings) -> Settings:
  """A smoke-run version of `s`: the `tiny` preset, short contexts and generations, few requests.

  Decode batch sizes other than the default ones are kept as asked; the default ones become
  `QUICK_DECODE_BATCHES`.
  """
  batches = QUICK_DECODE_BATCHES if s.decode_batches == Settings.decode_batches else s.decode_batches
  return dataclasses.replace(s, models=("tiny",), decode_batches=tuple(batches), context=128,
                             decode_steps=4, hf_batches=(1, 2), hf_prompt_len=32, hf_new_tokens=8,
                             serving_requests=12, serving_rate=4.0, quick=True)


# ----------------------------------------------------------------------------------------- card numbers


def matmul_tflops(quick: bool) -> dict[str, float]:
  """bf16 n x n x n matmul rate in TFLOP/s (n = 8192, 2048 when quick): XLA's, and PyTorch's (cuBLAS) where
  torch has a GPU. MFU is taken against the faster of the two, the card's matrix rate as the best library
  reaches it (on an H200 on 2026-11-28: XLA 618-675, PyTorch 797)."""
  n = 2048 if quick else 8192
  iters = 5 if quick else 20
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
  f = jax.jit(lambda x, y: x @ y)
  out = {"jax": 2 * n ** 3 / timing.time_jax(lambda: f(a, b), iters=iters) / 1e12}
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    return out
  if torch.cuda.is_available():
    ta, tb = (torch.randn(n, n, dtype=torch.bfloat16, device="cuda") for _ in range(2))
    out["torch"] = 2 * n ** 3 / timing.time_torch(lambda: ta @ tb, iters=iters) / 1e12
    del ta, tb
    torch.cuda.empty_cache()
  return out


def weight_bytes(model: pdopt.Transformer) -> int:
  """Bytes of the parameters (each array once, so tied embeddings count once)."""
  leaves = jax.tree_util.tree_leaves(nnx.state(model, nnx.Param))
  return int(sum(x.size * x.dtype.itemsize for x in leaves))


def kv_bytes_per_token(c: ModelConfig) -> int:
  return 2 * c.num_layers * c.num_kv_heads * c.head_dim * jnp.dtype(c.dtype).itemsize


def forward_flops(c: ModelConfig, prompt_lens: Sequence[int]) -> float:
  """Matmul FLOPs of one prefill pass: projections and MLP of every token, causal attention, and the
  logits of each prompt's last token."""
  per_token = 2 * c.num_layers * (c.hidden_size * (c.num_heads + 2 * c.num_kv_heads) * c.head_dim
                                  + c.num_heads * c.head_dim * c.hidden_size
                                  + 3 * c.hidden_size * c.intermediate_size)
  attention = sum(4 * n * n / 2 * c.head_dim * c.num_heads * c.num_layers for n in prompt_lens)
  logits = 2 * len(prompt_lens) * c.hidden_size * c.vocab_size
  return per_token * sum(prompt_lens) + attention + logits


# -------------------------------------------------------------------------------------------- the parts


def _engine(model: pdopt.Transformer, max_seqs: int, max_len: int, budget: int, policy: str,
            async_decode: bool = False, scheduler_steps: int = 1) -> pdopt.Engine:
  c = model.config
  pages_per_seq = -(-max_len // 16)
  return pdopt.Engine(model, pdopt.EngineConfig(
      policy=policy, page_size=16, num_pages=max_seqs * pages_per_seq + 64, max_num_batched_tokens=budget,
      max_num_seqs=max_seqs, max_model_len=min(max_len, c.max_position_embeddings),
      enable_prefix_caching=False, async_decode=async_decode, num_scheduler_steps=scheduler_steps))


def _random_prompts(rng: np.random.Generator, n: int, length: int, vocab: int) -> list[list[int]]:
  return rng.integers(100, vocab - 100, (n, length)).tolist()


def _decode_batch(engine: pdopt.Engine) -> StepBatch:
  """The batch of the engine's next step if every running request decodes one token."""
  requests = [engine.requests[rid] for rid in engine.running]
  return engine.executor.batch([Work(req, req.num_tokens - 1, 1, is_decode=True) for req in requests],
                               decode_only=True)


def device_step_seconds(runner, batch: StepBatch, iters: int) -> float:
  """Device time of one step: `iters` steps dispatched back to back, divided by `iters`."""
  arrays = runner.put(batch)
  jax.block_until_ready(runner.dispatch(arrays))
  times = []
  for _ in range(3):
    start = time.perf_counter()
    out = [runner.dispatch(arrays) for _ in range(iters)]
    jax.block_until_ready(out)
    times.append((time.perf_counter() - start) / iters)
  return min(times)


def host_costs(runner, batch: StepBatch, iters: int = 20) -> tuple[float, float]:
  """Two parts of the host's share of a step: copying the packed batch to the device (until it is there),
  and the time `dispatch` takes to return with the batch already on the device (launch of the compiled
  step). Medians in seconds."""
  puts, launches = [], []
  for _ in range(iters):
    start = time.perf_counter()
    arrays = runner.put(batch)
    jax.block_until_ready(arrays.buffer)
    puts.append(time.perf_counter() - start)
    start = time.perf_counter()
    tokens = runner.dispatch(arrays)
    launches.append(time.perf_counter() - start)
    jax.block_until_ready(tokens)
  return statistics.median(puts), statistics.median(launches)


def bench_decode(model, s: Settings, copy_tbps: float) -> list[dict[str, Any]]:
  c = model.config
  wbytes = weight_bytes(model)
  rng = np.random.default_rng(0)
  extra = (s.decode_steps + 16) * s.scheduler_steps + 16  # timed, 3 to compile, 11 profiled; margin
  engine = _engine(model, max(s.decode_batches), s.context + extra, budget=8192, policy="prefill_first",
                   async_decode=s.async_decode, scheduler_steps=s.scheduler_steps)
  rows = []
  for batch in s.decode_batches:
    prompts = _random_prompts(rng, batch, s.context - 1, c.vocab_size)
    params = pdopt.SamplingParams(max_tokens=extra, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in prompts]
    while any(engine.requests[i].num_generated == 0 for i in ids):  # prefill (and first tokens)
      engine.step()
    for _ in range(3):  # compile the decode shape
      engine.step()
    # Engine time per decode token: a step() may advance several tokens (num_scheduler_steps).
    before = engine.requests[ids[0]].num_generated
    start = time.perf_counter()
    for _ in range(s.decode_steps):
      engine.step()
    wall = (time.perf_counter() - start) / (engine.requests[ids[0]].num_generated - before)
    # Where an engine step's host time goes (Python frames and runtime events; GPU only).
    step_profile = timing.device_profile(engine.step, calls=10, top=40) or {}
    host_batch = _decode_batch(engine)
    device = device_step_seconds(engine.executor.runner, host_batch, iters=s.decode_steps)
    put, launch = host_costs(engine.executor.runner, host_batch)
    arrays = engine.executor.runner.put(host_batch)
    profile = timing.device_profile(lambda: engine.executor.runner.dispatch(arrays), calls=10, top=40) or {}
    context = statistics.mean(engine.requests[i].num_tokens for i in ids)
    kv = batch * context * kv_bytes_per_token(c)
    floor = (wbytes + kv) / (copy_tbps * 1e12)
    rows.append(dict(batch=batch, context=round(context),
                     weight_gb=wbytes / 1e9, kv_gb=kv / 1e9, floor_ms=floor * 1e3, device_ms=device * 1e3,
                     engine_step_ms=wall * 1e3, over_floor=device / floor,
                     host_overhead_ms=(wall - device) * 1e3, host_overhead_pct=100 * (wall - device) / wall,
                     put_ms=put * 1e3, launch_ms=launch * 1e3,
                     gpu_busy_ms=profile.get("busy_us", float("nan")) / 1e3,
                     kernels_per_step=profile.get("kernels", float("nan")),
                     tokens_per_s=batch / wall, profile=profile,
                     step_host_profile=step_profile.get("top_host", [])))
    for i in ids:
      engine.abort(i)
    engine.check_no_leaks()
  return rows


def _prefill_batch(engine: pdopt.Engine, prompts: list[list[int]]) -> StepBatch:
  """A step over whole `prompts` on free pages of the engine (which must be idle)."""
  page_size = engine.config.page_size
  chunks, next_page = [], 0
  for p in prompts:
    n_pages = -(-len(p) // page_size)
    chunks.append(ChunkSpec(token_ids=p, start=0, page_table=list(range(next_page, next_page + n_pages)),
                            temperature=0.0, top_k=0, top_p=1.0, seed=0, token_index=0))
    next_page += n_pages
  assert next_page <= engine.config.num_pages
  shape = (sum(len(p) for p in prompts), len(prompts), max(len(c.page_table) for c in chunks))
  return build(chunks, page_size, shape)


def _torch_model(model: pdopt.Transformer, directory: str):
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  pdopt.save_hf(model, directory)
  hf = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16,
                                                         attn_implementation="sdpa")
  return hf.to("cuda").eval()


def bench_prefill(model, s: Settings, mm_tflops: float, hf_model) -> list[dict[str, Any]]:
  c = model.config
  rng = np.random.default_rng(1)
  shapes = [(1, 8192), (16, 512)] if not s.quick else [(1, 1024), (4, 256)]
  rows = []
  for num, length in shapes:
    prompts = _random_prompts(rng, num, length, c.vocab_size)
    engine = _engine(model, num, length, budget=num * length, policy="chunked")
    seconds = device_step_seconds(engine.executor.runner, _prefill_batch(engine, prompts), iters=5)
    flops = forward_flops(c, [length] * num)
    row = dict(prompts=num, prompt_len=length, ms=seconds * 1e3, tokens_per_s=num * length / seconds,
               tflops=flops / seconds / 1e12, mfu=flops / seconds / 1e12 / mm_tflops)
    if hf_model is not None:
      import torch  # pylint: disable=import-outside-toplevel
      ids = torch.tensor(prompts, device="cuda")
      with torch.inference_mode():
        t = timing.time_torch(lambda: hf_model(input_ids=ids, logits_to_keep=1), warmup=2, iters=5)
      row.update(hf_ms=t * 1e3, hf_tokens_per_s=num * length / t, hf_mfu=flops / t / 1e12 / mm_tflops,
                 ratio_to_hf=t / seconds)
    rows.append(row)
    del engine
  return rows


def bench_generate(model, s: Settings, hf_model) -> list[dict[str, Any]]:
  """Output tokens/s of the engine and of `transformers` `generate` on the same prompts (prefill included)."""
  c = model.config
  rng = np.random.default_rng(2)
  rows = []
  for batch in s.hf_batches:
    prompts = _random_prompts(rng, batch, s.hf_prompt_len, c.vocab_size)
    # 8192 tokens per step (vLLM's default budget): the batch-64 prompts take 4 steps instead of 16, which
    # measured 0.60 vs 0.70 s for the whole 1B run on an H200 (2026-11-28).
    engine = _engine(model, batch, s.hf_prompt_len + s.hf_new_tokens, budget=max(8192, s.hf_prompt_len),
                     policy="chunked", async_decode=s.async_decode, scheduler_steps=s.scheduler_steps)
    params = pdopt.SamplingParams(max_tokens=s.hf_new_tokens, ignore_eos=True)
    engine.generate(prompts, params)  # compiles every shape this run reaches
    start = time.perf_counter()
    outs = engine.generate(prompts, params)
    ours = time.perf_counter() - start
    assert all(len(o.token_ids) == s.hf_new_tokens for o in outs)
    row = dict(batch=batch, prompt_len=s.hf_prompt_len, new_tokens=s.hf_new_tokens, seconds=ours,
               tokens_per_s=batch * s.hf_new_tokens / ours)
    del engine
    if hf_model is not None:
      import torch  # pylint: disable=import-outside-toplevel
      ids = torch.tensor(prompts, device="cuda")
      kwargs = dict(max_new_tokens=s.hf_new_tokens, min_new_tokens=s.hf_new_tokens, do_sample=False,
                    pad_token_id=0)
      if batch > 1:
        kwargs["cache_implementation"] = "static"
      cache = kwargs.get("cache_implementation", "dynamic")
      with torch.inference_mode():
        # With the static cache `generate` compiles the decode step (torch.compile) for the cache's length,
        # prompt + max_new_tokens: the warm-up must be the same call, or the timed run pays the compilation.
        # The dynamic cache runs eagerly and a short warm-up suffices.
        warm = kwargs if cache == "static" else {**kwargs, "max_new_tokens": 8, "min_new_tokens": 8}
        hf_model.generate(ids, **warm)
        torch.cuda.synchronize()
        start = time.perf_counter()
        hf_out = hf_model.generate(ids, **kwargs)
        torch.cuda.synchronize()
        theirs = time.perf_counter() - start
      assert hf_out.shape[1] == s.hf_prompt_len + s.hf_new_tokens
      row.update(hf_cache=cache, hf_seconds=theirs, hf_tokens_per_s=batch * s.hf_new_tokens / theirs,
                 ratio_to_hf=theirs / ours)
    rows.append(row)
  return rows


def bench_serving(model, s: Settings) -> Iterator[tuple[str, dict[str, Any]]]:
  """The Azure conversation trace, time-scaled, under each of `s.serving_policies` (`chunked` and
  `prefill_first` by default): yields (policy, metrics entry) as each run ends, so that the caller can save
  what a run cut short finished."""
  if s.quick:
    # On a CPU the reference attention gathers every query token's context: at the full run's 2048-token
    # steps over 4096-token contexts that is gigabytes. A smoke run keeps steps and contexts small.
    max_len, workload = 512, dict(max_prompt_len=384, max_output_len=64)
    engine = dict(num_pages=1024, max_num_batched_tokens=256, chunk_size=128, max_num_seqs=16,
                  token_buckets=(64, 256), seq_buckets=(16,), page_buckets=(32,))
  else:
    max_len, workload = min(4096, model.config.max_position_embeddings), {}
    engine = dict(num_pages=8192, max_num_batched_tokens=2048, chunk_size=512, max_num_seqs=128,
                  token_buckets=(64, 256, 2048), seq_buckets=(16, 64, 128), page_buckets=(64, 256))
  config = config_lib.as_config(dict(
      dtype="bfloat16", rate=s.serving_rate, slo="ttft:2000 tpot:100",
      workload=dict(kind="azure", name="azure_conv", num_requests=s.serving_requests, seed=0, **workload),
      engine=dict(page_size=16, max_model_len=max_len, enable_prefix_caching=True, async_decode=s.async_decode,
                  num_scheduler_steps=s.scheduler_steps, **engine)))
  workload = experiment.build_workload(config, model)
  for policy in s.serving_policies:
    engine_config = config_lib.engine_config(config, policy)
    run = experiment.run_policy(model, workload, engine_config, slo=config.slo, progress=False,
                                max_duration=240.0)
    print(f"{policy}: warm-up compiled {run.stats['warmup_compilations']} programs in {run.stats['warmup_s']:.0f} s")
    print(report.format_benchmark_result(run.metrics, policy=policy))
    yield policy, run.entry()


def run(out: str | None, settings: Settings) -> dict[str, Any]:
  device = jax.devices()[0]
  copy = decode_bench.copy_bandwidth(settings.quick)
  copy_tbps = max(copy.values())
  mm_rates = matmul_tflops(settings.quick)
  mm = max(mm_rates.values())
  try:
    import torch  # pylint: disable=import-outside-toplevel
    import transformers  # pylint: disable=import-outside-toplevel
    versions = dict(torch=torch.__version__, transformers=transformers.__version__)
    with_hf = torch.cuda.is_available()
  except ImportError:
    versions, with_hf = {}, False
  meta = dict(date=datetime.date.today().isoformat(), device=device.device_kind, jax=jax.__version__,
              copy_tbps=copy, matmul_tflops=mm_rates, settings=dataclasses.asdict(settings), **versions)
  print(f"{device.device_kind}, jax {jax.__version__}, {versions}; copy {copy_tbps:.3g} TB/s, "
        f"bf16 matmul {mm:.3g} TFLOP/s ({', '.join(f'{k} {v:.3g}' for k, v in mm_rates.items())})")
  results: dict[str, Any] = dict(meta=meta)

  def save():  # after every part, so that a run cut short keeps what it measured
    if out:
      with open(out, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2, default=str)

  for name in settings.models:
    cfg = pdopt.preset(name, dtype="bfloat16")
    model = pdopt.init_model(cfg, seed=0)
    res: dict[str, Any] = dict(params=cfg.num_params(), weight_gb=weight_bytes(model) / 1e9)
    hf_model = None
    tmp = tempfile.TemporaryDirectory()
    if with_hf and ({"prefill", "hf"} & set(settings.parts)):
      hf_model = _torch_model(model, tmp.name)
    results[name] = res
    if "decode" in settings.parts:
      res["decode"] = bench_decode(model, settings, copy_tbps)
      _print_rows(f"{name} decode", res["decode"])
      save()
    if "prefill" in settings.parts:
      res["prefill"] = bench_prefill(model, settings, mm, hf_model)
      _print_rows(f"{name} prefill", res["prefill"])
      save()
    if "hf" in settings.parts:
      res["generate"] = bench_generate(model, settings, hf_model)
      _print_rows(f"{name} generate", res["generate"])
      save()
    del hf_model
    tmp.cleanup()
    if "serving" in settings.parts:
      res["serving"] = {}
      for policy, entry in bench_serving(model, settings):
        res["serving"][policy] = entry
        save()
  return results


def _print_rows(title: str, rows: list[dict[str, Any]]) -> None:
  print(f"\n{title}")
  keys = [k for k, v in rows[0].items() if not isinstance(v, (dict, list))]
  print(" | ".join(keys))
  for r in rows:
    print(" | ".join(f"{r[k]:.3g}" if isinstance(r[k], float) else str(r[k]) for k in keys))
