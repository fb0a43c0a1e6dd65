"""Prefill attention benchmark: pdopt's flash_prefill against its peers, in one run on one card.

Dense cases: B=1, 32 query heads, 8 or 32 KV heads, D=128, bfloat16, causal, S in {2048, 8192, 16384}.
Ours reads K/V from shuffled pages (page_size 16) through a page table; the peers read contiguous K/V:
`jax.nn.dot_product_attention` (cuDNN and XLA), tokamax (Mosaic GPU and Triton), JAX's Pallas Triton `mha`
(no GQA: K/V repeated to 32 heads) and Mosaic GPU `attention_mgpu` (float16), PyTorch SDPA (FlashAttention
and cuDNN backends). A peer that is not importable or fails is recorded with its error and skipped.

Ragged case: 8 prompts with lengths drawn (fixed seed) from the arXiv summarization trace, half of them
with a cached prefix (only the rest of the prompt is queried). Ours runs it as one call; as the peer,
cuDNN runs the same prompts whole in a padded batch with sequence lengths, against ours on the same
whole prompts.

Ours is `flash_prefill` with its automatic choice (the Mosaic GPU kernel on an sm_90 GPU); `ours_triton`
is the Triton kernel on the same inputs. Timing: JAX functions are timed as runs of 10 calls dispatched
back to back (median run / 10), so host dispatch hides behind the device as in serving; PyTorch peers with
CUDA events around each call.

FLOPs: a causal square prompt counts 4*S^2*D*H/2 (the issue's convention); a ragged chunk counts its
exact causal pairs, 4*D*H * sum over queries of (position + 1). Correctness: ours against the `jnp`
reference on the first and last 16 query rows of every sequence (the reference materializes [K, T, L, D],
so whole prompts are out of reach), and against cuDNN on every row.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import pathlib
from typing import Any, Callable

import numpy as np

_HEADS = 32
_HEAD_DIM = 128
_PAGE_SIZE = 16
_CHECK_ROWS = 16
_REPS = 10  # calls dispatched back to back per timed run, so host dispatch hides behind the device
_RAGGED_KV_HEADS = 8
_XLA_MAX_S = 8192  # XLA materializes [H, S, S] float32 scores.
_TRACE = pathlib.Path(__file__).resolve().parents[2] / "data" / "traces" / "arxiv_summarization_lengths.csv"


def _causal_flops(seq_len: int, num_heads: int = _HEADS, head_dim: int = _HEAD_DIM) -> float:
  return 4.0 * seq_len * seq_len * head_dim * num_heads / 2


def _chunk_flops(q_len: int, kv_len: int, num_heads: int = _HEADS, head_dim: int = _HEAD_DIM) -> float:
  prefix = kv_len - q_len
  pairs = q_len * prefix + q_len * (q_len + 1) / 2
  return 4.0 * head_dim * num_heads * pairs


def _to_pages(kv, perm: np.ndarray):
  """[L, K, D] contiguous -> [K, P, page_size, D] with logical page j stored at physical page perm[j]."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  seq_len, num_kv_heads, head_dim = kv.shape
  num_pages = perm.shape[0]
  kv = jnp.pad(kv, ((0, num_pages * _PAGE_SIZE - seq_len), (0, 0), (0, 0)))
  logical = kv.transpose(1, 0, 2).reshape(num_kv_heads, num_pages, _PAGE_SIZE, head_dim)
  return logical[:, np.argsort(perm)]  # physical[:, perm[j]] == logical[:, j]


def _time_jax(fn: Callable[[], Any], **kwargs) -> float:
  """Seconds per call of `fn`, over runs of `_REPS` calls dispatched back to back (`timing.time_jax`)."""
  from pdopt.benchmark import timing  # pylint: disable=import-outside-toplevel
  return timing.time_jax(lambda: [fn() for _ in range(_REPS)], **kwargs) / _REPS


def _try(fn: Callable[[], Any]) -> tuple[Any, str | None]:
  try:
    return fn(), None
  except Exception as e:  # pylint: disable=broad-except
    msg = f"{type(e).__name__}: {e}".splitlines()[0][:300]
    return None, msg


