"""The continuous-batching engine.

Each `step()`:
1. builds a read-only `SchedulerView` and asks the policy for a `Plan`;
2. carries it out on the host: rejections, preemptions (pages freed, the request goes back to the front
   of the waiting queue and will recompute), admissions (the longest cached prefix is matched, pages are
   allocated for exactly the scheduled tokens);
3. packs the chunks into one ragged batch padded to a shape bucket and runs one compiled forward pass
   that writes K/V into the pages and samples on the device;
4. appends tokens, stamps times, registers newly full pages in the prefix cache, and frees the pages of
   finished requests.

Every request ends exactly once (finished, aborted or rejected); the policy decides what runs, the engine
never silently drops work.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import math
import time
from typing import Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from pdopt import sharding

from pdopt.cache.block_manager import BlockManager
from pdopt.cache.kv_cache import KV_QUANT_KINDS
from pdopt.engine import runner as runner_lib
from pdopt.engine.batch import Buckets, ChunkSpec, geometric_buckets, pack
from pdopt.engine.multi_step import multi_step_impl
from pdopt.engine.request import Request, RequestOutput, RequestStatus, SamplingParams, validate_prompt
from pdopt.engine.runner import ModelRunner
from pdopt.engine.speculative import SpecStats, SpeculativeConfig, SpeculativeDecoder
from pdopt.metrics import RequestRecord
from pdopt.models.transformer import Transformer
from pdopt.scheduling import RequestView, SchedulerView, SchedulingConfig, make_scheduler


@dataclasses.dataclass(frozen=True)
class EngineConfig:
  """Engine settings.

  Attributes:
    policy: scheduling policy name (see `pdopt.scheduling.POLICIES`).
    page_size: tokens per KV page.
    num_pages: pages in the pool (all layers share page ids).
    max_num_batched_tokens: token budget of one step.
    max_num_seqs: sequences in one step.
    chunk_size: largest prompt chunk per request per step (None: the token budget).
    max_model_len: longest prompt + output (tokens); None takes the model's context length.
    enable_prefix_caching: share full pages between requests with the same prefix.
    ttft_slo_ms, tpot_slo_ms: targets for `slo_aware`.
    attention_backend: "auto", "reference" or "pallas".
    kv_cache_dtype: "auto" stores K/V in the model dtype; "int8" or "fp8" (e4m3) store them quantized with
      a float32 scale per (KV head, token), quantized when written and dequantized inside attention.
    seed: draws per-request seeds for requests that give none.
    handoff_after_prefill: a prefill instance of disaggregated serving: once a request has its first token
      (and is not finished), it leaves the running set with its pages held, for `take_handoffs`.
    token_buckets, seq_buckets, page_buckets: padded sizes; None derives geometric buckets (factor 4, from
      16 tokens, 1 sequence and 4 pages).
    speculative: speculative decoding (`pdopt.engine.speculative`), or None; method "draft" needs
      `Engine(..., draft_model=...)`. Guesses only use token budget and pages the policy left free.
    async_decode: overlap the host with the device while decoding steadily. A step made only of decodes is
      dispatched without waiting for its tokens; the next `step()` asks the policy about the state after
      it and, if the answer is the same sequences decoding one more token each (nothing waiting, no
      preemption, no length limit reached), dispatches that step at once with its input tokens taken from
      the previous step's output on the device, and only then reads the previous step's tokens and does
      its bookkeeping while the new step runs. Outputs are identical to the synchronous engine; a request
      that stops on a stop token has one more token computed and dropped. Not with `speculative`,
      `handoff_after_prefill` or a mesh.
    num_scheduler_steps: with `async_decode`, the chained steps of steady decoding run this many decode
      steps in one device program (`pdopt.engine.multi_step`), so the host's work per step is paid once
      per that many tokens; each program is dispatched while the previous one runs. A block runs only
      when every request has room for all its tokens (max_tokens, max_model_len) and the pool has their
      pages; otherwise single steps are chained. Outputs stay identical to the synchronous engine; a
      request that stops on a stop token mid-block has the rest of the block computed and dropped, a
      request that arrives waits for the block in flight, and the tokens of a block reach the outputs
      together (their ITLs are bursts).
  """
  policy: str = "chunked"
  page_size: int = 16
  num_pages: int = 512
  max_num_batched_tokens: int = 512
  max_num_seqs: int = 64
  chunk_size: int | None = None
  max_model_len: int | None = None
  enable_prefix_caching: bool = True
  ttft_slo_ms: float | None = None
  tpot_slo_ms: float | None = None
  attention_backend: str = "auto"
  kv_cache_dtype: str = "auto"
  seed: int = 0
  handoff_after_prefill: bool = False
  token_buckets: tuple[int, ...] | None = None
  seq_buckets: tuple[int, ...] | None = None
  page_buckets: tuple[int, ...] | None = None
  speculative: SpeculativeConfig | None = None
  async_decode: bool = False
  num_scheduler_steps: int = 1

  def scheduling(self) -> SchedulingConfig:
    return SchedulingConfig(policy=self.policy, max_num_batched_tokens=self.max_num_batched_tokens,
                            max_num_seqs=self.max_num_seqs, chunk_size=self.chunk_size,
                            ttft_slo_ms=self.ttft_slo_ms, tpot_slo_ms=self.tpot_slo_ms)


class Engine:
  """Serves requests on one model with continuous batching over a paged KV cache.

  Args:
    model: the Transformer.
    config: EngineConfig.
    clock: returns seconds; injectable so tests and replays control time.
    mesh: a device mesh (`pdopt.sharding.make_mesh`); the model is sharded onto it (tensor parallelism
      over its `model` axis) and the KV cache with its KV heads. None runs on the default device.
    draft_model: the draft of `EngineConfig.speculative` with method "draft" (same vocabulary; it gets
      its own KV pool of `num_pages` pages).
  """

  def __init__(self, model: Transformer, config: EngineConfig | None = None,
               clock: Callable[[], float] = time.perf_counter, mesh: Mesh | None = None,
               draft_model: Transformer | None = None):
    config = config or EngineConfig()
    self.config = config
    self.model_config = model.config
    self.clock = clock
    self.max_model_len = config.max_model_len or model.config.max_position_embeddings
    for name in ("page_size", "num_pages"):
      if not isinstance(getattr(config, name), int) or getattr(config, name) < 1:
        raise ValueError(f"EngineConfig.{name} must be an int >= 1, got {getattr(config, name)!r}")
    if self.max_model_len > model.config.max_position_embeddings:
      raise ValueError(f"EngineConfig.max_model_len={self.max_model_len} exceeds the model's context "
                       f"{model.config.max_position_embeddings}")
    self.policy = make_scheduler(config.scheduling())
    self.block_manager = BlockManager(config.num_pages, config.page_size, config.enable_prefix_caching)
    max_pages = math.ceil(self.max_model_len / config.page_size)
    self.buckets = Buckets(
        tokens=tuple(config.token_buckets or geometric_buckets(16, config.max_num_batched_tokens)),
        # From one sequence: a lone decoding sequence padded to four ran its decode kernel over three empty
        # sequences' programs as well (H200, Llama-3.2-1B shape: 2.7 us more per layer; NOTES.md, ## engine).
        seqs=tuple(config.seq_buckets or geometric_buckets(1, config.max_num_seqs)),
        pages=tuple(config.page_buckets or geometric_buckets(4, max_pages)))
    if self.buckets.tokens[-1] < config.max_num_batched_tokens or self.buckets.seqs[-1] < config.max_num_seqs \
        or self.buckets.pages[-1] < max_pages:
      raise ValueError(f"EngineConfig buckets {self.buckets} do not cover max_num_batched_tokens="
                       f"{config.max_num_batched_tokens}, max_num_seqs={config.max_num_seqs} and "
                       f"{max_pages} pages per sequence")
    if mesh is not None:
      sharding.shard_model(model, mesh)
    if config.kv_cache_dtype not in ("auto", *KV_QUANT_KINDS):
      raise ValueError(f"EngineConfig.kv_cache_dtype={config.kv_cache_dtype!r}; valid: auto, "
                       f"{', '.join(KV_QUANT_KINDS)}")
    kv_quant = None if config.kv_cache_dtype == "auto" else config.kv_cache_dtype
    self.runner = ModelRunner(model, config.num_pages, config.page_size, config.attention_backend, mesh,
                              kv_quant=kv_quant)
    self.speculator: SpeculativeDecoder | None = None
    if config.speculative is not None:
      if mesh is not None:
        raise ValueError("EngineConfig.speculative does not support a mesh yet")
      self.speculator = SpeculativeDecoder(
          config.speculative, model, draft_model, config.num_pages, config.page_size, self.buckets,
          config.max_num_batched_tokens, self.max_model_len, config.attention_backend)
    elif draft_model is not None:
      raise ValueError("draft_model given but EngineConfig.speculative is None")
    if config.async_decode and (config.speculative is not None or config.handoff_after_prefill or mesh is not None):
      raise ValueError("EngineConfig.async_decode does not combine with speculative, handoff_after_prefill "
                       "or a mesh")
    if config.num_scheduler_steps < 1 or (config.num_scheduler_steps > 1 and not config.async_decode):
      raise ValueError(f"EngineConfig.num_scheduler_steps={config.num_scheduler_steps}: must be >= 1, and > 1 "
                       "needs async_decode=True")
    self._eos = frozenset(model.config.eos_token_id)
    self._seed_rng = np.random.default_rng(config.seed)
    self._ids = itertools.count()
    self.requests: dict[str, Request] = {}
    self.waiting: collections.deque[str] = collections.deque()
    self.running: list[str] = []
    self.num_steps = 0
    self.num_preemptions = 0
    self._handoffs: list[Request] = []
    # async_decode: dispatched decode steps whose tokens are not read yet.
    self._inflight: _InFlight | None = None

  # ------------------------------------------------------------------ API

  def add_request(self, prompt_token_ids: Sequence[int], sampling_params: SamplingParams | None = None,
                  request_id: str | None = None, arrival_time: float | None = None) -> str:
    """Queues a request.

    Args:
      prompt_token_ids: the prompt.
      sampling_params: defaults to SamplingParams().
      request_id: unique id; generated when None.
      arrival_time: its arrival on the engine clock (seconds); now when None.

    Returns:
      The request id. A request that can never fit in the page pool is accepted and immediately ends as
      rejected with a reason (see `RequestOutput.finish_reason`).

    Raises:
      ValueError: bad prompt, sampling parameter, length or duplicate id (named); the engine is unchanged.
    """
    params = sampling_params or SamplingParams()
    params.validate()
    prompt = validate_prompt(prompt_token_ids, self.model_config.vocab_size)
    if len(prompt) + params.max_tokens > self.max_model_len:
      raise ValueError(f"prompt length {len(prompt)} + max_tokens {params.max_tokens} exceeds max_model_len "
                       f"{self.max_model_len}")
    rid = str(next(self._ids)) if request_id is None else str(request_id)
    if rid in self.requests:
      raise ValueError(f"request_id {rid!r} is already in use")
    seed = params.seed if params.seed is not None else int(self._seed_rng.integers(0, 2**32))
    now = self.clock()
    req = Request(rid, prompt, params, seed, now if arrival_time is None else arrival_time)
    self.requests[rid] = req
    # The last generated token never needs a KV slot.
    pages = math.ceil((len(prompt) + params.max_tokens - 1) / self.config.page_size)
    if pages > self.config.num_pages:
      self._end(req, RequestStatus.REJECTED, now,
                f"needs {pages} KV pages but the pool has {self.config.num_pages}")
    else:
      self.waiting.append(rid)
    return rid

  def abort(self, request_id: str) -> bool:
    """Ends a waiting or running request; returns False if it is unknown or already ended."""
    req = self.requests.get(request_id)
    if req is None or req.status.done:
      return False
    self._end(req, RequestStatus.ABORTED, self.clock(), "abort")
    return True

  def has_unfinished(self) -> bool:
    return bool(self.waiting or self.running or self._inflight)

  def step(self) -> list[RequestOutput]:
    """Runs one scheduling decision and at most one forward pass.

    With `async_decode`, a call may instead read the tokens of the step dispatched by the previous call
    (after dispatching the next one, or before scheduling synchronously again).

    Returns:
      Outputs of the requests that got a token or ended during this step.
    """
    now = self.clock()
    touched: dict[str, Request] = {}
    if self._inflight is not None:
      previous, self._inflight = self._inflight, self._chain(now)
      self._finish(previous, touched)
      if self._inflight is not None:
        self.num_steps += 1
        return [RequestOutput.of(r) for r in touched.values()]
      now = self.clock()
    plan = self.policy.schedule(self._view(now))
    for rid, reason in plan.reject:
      req = self.requests[rid]
      if req.status is RequestStatus.WAITING:
        self._end(req, RequestStatus.REJECTED, now, reason)
        touched[rid] = req
    for rid in plan.preempt:
      self._preempt(self.requests[rid])
    scheduled: list[tuple[Request, int, int]] = []
    for chunk in plan.chunks:
      req = self.requests[chunk.request_id]
      if req.status.done:
        continue
      admitting = req.status is RequestStatus.WAITING
      if admitting:
        req.num_computed_tokens = self.block_manager.match_prefix(req.request_id, req.all_token_ids)
        req.num_cached_tokens = req.num_computed_tokens
      n = min(chunk.num_tokens, req.num_pending_tokens)
      if n < 1 or not self.block_manager.allocate(req.request_id, req.num_computed_tokens + n):
        if admitting:
          self.block_manager.free(req.request_id)
          req.num_computed_tokens = 0
        else:
          self._preempt(req)
        continue
      if admitting:
        self.waiting.remove(req.request_id)
        self.running.append(req.request_id)
        req.status = RequestStatus.RUNNING
        if req.first_scheduled_time is None:
          req.first_scheduled_time = now
      scheduled.append((req, req.num_computed_tokens, n))
    if scheduled:
      self._execute(scheduled, touched)
    self.num_steps += 1
    return [RequestOutput.of(r) for r in touched.values()]

  def generate(self, prompts: Sequence[Sequence[int]],
               sampling_params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[RequestOutput]:
    """Runs the prompts to completion (with anything already queued) and returns their outputs in order."""
    if sampling_params is None or isinstance(sampling_params, SamplingParams):
      params = [sampling_params] * len(prompts)
    else:
      params = list(sampling_params)
      if len(params) != len(prompts):
        raise ValueError(f"got {len(params)} SamplingParams for {len(prompts)} prompts")
    ids = [self.add_request(p, sp) for p, sp in zip(prompts, params)]
    while self.has_unfinished():
      self.step()
    return [RequestOutput.of(self.requests[i]) for i in ids]

  def warmup(self) -> int:
    """Compiles the step for every shape bucket and the decode-only, chained and speculative programs the
    config uses, in parallel (`runner_lib.warm_up`), then the sampler for every sequence bucket; returns how
    many step programs were compiled (or loaded from the persistent compilation cache), samplers aside."""
    before = self.num_compilations
    page_size, runner = self.config.page_size, self.runner
    decode_shapes = self.buckets.decode_shapes(self.config.max_num_seqs)
    calls = [runner_lib.WarmupCall(runner, pack([], page_size, shape)) for shape in self.buckets.all_shapes()]
    if runner.decode_variant:
      calls += [runner_lib.WarmupCall(runner, pack([], page_size, shape), decode_only=True)
                for shape in decode_shapes]
    for impl in self._chained_impls():
      # The chained steps (steady decoding only), their previous tokens placed as serving has them.
      for shape in decode_shapes:
        batch = pack([], page_size, shape)
        batch["prev_rows"] = np.full(shape[0], -1, np.int32)
        prev = jax.device_put(np.zeros(shape[1], np.int32), runner.output_placement)
        calls.append(runner_lib.WarmupCall(runner, batch, impl=impl, extra={"prev_tokens": prev}))
    if self.speculator is not None:
      calls += self.speculator.warmup_calls(runner, self.model_config.vocab_size)
    runner_lib.warm_up(calls)
    for num_seqs in self.buckets.seqs:
      runner.compile_sampler(num_seqs)
    return self.num_compilations - before

  @property
  def num_compilations(self) -> int:
    """Step programs compiled so far: the step, and with speculation its verification and draft programs
    (unsharded engines of the same models and shapes share them)."""
    chained = sum(runner_lib.num_compilations_of(impl) for impl in self._chained_impls())
    return self.runner.num_compilations + chained + (self.speculator.num_compilations if self.speculator else 0)

  def _chained_impls(self) -> list:
    """The programs `async_decode` chains: one step and, with `num_scheduler_steps`, blocks; greedy and
    sampled variants."""
    if not self.config.async_decode:
      return []
    return [multi_step_impl(steps, sampled) for steps in sorted({1, self.config.num_scheduler_steps})
            for sampled in (False, True)]

  def records(self) -> list[RequestRecord]:
    """Metrics records of every ended request, in submission order."""
    return [r.to_record() for r in self.requests.values() if r.status.done]

  def check_no_leaks(self) -> None:
    """Raises if a request that has ended still holds pages or the allocator is inconsistent."""
    self.block_manager.check_invariants()
    if not self.has_unfinished():
      self.block_manager.assert_no_leaks()
    if self.speculator is not None:
      self.speculator.check_no_leaks(idle=not self.has_unfinished())

  def spec_stats(self) -> SpecStats | None:
    """Speculative decoding counters (acceptance rate, mean accepted length, tokens per target forward),
    or None without speculation."""
    return self.speculator.stats if self.speculator is not None else None

  # ------------------------------------------------------------------ disaggregated serving

  def take_handoffs(self) -> list[Request]:
    """Requests prefilled since the last call (with `handoff_after_prefill`); they still hold their pages
    until `release_handoff`."""
    out, self._handoffs = self._handoffs, []
    return out

  def export_kv(self, request_id: str) -> tuple[list, int]:
    """The K/V of a handed-off request's computed tokens (`ModelRunner.gather_pages`: per layer, the cache
    arrays cut to its n pages, n padded to a power of two) and the number of real pages."""
    req = self.requests[request_id]
    pages = self.block_manager.page_table(request_id)[:math.ceil(req.num_computed_tokens / self.config.page_size)]
    return self.runner.gather_pages(pages), len(pages)

  def release_handoff(self, request_id: str) -> None:
    """Frees the pages of a handed-off request once its K/V has been copied elsewhere."""
    if self.requests[request_id].status is not RequestStatus.HANDED_OFF:
      raise ValueError(f"request {request_id!r} was not handed off")
    self.block_manager.free(request_id)

  def import_request(self, request: Request, kv: list, num_pages: int) -> bool:
    """Continues a request prefilled elsewhere: allocates pages, writes its K/V, and starts decoding it.

    Args:
      request: the prefilled request (one token generated, `num_computed_tokens` tokens of K/V).
      kv: from `export_kv` of an engine with the same cache layout, already on this engine's devices.
      num_pages: real pages in `kv`.

    Returns:
      False (nothing changed) if the pool cannot hold it now; the caller retries later.
    """
    rid = request.request_id
    if rid in self.requests:
      raise ValueError(f"request_id {rid!r} is already in use")
    if not self.block_manager.allocate(rid, request.num_computed_tokens):
      return False
    pages = self.block_manager.page_table(rid)
    assert len(pages) == num_pages, (len(pages), num_pages)
    self.runner.scatter_pages(pages, kv)
    request.status = RequestStatus.RUNNING
    self.requests[rid] = request
    self.running.append(rid)
    self.block_manager.commit(rid, request.all_token_ids, request.num_computed_tokens)
    return True

  # ------------------------------------------------------------------ internals

  def _view(self, now: float, ahead: int = 0) -> SchedulerView:
    """What the policy sees; `ahead` = 1 shows running requests as they will be after one more decode
    token (the in-flight step of `async_decode`)."""
    def view(req: Request, running: bool) -> RequestView:
      extra = ahead if running else 0
      return RequestView(
          request_id=req.request_id, arrival_time=req.arrival_time, prompt_len=req.prompt_len,
          num_tokens=req.num_tokens + extra, num_computed_tokens=req.num_computed_tokens + extra if running else 0,
          num_pages_held=len(self.block_manager.page_table(req.request_id)) if running else 0,
          num_generated=req.num_generated + extra, max_tokens=req.sampling.max_tokens, is_running=running,
          first_token_time=req.first_token_time)
    return SchedulerView(
        now=now,
        running=tuple(view(self.requests[r], True) for r in self.running),
        waiting=tuple(view(self.requests[r], False) for r in self.waiting),
        free_pages=self.block_manager.num_free_pages, page_size=self.config.page_size,
        num_pages=self.config.num_pages,
        num_lookahead_tokens=self.speculator.k if self.speculator is not None else 0)

  def _preempt(self, req: Request) -> None:
    if req.status is not RequestStatus.RUNNING:
      return
    self.block_manager.free(req.request_id)
    if self.speculator is not None:
      self.speculator.free(req.request_id)
    self.running.remove(req.request_id)
    req.status = RequestStatus.WAITING
    req.num_computed_tokens = 0
    req.num_preemptions += 1
    self.num_preemptions += 1
    self.waiting.appendleft(req.request_id)

  def _end(self, req: Request, status: RequestStatus, now: float, reason: str) -> None:
    if req.request_id in self.running:
      self.running.remove(req.request_id)
    elif req.request_id in self.waiting:
      self.waiting.remove(req.request_id)
    self.block_manager.free(req.request_id)
    if self.speculator is not None:
      self.speculator.free(req.request_id)
    req.status = status
    req.finish_time = now
    req.finish_reason = reason

  def _execute(self, scheduled: list[tuple[Request, int, int]], touched: dict[str, Request]) -> None:
    bm = self.block_manager
    chunks = [ChunkSpec(token_ids=req.all_token_ids[start:start + n], start=start,
                        page_table=bm.page_table(req.request_id), temperature=float(req.sampling.temperature),
                        top_k=req.sampling.top_k, top_p=float(req.sampling.top_p), seed=req.seed,
                        token_index=req.num_generated)
              for req, start, n in scheduled]
    if self.speculator is not None:  # Decodes may verify guesses; each emits 1 + accepted tokens.
      budget = self.config.max_num_batched_tokens - sum(n for _, _, n in scheduled)
      results = self.speculator.execute(self.runner, bm, scheduled, chunks, budget)
    else:
      num_tokens = sum(n for _, _, n in scheduled)
      max_pages = max(len(c.page_table) for c in chunks)
      shape = self.buckets.pick(num_tokens, len(chunks), max_pages)
      batch = pack(chunks, self.config.page_size, shape)
      if self.config.async_decode and all(_is_decode(req, start, n) for req, start, n in scheduled):
        tokens = self.runner.dispatch(batch)
        self._inflight = _InFlight(scheduled, tokens, tokens, 1)  # Read by the next step().
        return
      sampled = self.runner.run(batch)
      # A prompt chunk that does not reach the end of its prompt samples nothing yet.
      results = [(start + n, [int(sampled[s])] if start + n >= req.num_tokens else [])
                 for s, (req, start, n) in enumerate(scheduled)]
    self._apply(scheduled, results, touched)

  def _chain(self, now: float) -> _InFlight | None:
    """`async_decode`: dispatches the decode steps after the in-flight ones if the policy, shown the state
    after them, decodes the same sequences one token each; returns what is now in flight, or None."""
    inflight = self._inflight
    ahead = inflight.steps
    running = [self.requests[rid] for rid in self.running]
    if self.waiting or [req.request_id for req in running] != [req.request_id for req, _, _ in inflight.scheduled]:
      return None
    # Tokens each request may still generate after the in-flight ones: a block must not pass a length limit.
    room = min(min(req.sampling.max_tokens - req.num_generated, self.max_model_len - req.num_tokens)
               for req in running) - ahead
    if room < 1:
      return None
    steps = self.config.num_scheduler_steps if room >= self.config.num_scheduler_steps else 1
    plan = self.policy.schedule(self._view(now, ahead=ahead))
    if (plan.reject or plan.preempt or len(plan.chunks) != len(running)
        or {c.request_id for c in plan.chunks} != set(self.running) or min(c.num_tokens for c in plan.chunks) < 1):
      return None
    bm = self.block_manager
    # The block decodes positions num_tokens + ahead - 1 onwards, `steps` of them; a pool too full for a
    # block may still hold one more step. Pages taken so far stay with their requests, which need them soon.
    if not all(bm.allocate(req.request_id, req.num_tokens + ahead + steps - 1) for req in running):
      steps = 1
      if not all(bm.allocate(req.request_id, req.num_tokens + ahead) for req in running):
        return None
    # Row s starts from the last token the in-flight steps sample for row s (placeholder 0 here).
    chunks = [ChunkSpec(token_ids=[0], start=req.num_tokens + ahead - 1, page_table=bm.page_table(req.request_id),
                        temperature=float(req.sampling.temperature), top_k=req.sampling.top_k,
                        top_p=float(req.sampling.top_p), seed=req.seed, token_index=req.num_generated + ahead)
              for req in running]
    shape = self.buckets.pick(len(chunks), len(chunks), max(len(c.page_table) for c in chunks))
    batch = pack(chunks, self.config.page_size, shape)
    batch["prev_rows"] = np.full(shape[0], -1, np.int32)
    batch["prev_rows"][:len(chunks)] = np.arange(len(chunks))
    scheduled = [(req, c.start, steps) for req, c in zip(running, chunks)]
    sampled = any(c.temperature > 0 for c in chunks)
    out = self.runner.call(multi_step_impl(steps, sampled), batch, extra={"prev_tokens": inflight.last},
                           fetch=False)
    return _InFlight(scheduled, out["tokens"], out["last"], steps)

  def _finish(self, inflight: _InFlight, touched: dict[str, Request]) -> None:
    """Reads in-flight tokens and applies them to the requests still running (a request that stopped or
    was aborted meanwhile drops its tokens)."""
    per_seq = np.asarray(inflight.tokens).reshape(inflight.steps, -1).T.tolist()  # [S][steps]
    live = [(s, item) for s, item in enumerate(inflight.scheduled) if not item[0].status.done]
    self._apply([item for _, item in live], [(start + n, per_seq[s]) for s, (_, start, n) in live], touched)

  def _apply(self, scheduled: list[tuple[Request, int, int]], results: list[tuple[int, list[int]]],
             touched: dict[str, Request]) -> None:
    """Per scheduled chunk (request, start, tokens): its tokens now in the KV cache and the tokens it emits."""
    bm = self.block_manager
    now = self.clock()
    for (req, start, n), (num_computed, tokens) in zip(scheduled, results):
      if start < req.num_tokens - 1:  # Any part of the chunk that is not a plain decode token.
        req.num_prefill_tokens_computed += n
      # Tokens after a stop (later accepted guesses, the rest of a block of decode steps) are dropped, and so
      # is their K/V: the prefix cache only learns what the request keeps.
      generated, reason = req.num_generated, None
      for i, token in enumerate(tokens):
        reason = self._stop_reason(req, token, generated + i + 1, req.num_tokens + i + 1)
        if reason is not None:
          num_computed -= len(tokens) - i - 1
          tokens = tokens[:i + 1]
          break
      req.num_computed_tokens = num_computed
      bm.commit(req.request_id, req.all_token_ids + tokens[:-1] if len(tokens) > 1 else req.all_token_ids,
                num_computed)
      if tokens:
        req.all_token_ids.extend(tokens)
        req.token_times.extend([now] * len(tokens))
        if req.first_token_time is None:
          req.first_token_time = now
        touched[req.request_id] = req
      if reason is not None:
        self._end(req, RequestStatus.FINISHED, now, reason)
        continue
      if tokens and not req.status.done and self.config.handoff_after_prefill:
        self.running.remove(req.request_id)
        req.status = RequestStatus.HANDED_OFF
        self._handoffs.append(req)

  def _stop_reason(self, req: Request, token: int, num_generated: int, num_tokens: int) -> str | None:
    """Why `req` ends with `token`, its `num_generated`-th output token (`num_tokens` in all), or None."""
    if token in req.sampling.stop_token_ids:
      return "stop"
    if not req.sampling.ignore_eos and token in self._eos:
      return "eos"
    if num_generated >= req.sampling.max_tokens or num_tokens >= self.max_model_len:
      return "length"
    return None


@dataclasses.dataclass(frozen=True)
class _InFlight:
  """Decode steps dispatched and not read yet (`async_decode`): per request (request, first position,
  steps); the tokens on the device ([S] for one step, [steps, S] for a block) and the last step's [S]."""
  scheduled: list[tuple[Request, int, int]]
  tokens: jax.Array
  last: jax.Array
  steps: int


def _is_decode(req: Request, start: int, n: int) -> bool:
  """The chunk is one decode token (the sequence's last, after a generated one)."""
  return n == 1 and start == req.num_tokens - 1 and req.num_generated > 0
