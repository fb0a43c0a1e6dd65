"""Paged decode attention benchmark: pdopt's kernel against its peers, in one run on one card.

`python -m experiments.bench_kernels decode --out=FILE.json` times, for every shape:

- ours: `pallas_kernels.paged_decode.paged_decode` on bf16, int8 and fp8 (e4m3) pages (per-token scales),
  with its default kernel (Mosaic GPU on sm_90 for bf16), and ours_triton: the Triton kernel on bf16;
- jax_paged: `jax.experimental.pallas.ops.gpu.paged_attention` on the same bf16 pages;
- jax_gqa: `jax.experimental.pallas.ops.gpu.decode_attention.gqa` on contiguous KV `[B, L, K, D]`;
- xla: a plain `jnp.einsum` softmax attention on contiguous KV `[B, K, L, D]`;
- torch_sdpa: `torch.nn.functional.scaled_dot_product_attention` on contiguous KV (if torch imports);

and a large device-to-device copy for the card's bandwidth. Every output is checked against the `jnp`
reference (float32, HIGHEST) on the first sequences of the batch in the same run. Effective bandwidth
is KV bytes read / time (values plus scales). Two times per JAX implementation:

- per call, in steady state: by difference of wall-clock runs of many and few back-to-back calls
  (`timing.time_jax_per_call`, which cancels the ~0.3 ms a single measurement pays once for its first
  launch and final sync). It includes the host's cost of one JAX call, which the run also measures alone
  (`jax_call_floor_us`: a jitted `x + 1` on 4 KB): where a call's kernels take less than that (B=1 on the
  H200 host used so far, ~45 us per call), this measures the host, not the kernel.
- device: the time the GPU runs the call's kernels (the kernel, its split combine and small XLA ops), from
  the device's timestamps (`timing.device_profile`, back-to-back calls): what the call costs inside a
  compiled model step, where the host launches a whole step at once.

torch's time comes from CUDA events around `_REPS` back-to-back calls; torch launches a call in ~20 us, so
this is device time wherever the kernel takes longer.

`tune()` sweeps the kernel's launch parameters at the target shapes:
`python -c "from pdopt.benchmark import decode_attention; decode_attention.tune('tune.json')"`.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import os
import sys
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from pdopt.benchmark import timing

_NUM_HEADS, _NUM_KV_HEADS, _HEAD_DIM = 32, 8, 128
_BATCHES = (1, 8, 64)
_KV_LENS = (512, 4096, 32768)
_PAGE_SIZES = (16, 64)
_CHECK_SEQS = 2  # sequences compared against the reference at every shape
_REPS = 10
_DATASHEET_TBPS = {"H100": 3.35, "H200": 4.8}  # SXM HBM bandwidth, TB/s


@dataclasses.dataclass
class Row:
  """One timed implementation at one shape."""
  impl: str
  batch: int
  kv_len: int
  page_size: int | None  # None for contiguous-KV peers
  seconds: float | None = None  # per call (see the module docstring)
  kv_bytes: int = 0
  tbps: float | None = None  # KV bytes read / time, 1e12 B/s
  pct_copy: float | None = None  # tbps / measured copy bandwidth, percent
  device_seconds: float | None = None  # GPU busy time per call (JAX only; torch: None, `seconds` is)
  device_tbps: float | None = None
  device_pct_copy: float | None = None
  kernels: float | None = None  # kernel launches per call
  rel_err: float | None = None  # ||out - ref|| / ||ref|| on the checked sequences
  error: str | None = None


def _datasheet_tbps(device_kind: str) -> float | None:
  for name, tbps in _DATASHEET_TBPS.items():
    if name in device_kind:
      return tbps
  return None


def _time(fn: Callable[[], Any], quick: bool) -> float:
  """Seconds per call of `fn` in steady state (`timing.time_jax_per_call`)."""
  return timing.time_jax_per_call(fn, iters=5 if quick else 9)


def _device_seconds(fn: Callable[[], Any]) -> tuple[float | None, float | None]:
  """GPU busy seconds and kernel launches per call of `fn` (None, None without a device trace)."""
  profile = timing.device_profile(fn, calls=_REPS, top=1)
  if not profile or "busy_us" not in profile:
    return None, None
  return profile["busy_us"] * 1e-6, profile["kernels"]


def jax_call_floor(quick: bool) -> float:
  """Seconds per call of a jitted `x + 1` on 4 KB: the host's cost of one JAX call, with no device work."""
  x = jnp.zeros((1024,), jnp.float32)
  f = jax.jit(lambda x: x + 1)
  return timing.time_jax_per_call(lambda: f(x), iters=5 if quick else 9)