def _peers_dense(q, k, v, sm_scale: float, seq_len: int) -> dict[str, Callable[[], Callable[[], Any]]]:
  """Builders of no-argument peer callables on contiguous [1, S, N, D] inputs."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  peers: dict[str, Callable[[], Callable[[], Any]]] = {}

  def jax_nn(impl):
    fn = jax.jit(functools.partial(jax.nn.dot_product_attention, is_causal=True, scale=sm_scale,
                                   implementation=impl))
    return lambda: fn(q, k, v)

  peers["cudnn_jax"] = lambda: jax_nn("cudnn")
  if seq_len <= _XLA_MAX_S:
    peers["xla"] = lambda: jax_nn("xla")

  def tokamax(impl):
    import tokamax as tkx  # pylint: disable=import-outside-toplevel
    fn = jax.jit(functools.partial(tkx.dot_product_attention, is_causal=True, scale=sm_scale,
                                   implementation=impl))
    return lambda: fn(q, k, v)

  peers["tokamax_mosaic"] = lambda: tokamax("mosaic")
  peers["tokamax_triton"] = lambda: tokamax("triton")

  def pallas_mha():
    from jax.experimental.pallas.ops.gpu import attention  # pylint: disable=import-outside-toplevel
    rep = q.shape[2] // k.shape[2]
    kr, vr = (jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)) if rep > 1 else (k, v)
    fn = jax.jit(functools.partial(attention.mha, segment_ids=None, sm_scale=sm_scale, causal=True))
    return lambda: fn(q, kr, vr)

  peers["pallas_triton_mha"] = pallas_mha

  def pallas_mgpu():
    from jax.experimental.pallas.ops.gpu import attention_mgpu  # pylint: disable=import-outside-toplevel
    config = attention_mgpu.TuningConfig(block_q=64, block_kv=128, max_concurrent_steps=2, causal=True)
    q16, k16, v16 = (x.astype(jnp.float16) for x in (q, k, v))
    # Its kernel has no scale argument: fold it into q.
    q16 = (q16.astype(jnp.float32) * sm_scale).astype(jnp.float16)
    fn = jax.jit(functools.partial(attention_mgpu.attention, config=config))
    return lambda: fn(q16, k16, v16)

  peers["pallas_mgpu_f16"] = pallas_mgpu
  return peers


def _torch_peers(q, k, v, sm_scale: float) -> dict[str, Callable[[], Callable[[], Any]]]:
  """PyTorch SDPA peers; their callables are timed with CUDA events."""

  def build(backend_name):
    import torch  # pylint: disable=import-outside-toplevel
    from torch.nn.attention import SDPBackend, sdpa_kernel  # pylint: disable=import-outside-toplevel
    backend = getattr(SDPBackend, backend_name)
    tq, tk, tv = (torch.from_numpy(np.asarray(x.astype("float32"))).to("cuda", torch.bfloat16)
                  .transpose(1, 2).contiguous() for x in (q, k, v))  # [1, N, S, D]
    gqa = tq.shape[1] != tk.shape[1]

    def fn():
      with sdpa_kernel(backend):
        return torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=True, scale=sm_scale,
                                                                enable_gqa=gqa)
    fn()  # fail here, not in the timer, if the backend refuses the inputs
    return fn

  return {"torch_flash": lambda: build("FLASH_ATTENTION"), "torch_cudnn": lambda: build("CUDNN_ATTENTION")}


def _check_rows(ours_fn, q_flat, k_pages, v_pages, page_table, seq_starts, q_lens, kv_lens, sm_scale):
  """Max |ours - reference| over the first and last rows of each sequence, each as its own chunk."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from pallas_kernels import reference  # pylint: disable=import-outside-toplevel
  err = 0.0
  for s, (start, q_len, kv_len) in enumerate(zip(seq_starts, q_lens, kv_lens)):
    n = min(_CHECK_ROWS, q_len)
    for first in sorted({0, q_len - n}):
      rows = q_flat[start + first:start + first + n]
      args = (rows, k_pages, v_pages, jnp.asarray([kv_len - q_len + first + n], jnp.int32),
              page_table[s:s + 1], jnp.asarray([0, n], jnp.int32), jnp.asarray([1], jnp.int32))
      want = reference.ragged_paged_attention(*args, sm_scale=sm_scale)
      got = ours_fn(*args)
      err = max(err, float(jnp.max(jnp.abs(got.astype(jnp.float32) - want.astype(jnp.float32)))))
  return err


def _bench_dense(seq_len: int, num_kv_heads: int, *, iters: int, with_torch: bool,
                 peers: tuple[str, ...] | None = None,
                 ours_variants: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
  """Times ours, its keyword variants (name -> flash_prefill kwargs) and the peers (all when None)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from pdopt.benchmark import timing  # pylint: disable=import-outside-toplevel
  from pallas_kernels.flash_prefill import flash_prefill  # pylint: disable=import-outside-toplevel

  rng = np.random.default_rng(seq_len + num_kv_heads)
  kq, kk, kv_ = jax.random.split(jax.random.key(seq_len * 100 + num_kv_heads), 3)
  dtype = jnp.bfloat16
  q = jax.random.normal(kq, (1, seq_len, _HEADS, _HEAD_DIM), dtype)
  k = jax.random.normal(kk, (1, seq_len, num_kv_heads, _HEAD_DIM), dtype)
  v = jax.random.normal(kv_, (1, seq_len, num_kv_heads, _HEAD_DIM), dtype)
  sm_scale = _HEAD_DIM ** -0.5
  perm = rng.permutation(-(-seq_len // _PAGE_SIZE)).astype(np.int32)
  k_pages, v_pages = _to_pages(k[0], perm), _to_pages(v[0], perm)
  page_table = jnp.asarray(perm[None, :])
  kv_lens = jnp.asarray([seq_len], jnp.int32)
  cu = jnp.asarray([0, seq_len], jnp.int32)
  one = jnp.asarray([1], jnp.int32)
  ours = jax.jit(functools.partial(flash_prefill, sm_scale=sm_scale))
  flops = _causal_flops(seq_len)
  result: dict[str, Any] = {"case": f"S={seq_len} K={num_kv_heads}", "seq_len": seq_len,
                            "num_kv_heads": num_kv_heads, "flops": flops, "impls": {}}

  def record(name, fn, timer=_time_jax):
    t, err = _try(lambda: timer(fn, warmup=2, iters=iters))
    result["impls"][name] = ({"ms": t * 1e3, "tflops": flops / t / 1e12} if err is None else {"error": err})
    print(f"  {result['case']:<14} {name:<20} " + (f"{t * 1e3:9.3f} ms {flops / t / 1e12:7.1f} TFLOP/s"
                                                     if err is None else f"FAILED {err}"), flush=True)

  q0 = q[0]

  def run_ours():
    return ours(q0, k_pages, v_pages, kv_lens, page_table, cu, one)

  record("ours", run_ours)
  ours_out, err = _try(run_ours)
  if err is None:
    result["max_err_vs_reference"] = _try(lambda: _check_rows(
        ours, q0, k_pages, v_pages, page_table, [0], [seq_len], [seq_len], sm_scale))[0]
  for name, kwargs in (ours_variants or {}).items():
    variant = jax.jit(functools.partial(flash_prefill, sm_scale=sm_scale, **kwargs))
    record(name, lambda: variant(q0, k_pages, v_pages, kv_lens, page_table, cu, one))
  for name, build in _peers_dense(q, k, v, sm_scale, seq_len).items():
    if peers is not None and name not in peers:
      continue
    fn, err = _try(build)
    if err is not None:
      result["impls"][name] = {"error": err}
      print(f"  {result['case']:<14} {name:<20} unavailable: {err}", flush=True)
      continue
    record(name, fn)
    if name == "cudnn_jax" and ours_out is not None:
      result["max_err_vs_cudnn"] = _try(lambda: float(jnp.max(jnp.abs(
          ours_out.astype(jnp.float32) - fn()[0].astype(jnp.float32)))))[0]
    del fn
  if with_torch:
    for name, build in _torch_peers(q, k, v, sm_scale).items():
      fn, err = _try(build)
      if err is not None:
        result["impls"][name] = {"error": err}
        print(f"  {result['case']:<14} {name:<20} unavailable: {err}", flush=True)
        continue
      record(name, fn, timing.time_torch)
      del fn
  return result


def _ragged_lengths(rng: np.random.Generator, num_prompts: int = 8) -> tuple[list[int], list[int]]:
  table = np.genfromtxt(_TRACE, delimiter=",", names=True)
  lengths = rng.choice(table["num_prefill_tokens"].astype(int), num_prompts, replace=False)
  prefixes = [0] * num_prompts
  for i in range(num_prompts // 2):  # half with a cached prefix of 25-75% of the prompt
    prefixes[i] = int(lengths[i] * rng.uniform(0.25, 0.75))
  return [int(x) for x in lengths], prefixes


def _bench_ragged(*, iters: int) -> dict[str, Any]:
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from pallas_kernels.flash_prefill import flash_prefill  # pylint: disable=import-outside-toplevel

  rng = np.random.default_rng(0)
  kv_lens, prefixes = _ragged_lengths(rng)
  num_kv_heads = _RAGGED_KV_HEADS
  sm_scale = _HEAD_DIM ** -0.5
  dtype = jnp.bfloat16
  pages_per_seq = [-(-n // _PAGE_SIZE) for n in kv_lens]
  max_pages = max(pages_per_seq)
  num_pages = sum(pages_per_seq)
  perm = rng.permutation(num_pages).astype(np.int32)
  page_table = np.zeros((len(kv_lens), max_pages), np.int32)
  start = 0
  for s, n in enumerate(pages_per_seq):
    page_table[s, :n] = perm[start:start + n]
    start += n
  page_table = jnp.asarray(page_table)
  keys = jax.random.split(jax.random.key(1), 3)
  kv_shape = (num_kv_heads, num_pages, _PAGE_SIZE, _HEAD_DIM)
  k_pages = jax.random.normal(keys[0], kv_shape, dtype)
  v_pages = jax.random.normal(keys[1], kv_shape, dtype)
  ours = jax.jit(functools.partial(flash_prefill, sm_scale=sm_scale))
  result: dict[str, Any] = {"case": "ragged arXiv x8", "kv_lens": kv_lens, "prefixes": prefixes, "impls": {}}

  def batch(q_lens):
    total = sum(q_lens)
    q = jax.random.normal(keys[2], (total, _HEADS, _HEAD_DIM), dtype)
    cu = jnp.asarray(np.concatenate([[0], np.cumsum(q_lens)]), jnp.int32)
    return q, cu

  def record(name, fn, flops):
    t, err = _try(lambda: _time_jax(fn, warmup=2, iters=iters))
    result["impls"][name] = ({"ms": t * 1e3, "tflops": flops / t / 1e12} if err is None else {"error": err})
    print(f"  {'ragged':<14} {name:<26} " + (f"{t * 1e3:9.3f} ms {flops / t / 1e12:7.1f} TFLOP/s"
                                               if err is None else f"FAILED {err}"), flush=True)

  args_kv = (k_pages, v_pages, jnp.asarray(kv_lens, jnp.int32), page_table)
  num = jnp.asarray([len(kv_lens)], jnp.int32)
  # 1) The real workload: chunks after cached prefixes.
  q_lens = [n - p for n, p in zip(kv_lens, prefixes)]
  q, cu = batch(q_lens)
  flops = sum(_chunk_flops(a, b) for a, b in zip(q_lens, kv_lens))
  result["flops_with_prefix"] = flops
  record("ours_with_prefix", lambda: ours(q, *args_kv, cu, num), flops)
  starts = np.concatenate([[0], np.cumsum(q_lens)])[:-1]
  result["max_err_vs_reference"] = _try(lambda: _check_rows(
      ours, q, k_pages, v_pages, page_table, starts, q_lens, kv_lens, sm_scale))[0]
  # 2) Whole prompts, ours (one flat batch) against cuDNN (padded batch with sequence lengths).
  q, cu = batch(kv_lens)
  flops = sum(_causal_flops(n) for n in kv_lens)
  result["flops_whole_prompts"] = flops
  record("ours_whole_prompts", lambda: ours(q, *args_kv, cu, num), flops)

  def cudnn_padded():
    longest = max(kv_lens)
    starts = np.concatenate([[0], np.cumsum(kv_lens)])
    idx = np.zeros((len(kv_lens), longest), np.int32)
    for s, n in enumerate(kv_lens):
      idx[s, :n] = np.arange(starts[s], starts[s] + n)
    qp = q[idx]  # [B, longest, H, D]
    # Contiguous K/V of the same pages: [K, P, ps, D] -> per sequence [longest, K, D].
    pages = page_table[:, :-(-longest // _PAGE_SIZE)]
    kp = k_pages[:, pages].reshape(num_kv_heads, len(kv_lens), -1, _HEAD_DIM)[:, :, :longest]
    vp = v_pages[:, pages].reshape(num_kv_heads, len(kv_lens), -1, _HEAD_DIM)[:, :, :longest]
    kp, vp = kp.transpose(1, 2, 0, 3), vp.transpose(1, 2, 0, 3)
    lens = jnp.asarray(kv_lens, jnp.int32)
    fn = jax.jit(functools.partial(jax.nn.dot_product_attention, is_causal=True, scale=sm_scale,
                                   implementation="cudnn"))
    return lambda: fn(qp, kp, vp, query_seq_lengths=lens, key_value_seq_lengths=lens)

  fn, err = _try(cudnn_padded)
  if err is None:
    record("cudnn_jax_padded_whole", fn, flops)
  else:
    result["impls"]["cudnn_jax_padded_whole"] = {"error": err}
  return result


def _table(results: list[dict[str, Any]]) -> str:
  lines = []
  for res in results:
    impls = res["impls"]
    ours = next((impls[n] for n in ("ours", "ours_whole_prompts") if n in impls and "ms" in impls[n]), None)
    lines.append(f"{res['case']}  (max err vs reference {res.get('max_err_vs_reference')}, "
                 f"vs cuDNN {res.get('max_err_vs_cudnn')})")
    lines.append(f"  {'impl':<26}{'ms':>10}{'TFLOP/s':>10}{'ours/peer':>11}")
    for name, r in impls.items():
      if "ms" not in r:
        lines.append(f"  {name:<26}{'-':>10}{'-':>10}{'-':>11}  {r['error'][:60]}")
        continue
      ratio = "" if (ours is None or name.startswith("ours")) else f"{r['ms'] / ours['ms']:.2f}x"
      lines.append(f"  {name:<26}{r['ms']:>10.3f}{r['tflops']:>10.1f}{ratio:>11}")
  return "\n".join(lines)


def run(out: str | None, quick: bool) -> list[dict[str, Any]]:
  """Runs the benchmark, prints a table last and writes JSON.

  Args:
    out: JSON file for the results, or None.
    quick: one sequence length and fewer repetitions (smoke run).

  Returns:
    The per-case results (also in the JSON under "cases"); times in ms, throughput in TFLOP/s.
  """
  # Let PyTorch peers allocate next to JAX.
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  import jax  # pylint: disable=import-outside-toplevel

  try:
    import torch  # pylint: disable=import-outside-toplevel
    with_torch = torch.cuda.is_available()
  except ImportError:
    with_torch = False
  device = jax.devices()[0]
  meta = {"device": device.device_kind, "platform": device.platform, "jax": jax.__version__,
          "date": datetime.datetime.now().isoformat(timespec="seconds"), "quick": quick,
          "dtype": "bfloat16", "heads": _HEADS, "head_dim": _HEAD_DIM, "page_size": _PAGE_SIZE}
  print(f"prefill benchmark on {device.device_kind}, jax {jax.__version__}", flush=True)
  seq_lens = (2048, 8192) if quick else (2048, 8192, 16384)
  iters = 5 if quick else 20
  results = []
  for num_kv_heads in (8, 32):
    for seq_len in seq_lens:
      results.append(_bench_dense(seq_len, num_kv_heads, iters=iters, with_torch=with_torch,
                                  ours_variants={"ours_triton": {"implementation": "triton"}}))
  results.append(_bench_ragged(iters=iters))
  table = _table(results)
  if out:
    pathlib.Path(out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(out).write_text(json.dumps({"meta": meta, "cases": results}, indent=1))
  print(f"\n== prefill attention, {device.device_kind}, jax {jax.__version__}, bf16, TFLOP/s; "
        f"ours/peer = peer time / our time ==")
  print(table)
  return results


def tune(out: str | None = None, seq_len: int = 8192, configs: list[tuple[int, int, int, int]] | None = None,
         dtype: str = "bfloat16", num_heads: int = _HEADS, head_dim: int = _HEAD_DIM,
         kv_heads: tuple[int, ...] = (8, 32)):
  """Times flash_prefill block configurations (block_q tokens per program is rows / G).

  The float32 default of the tuning table (NOTES.md) is re-measured by
  `tune(seq_len=2048, dtype="float32", num_heads=32, head_dim=64, kv_heads=(8, 16),
  configs=[(r, b, w, 2) for r in (16, 32, 64) for b in (16, 32, 64) for w in (2, 4, 8)])`.

  Args:
    out: JSON file for the timings, or None.
    seq_len: prompt length S of the dense causal case.
    configs: (rows, block_k, num_warps, num_stages) tuples; a default sweep when None.
    dtype: q, K and V dtype.
    num_heads, head_dim: query heads and head dimension.
    kv_heads: KV head counts to sweep (one group size G = num_heads / K each).

  Returns:
    {group: [(config, ms or error)]}.
  """
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from pdopt.benchmark import timing  # pylint: disable=import-outside-toplevel
  from pallas_kernels.flash_prefill import flash_prefill  # pylint: disable=import-outside-toplevel

  configs = configs or [(128, 64, 8, 2), (128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 2),
                        (128, 128, 8, 3), (128, 32, 4, 3), (128, 64, 4, 3), (128, 128, 4, 2),
                        (64, 64, 4, 3), (64, 128, 4, 3), (64, 64, 4, 2)]
  rng = np.random.default_rng(0)
  report: dict[str, Any] = {}
  for num_kv_heads in kv_heads:
    group = num_heads // num_kv_heads
    q = jax.random.normal(jax.random.key(0), (seq_len, num_heads, head_dim), dtype)
    k = jax.random.normal(jax.random.key(1), (seq_len, num_kv_heads, head_dim), dtype)
    perm = rng.permutation(-(-seq_len // _PAGE_SIZE)).astype(np.int32)
    k_pages = v_pages = _to_pages(k, perm)
    args = (q, k_pages, v_pages, jnp.asarray([seq_len], jnp.int32), jnp.asarray(perm[None]),
            jnp.asarray([0, seq_len], jnp.int32), jnp.asarray([1], jnp.int32))
    rows_out = []
    for rows, bk, w, st in configs:
      bq = max(rows // group, 1)
      fn = jax.jit(functools.partial(flash_prefill, sm_scale=head_dim ** -0.5, block_q=bq, block_k=bk,
                                     num_warps=w, num_stages=st))
      t, err = _try(lambda: timing.time_jax(lambda: fn(*args), warmup=1, iters=5))
      tf = None if err else _causal_flops(seq_len, num_heads, head_dim) / t / 1e12
      rows_out.append({"block_q": bq, "block_k": bk, "num_warps": w, "num_stages": st,
                       "ms": None if err else t * 1e3, "tflops": tf, "error": err})
      print(f"tune S={seq_len} G={group} bq={bq:<4} bk={bk:<4} w={w} st={st}: "
            + (f"{t * 1e3:8.3f} ms {tf:6.1f} TFLOP/s" if err is None else f"FAILED {err[:120]}"), flush=True)
    report[f"G={group}"] = rows_out
  if out:
    pathlib.Path(out).write_text(json.dumps(report, indent=1))
  return report