def copy_bandwidth(quick: bool) -> dict[str, float]:
  """Device-to-device copy bandwidth in 1e12 B/s ((read + write) bytes / time), JAX and torch.

  Args:
    quick: fewer repetitions, and a 64 MiB buffer instead of 2 GiB.

  Returns:
    {"jax": TB/s} and, where torch has a GPU, {"torch": TB/s}.
  """
  # 2 GiB is far past any GPU cache. The timing keeps `long` (10) outputs alive at once, so on a CPU, or in a
  # smoke run, 64 MiB keeps the run under 1 GB of memory (2 GiB needed 22 GB).
  small = quick or jax.default_backend() == "cpu"
  nbytes = (64 << 20) if small else (2 << 30)
  x = jnp.zeros((nbytes // 4,), jnp.int32)
  f = jax.jit(lambda x: x + 1)
  per_call = timing.time_jax_per_call(lambda: f(x), short=2, long=10, iters=3 if quick else 7)
  out = {"jax": 2 * nbytes / per_call / 1e12}
  del x
  try:
    import torch  # pylint: disable=import-outside-toplevel
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    out["torch"] = 2 * nbytes / timing.time_torch(lambda: dst.copy_(src), iters=5 if quick else 20) / 1e12
    del src, dst
    torch.cuda.empty_cache()
  except Exception:  # pylint: disable=broad-except
    pass
  return out


def _make_pages(key, batch: int, kv_len: int, page_size: int):
  """Random bf16 pages `[K, P, page_size, D]` and a shuffled page table (no spare pages)."""
  pages_per_seq = kv_len // page_size
  num_pages = batch * pages_per_seq
  kk, kv, kp = jax.random.split(key, 3)
  shape = (_NUM_KV_HEADS, num_pages, page_size, _HEAD_DIM)
  k_pages = jax.random.normal(kk, shape, jnp.bfloat16)
  v_pages = jax.random.normal(kv, shape, jnp.bfloat16)
  table = jax.random.permutation(kp, num_pages).reshape(batch, pages_per_seq).astype(jnp.int32)
  return k_pages, v_pages, table


@functools.partial(jax.jit, static_argnames=("kv_len",))
def _contiguous(pages, table, kv_len: int):
  """Pages `[K, P, ps, D]` -> contiguous `[B, K, L, D]` (setup for the contiguous-KV peers)."""
  g = pages[:, table]  # [K, B, Pseq, ps, D]
  num_kv_heads, batch = g.shape[:2]
  return g.reshape(num_kv_heads, batch, kv_len, -1).transpose(1, 0, 2, 3)


def _xla_attention(q, k, v, *, sm_scale: float):
  """Plain XLA decode attention on contiguous KV: q [B, H, D], k/v [B, K, L, D] -> [B, H, D]."""
  batch, num_heads, head_dim = q.shape
  num_kv_heads = k.shape[1]
  qg = q.reshape(batch, num_kv_heads, num_heads // num_kv_heads, head_dim)
  s = jnp.einsum("BKGD,BKLD->BKGL", qg, k, preferred_element_type=jnp.float32) * sm_scale
  p = jax.nn.softmax(s, axis=-1)
  o = jnp.einsum("BKGL,BKLD->BKGD", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return o.reshape(batch, num_heads, head_dim).astype(q.dtype)


def _rel_err(out, ref) -> float:
  out = np.asarray(out, np.float32).reshape(ref.shape)
  return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def bench_shape(batch: int, kv_len: int, page_sizes: tuple[int, ...], *, quick: bool,
                copy_tbps: float, with_torch: bool, ours_kwargs: dict | None = None) -> list[Row]:
  """Times every implementation at one (batch, kv_len) and each page size."""
  from jax.experimental.pallas.ops.gpu import decode_attention  # pylint: disable=import-outside-toplevel
  from jax.experimental.pallas.ops.gpu import paged_attention  # pylint: disable=import-outside-toplevel

  from pallas_kernels import reference  # pylint: disable=import-outside-toplevel
  from pallas_kernels.paged_decode import paged_decode, quantize_kv  # pylint: disable=import-outside-toplevel

  sm_scale = _HEAD_DIM**-0.5
  ours_kwargs = ours_kwargs or {}
  key = jax.random.key(batch * 100003 + kv_len)
  q = jax.random.normal(jax.random.fold_in(key, 1), (batch, 1, _NUM_HEADS, _HEAD_DIM), jnp.bfloat16)
  kv_lens = jnp.full((batch,), kv_len, jnp.int32)
  bf16_bytes = 2 * batch * kv_len * _NUM_KV_HEADS * _HEAD_DIM * 2
  ref_fn = jax.jit(functools.partial(reference.paged_decode_attention, sm_scale=sm_scale))
  rows: list[Row] = []
  check = min(batch, _CHECK_SEQS)

  def record(row: Row) -> None:
    if row.tbps is not None:
      row.pct_copy = 100 * row.tbps / copy_tbps
    if row.device_seconds:
      row.device_tbps = row.kv_bytes / row.device_seconds / 1e12
      row.device_pct_copy = 100 * row.device_tbps / copy_tbps
    rows.append(row)
    print(f"  {row.impl:<14} B={batch:<3} L={kv_len:<6} ps={row.page_size} "
          f"{(row.seconds or 0) * 1e6:9.1f} us {(row.tbps or 0):6.2f} TB/s, device "
          f"{(row.device_seconds or 0) * 1e6:9.1f} us {(row.device_tbps or 0):6.2f} TB/s "
          f"({row.kernels} kernels) err={row.rel_err} {row.error or ''}", flush=True)

  def measure(row: Row, fn: Callable[[], Any], ref: np.ndarray, take: Callable[[Any], Any]) -> None:
    try:
      out = jax.block_until_ready(fn())
      row.rel_err = _rel_err(take(out), ref)
      row.seconds = _time(fn, quick)
      row.tbps = row.kv_bytes / row.seconds / 1e12
      row.device_seconds, row.kernels = _device_seconds(fn)
    except Exception as e:  # pylint: disable=broad-except
      row.error = f"{type(e).__name__}: {str(e)[:300]}"
    record(row)

  ref = None
  for page_size in page_sizes:
    k_pages, v_pages, table = _make_pages(jax.random.fold_in(key, page_size), batch, kv_len, page_size)
    with jax.default_matmul_precision("highest"):
      ref = np.asarray(ref_fn(q[:check], k_pages, v_pages, kv_lens[:check], table[:check]), np.float32)
    first = lambda o: o[:check]  # pylint: disable=unnecessary-lambda-assignment

    f = jax.jit(functools.partial(paged_decode, sm_scale=sm_scale, **ours_kwargs))
    measure(Row("ours_bf16", batch, kv_len, page_size, kv_bytes=bf16_bytes),
            lambda: f(q, k_pages, v_pages, kv_lens, table), ref, first)
    f_triton = jax.jit(functools.partial(paged_decode, sm_scale=sm_scale, implementation="triton"))
    measure(Row("ours_triton", batch, kv_len, page_size, kv_bytes=bf16_bytes),
            lambda: f_triton(q, k_pages, v_pages, kv_lens, table), ref, first)
    for kind in ("int8", "fp8"):
      quant = jax.jit(functools.partial(quantize_kv, kind=kind, granularity="token", head_axis=0))
      kq, ks = quant(k_pages)
      vq, vs = quant(v_pages)
      qbytes = kq.nbytes + vq.nbytes + ks.nbytes + vs.nbytes
      measure(Row(f"ours_{kind}", batch, kv_len, page_size, kv_bytes=qbytes),
              lambda: f(q, kq, vq, kv_lens, table, k_scales=ks, v_scales=vs), ref, first)
      del kq, vq, ks, vs

    pages_per_seq = kv_len // page_size
    k_splits = min(16, pages_per_seq)
    ppcb = min(8, pages_per_seq // k_splits)
    pa = jax.jit(functools.partial(paged_attention.paged_attention, k_splits=k_splits,
                                   pages_per_compute_block=ppcb))
    q3 = q[:, 0] * jnp.asarray(sm_scale, q.dtype)  # paged_attention has no sm_scale argument
    measure(Row("jax_paged", batch, kv_len, page_size, kv_bytes=bf16_bytes),
            lambda: pa(q3, k_pages, v_pages, table, kv_lens), ref, first)

    if page_size == page_sizes[0]:
      # Contiguous-KV peers, on the same values.
      k_c, v_c = _contiguous(k_pages, table, kv_len), _contiguous(v_pages, table, kv_len)  # [B, K, L, D]
      del k_pages, v_pages
      xla = jax.jit(functools.partial(_xla_attention, sm_scale=sm_scale))
      measure(Row("xla", batch, kv_len, None, kv_bytes=bf16_bytes), lambda: xla(q[:, 0], k_c, v_c), ref,
              first)
      if with_torch:
        record(_bench_torch(q, k_c, v_c, batch, kv_len, bf16_bytes, sm_scale, ref, first, quick))
      k_l, v_l = jnp.swapaxes(k_c, 1, 2), jnp.swapaxes(v_c, 1, 2)  # [B, L, K, D], gqa's layout
      del k_c, v_c
      gqa = jax.jit(functools.partial(decode_attention.gqa, sm_scale=sm_scale))
      measure(Row("jax_gqa", batch, kv_len, None, kv_bytes=bf16_bytes), lambda: gqa(q[:, 0], k_l, v_l),
              ref, first)
      del k_l, v_l
    else:
      del k_pages, v_pages
  return rows


def _bench_torch(q, k_c, v_c, batch, kv_len, kv_bytes, sm_scale, ref, first, quick) -> Row:
  """PyTorch SDPA on the same contiguous KV `[B, K, L, D]` (shared through DLPack, no copy)."""
  import torch  # pylint: disable=import-outside-toplevel
  import torch.nn.functional as F  # pylint: disable=import-outside-toplevel

  jax.block_until_ready((k_c, v_c))
  tq = torch.from_dlpack(jnp.swapaxes(q, 1, 2))  # [B, H, 1, D]
  tk, tv = torch.from_dlpack(k_c), torch.from_dlpack(v_c)
  row = Row("torch_sdpa", batch, kv_len, None, kv_bytes=kv_bytes)

  def call():
    return F.scaled_dot_product_attention(tq, tk, tv, scale=sm_scale, enable_gqa=True)

  def reps():
    for _ in range(_REPS):
      call()

  try:
    out = call()
    torch.cuda.synchronize()
    row.rel_err = _rel_err(first(out[:, :, 0].float().cpu().numpy()), ref)
    row.seconds = timing.time_torch(reps, warmup=2, iters=5 if quick else 15) / _REPS
    row.tbps = kv_bytes / row.seconds / 1e12
  except Exception as e:  # pylint: disable=broad-except
    row.error = f"{type(e).__name__}: {str(e)[:300]}"
  return row


def _fits(batch: int, kv_len: int) -> bool:
  """Whether the shape's caches (pages, quantized pages, two contiguous copies) fit comfortably."""
  bf16_bytes = 2 * batch * kv_len * _NUM_KV_HEADS * _HEAD_DIM * 2
  try:
    limit = jax.devices()[0].memory_stats()["bytes_limit"]
  except Exception:  # pylint: disable=broad-except
    limit = 16 << 30
  return 4 * bf16_bytes < 0.8 * limit


def _device_time(row: Row) -> float | None:
  """A row's device time: the profiled busy time for JAX, the CUDA-event time for torch."""
  return row.seconds if row.impl == "torch_sdpa" else row.device_seconds


def _summary(rows: list[Row], copy_tbps: float, datasheet: float | None) -> dict[str, Any]:
  """The issue's targets at B=64, L=4096, page 16 and B=1, L=32768, page 16, per call and in device time
  (keys with `device_`)."""
  def get(impl, b, l, ps):
    for r in rows:
      if r.impl == impl and r.batch == b and r.kv_len == l and r.page_size == ps and r.seconds:
        return r
    return None

  out: dict[str, Any] = {}
  for prefix, time_of in (("", lambda r: r.seconds), ("device_", _device_time)):
    ours = get("ours_bf16", 64, 4096, 16)
    if ours and time_of(ours):
      for peer, ps in (("jax_paged", 16), ("torch_sdpa", None), ("jax_gqa", None), ("xla", None)):
        p = get(peer, 64, 4096, ps)
        if p and time_of(p):
          out[f"{prefix}b64_l4096_speedup_vs_{peer}"] = time_of(p) / time_of(ours)
      tbps = ours.kv_bytes / time_of(ours) / 1e12
      if datasheet:
        out[f"{prefix}b64_l4096_pct_datasheet"] = 100 * tbps / datasheet
      out[f"{prefix}b64_l4096_pct_copy"] = 100 * tbps / copy_tbps
      for kind in ("int8", "fp8"):
        quant = get(f"ours_{kind}", 64, 4096, 16)
        if quant and time_of(quant):
          out[f"{prefix}b64_l4096_{kind}_speedup_vs_bf16"] = time_of(ours) / time_of(quant)
    one = get("ours_bf16", 1, 32768, 16)
    if one and time_of(one):
      out[f"{prefix}b1_l32768_pct_copy"] = 100 * one.kv_bytes / time_of(one) / 1e12 / copy_tbps
  return out


def _table(rows: list[Row], time_of: Callable[[Row], float | None] = lambda r: r.seconds) -> str:
  """Compact table: one line per (B, L, page size), time in us and TB/s for each implementation."""
  impls = ["ours_bf16", "ours_triton", "ours_int8", "ours_fp8", "jax_paged", "jax_gqa", "xla", "torch_sdpa"]
  head = f"{'B':>3} {'L':>6} {'ps':>3} | " + " | ".join(f"{i:>16}" for i in impls) + " | ours/paged ours/sdpa"
  lines = [head, "-" * len(head)]
  shapes = sorted({(r.batch, r.kv_len, r.page_size) for r in rows if r.page_size is not None})
  for b, l, ps in shapes:
    cells, t = [], {}
    for impl in impls:
      want_ps = None if impl in ("jax_gqa", "xla", "torch_sdpa") else ps
      r = next((r for r in rows if (r.impl, r.batch, r.kv_len, r.page_size) == (impl, b, l, want_ps)), None)
      seconds = time_of(r) if r is not None and r.seconds is not None else None
      if seconds is None:
        cells.append(f"{'err' if r is not None else '-':>16}")
      else:
        t[impl] = seconds
        cells.append(f"{seconds * 1e6:8.1f}us {r.kv_bytes / seconds / 1e12:4.2f}T")
    ratios = [f"{t[p] / t['ours_bf16']:10.2f}" if p in t and "ours_bf16" in t else f"{'-':>10}"
              for p in ("jax_paged", "torch_sdpa")]
    lines.append(f"{b:>3} {l:>6} {ps:>3} | " + " | ".join(cells) + " | " + " ".join(ratios))
  return "\n".join(lines)


def run(out: str | None, quick: bool) -> dict[str, Any]:
  """Runs the decode benchmark, prints a table last and writes JSON to `out`.

  Args:
    out: JSON path for every number (None: print only).
    quick: one batch size and fewer repetitions (smoke run).

  Returns:
    The dict written to `out`.
  """
  # Let torch and JAX share the card; set before JAX initializes its backend.
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

  try:
    import torch  # pylint: disable=import-outside-toplevel
    with_torch = torch.cuda.is_available()
    torch_version = torch.__version__
  except ImportError:
    with_torch, torch_version = False, None

  device = jax.devices()[0]
  copy = copy_bandwidth(quick)
  copy_tbps = max(copy.values())
  datasheet = _datasheet_tbps(device.device_kind)
  call_floor = jax_call_floor(quick)
  print(f"device {device.device_kind}, jax {jax.__version__}, torch {torch_version}; copy bandwidth "
        + ", ".join(f"{k} {v:.2f} TB/s" for k, v in copy.items())
        + f"; one JAX call with no device work: {call_floor * 1e6:.1f} us", flush=True)

  shapes = [(b, l) for b in _BATCHES for l in _KV_LENS]
  if quick:
    shapes = [(64, 4096), (1, 32768)]
  rows: list[Row] = []
  for batch, kv_len in shapes:
    if not _fits(batch, kv_len):
      print(f"  skip B={batch} L={kv_len}: does not fit", flush=True)
      continue
    rows += bench_shape(batch, kv_len, _PAGE_SIZES, quick=quick, copy_tbps=copy_tbps, with_torch=with_torch)
  result = {
      "device": device.device_kind,
      "jax_version": jax.__version__,
      "torch_version": torch_version,
      "date": datetime.date.today().isoformat(),
      "command": " ".join(sys.argv),
      "shape": {"num_heads": _NUM_HEADS, "num_kv_heads": _NUM_KV_HEADS, "head_dim": _HEAD_DIM, "q_len": 1},
      "copy_tbps": copy,
      "jax_call_floor_us": call_floor * 1e6,
      "datasheet_tbps": datasheet,
      "summary": _summary(rows, copy_tbps, datasheet),
      "rows": [dataclasses.asdict(r) for r in rows],
  }
  if out:
    with open(out, "w") as f:
      json.dump(result, f, indent=1)
  print(json.dumps(result["summary"], indent=1))
  print("Per call:\n" + _table(rows), flush=True)
  print("Device time (JAX: GPU busy time per call; torch: CUDA events):\n" + _table(rows, _device_time), flush=True)
  return result


def tune(out: str | None = None, quick: bool = False, sweeps: list | None = None) -> list[dict[str, Any]]:
  """Sweeps the kernel's launch parameters at the issue's target shapes (bf16 and int8, page 16).

  Args:
    out: JSON path for every timing (None: print only).
    quick: fewer configurations.
    sweeps: (batch, kv_len, kind, [(pages_per_block, num_warps, num_stages, num_splits, int8_upcast), ...])
      tuples to run instead of the default sweep; kind "bf16", "int8", "fp8" (per-(token, head) scales) or
      "int8/head", "fp8/head" (per-head scales).

  Returns:
    One dict per (shape, configuration) with its time in seconds (None where it failed).
  """
  import itertools  # pylint: disable=import-outside-toplevel

  from pallas_kernels.paged_decode import paged_decode, quantize_kv  # pylint: disable=import-outside-toplevel

  sm_scale = _HEAD_DIM**-0.5
  results = []
  def grid(ppbs, warps, stages, splits):
    return [(*c, "bits") for c in itertools.product(ppbs, warps, stages, splits)]

  given = sweeps
  sweeps = [
      # (batch, kv_len, kind, [(pages_per_block, num_warps, num_stages, num_splits, int8_upcast), ...])
      (64, 4096, "bf16", grid((4, 8), (4,), (2, 3), (None,))),
      (64, 4096, "int8", grid((8, 16), (4,), (3, 4), (None,)) + [(16, 8, 3, None, "bits"),
                                                                (8, 4, 3, None, "convert")]),
      (64, 4096, "fp8", grid((8, 16), (4,), (3,), (None,))),
      (1, 32768, "bf16", grid((4, 8), (4,), (3,), (None,))),
      (1, 32768, "int8", grid((8, 16), (4,), (3,), (None,))),
  ]
  if quick:
    sweeps = [(64, 4096, "bf16", grid((8,), (4, 8), (2, 3), (None,)))]
  sweeps = given or sweeps
  for batch, kv_len, kind, configs in sweeps:
    key = jax.random.key(batch + kv_len)
    q = jax.random.normal(key, (batch, 1, _NUM_HEADS, _HEAD_DIM), jnp.bfloat16)
    k_pages, v_pages, table = _make_pages(key, batch, kv_len, 16)
    kv_lens = jnp.full((batch,), kv_len, jnp.int32)
    kw: dict[str, Any] = {}
    if kind != "bf16":  # "int8" / "fp8" with per-(token, head) scales; "int8/head" / "fp8/head" per head
      dtype_kind, _, granularity = kind.partition("/")
      quant = jax.jit(functools.partial(quantize_kv, kind=dtype_kind, granularity=granularity or "token",
                                        head_axis=0))
      k_pages, kw["k_scales"] = quant(k_pages)
      v_pages, kw["v_scales"] = quant(v_pages)
    nbytes = sum(x.nbytes for x in (k_pages, v_pages, *kw.values()))
    for ppb, nw, ns, sp, up in configs:
      f = jax.jit(functools.partial(paged_decode, sm_scale=sm_scale, pages_per_block=ppb, num_warps=nw,
                                    num_stages=ns, num_splits=sp, int8_upcast=up))
      rec = {"batch": batch, "kv_len": kv_len, "kind": kind, "pages_per_block": ppb, "num_warps": nw,
             "num_stages": ns, "num_splits": sp, "int8_upcast": up, "seconds": None}
      try:
        call = functools.partial(f, q, k_pages, v_pages, kv_lens, table, **kw)
        rec["seconds"] = _time(call, quick=True)
        rec["tbps"] = nbytes / rec["seconds"] / 1e12
      except Exception as e:  # pylint: disable=broad-except
        rec["error"] = f"{type(e).__name__}: {str(e)[:200]}"
      results.append(rec)
      print(f"tune B={batch} L={kv_len} {kind} ppb={ppb} warps={nw} stages={ns} splits={sp} {up}: "
            f"{(rec['seconds'] or 0) * 1e6:.1f} us {rec.get('tbps', 0):.2f} TB/s {rec.get('error', '')}",
            flush=True)
    del k_pages, v_pages, kw
  if out:
    with open(out, "w") as fh:
      json.dump(results, fh, indent=1)
  return results
