"""Ragged paged attention on a TPU: pdopt's kernel against its peers, in one run on one chip.

`python -m experiments.bench_kernels tpu --out=FILE.json` times, for every workload (`WORKLOADS`: decode
batches, prompt chunks behind cached prefixes, and a mixed step; 32 query / 8 KV heads, D=128, bfloat16):

- ours: `pallas_kernels.ragged_paged` on bfloat16 pages, and ours_int8 on int8 pages with per-token scales;
- jax_rpa: `jax.experimental.pallas.ops.tpu.ragged_paged_attention` on the same values in its layout (K and V
  of a page interleaved by head, `[P, page_size, 2K, D]`), its block sizes from its own tuned table;
- tokamax: `tokamax.dot_product_attention(implementation="mosaic")` (dense flash attention on contiguous K/V,
  no pages) on the workloads of whole prompts, when tokamax imports: what paging costs. tokamax's TPU ragged
  paged attention is not public (`tokamax._src`, with its own cache layout and a fused cache write) and is not
  timed;
- xla: the `jnp` reference, which pdopt ran on TPUs before (it gathers every sequence's pages per query
  token), where it fits.

Every output is checked against the reference (float32, HIGHEST) on the first sequences in the same run. Times
are per call in steady state (`timing.time_jax_per_call`). Each workload also gets its roofline on the chip in
use (`roofline`: bytes / HBM bandwidth and FLOPs / bf16 rate, from `pltpu.get_tpu_info`) and each time its
fraction of it. Without a TPU, `run` prints the expected rooflines of v5e, v6e and v7 and measures nothing.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import pathlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from pdopt.benchmark import timing

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 32, 8, 128
PAGE_SIZE = 64  # tokens; a multiple of every page dtype's sublane tile (16 for bf16, 32 for int8)
_CHECK_SEQS = 2  # sequences compared against the reference in every workload
_XLA_MAX_KEYS = 1 << 20  # T * Pmax * page_size above which the reference's gather is not timed
_CHECK_ROWS = 128  # query rows per reference call in the check (its gather is [K, rows, Pmax * page_size, D])


@dataclasses.dataclass(frozen=True)
class Workload:
  """A ragged batch: per sequence its new query tokens and its cached prefix (tokens)."""
  name: str
  q_lens: tuple[int, ...]
  prefixes: tuple[int, ...]

  @property
  def whole_prompts(self) -> bool:
    """Every sequence is a whole prompt of the same length with no prefix (dense attention applies)."""
    return not any(self.prefixes) and len(set(self.q_lens)) == 1


WORKLOADS = (
    Workload("decode_b64_l4096", (1,) * 64, (4095,) * 64),
    Workload("decode_b8_l32768", (1,) * 8, (32767,) * 8),
    Workload("decode_b256_l1024", (1,) * 256, (1023,) * 256),
    Workload("prefill_4x2048", (2048,) * 4, (0,) * 4),
    Workload("chunks_4x512_after_3584", (512,) * 4, (3584,) * 4),
    Workload("mixed_512_chunk_64_decodes", (512,) + (1,) * 64, (1536,) + (2047,) * 64),
)
_QUICK = ("decode_b64_l4096", "chunks_4x512_after_3584", "mixed_512_chunk_64_decodes")


def work(w: Workload, kv_itemsize: float = 2.0, scales: bool = False) -> tuple[float, float]:
  """(bytes, FLOPs) of a workload at the ideal: every sequence's K and V read once (plus float32 per-token
  scales), q read and the output written once; 4 * D FLOPs per (query head, visible key), causal."""
  keys = sum(q + p for q, p in zip(w.q_lens, w.prefixes))
  kv_bytes = 2 * keys * NUM_KV_HEADS * (HEAD_DIM * kv_itemsize + (4 if scales else 0))
  q_bytes = 2 * sum(w.q_lens) * NUM_HEADS * HEAD_DIM * 2
  visible = sum(q * p + q * (q + 1) / 2 for q, p in zip(w.q_lens, w.prefixes))
  return kv_bytes + q_bytes, 4.0 * HEAD_DIM * NUM_HEADS * visible


def roofline(w: Workload, bandwidth: float, flops_per_s: float, **kwargs) -> dict[str, Any]:
  """The workload's floor on a chip of `bandwidth` B/s and `flops_per_s` bf16 FLOP/s: {"bytes", "flops",
  "floor_us", "bound"}; the floor is the larger of the two times."""
  nbytes, flops = work(w, **kwargs)
  memory_s, compute_s = nbytes / bandwidth, flops / flops_per_s
  return {"bytes": nbytes, "flops": flops, "floor_us": 1e6 * max(memory_s, compute_s),
          "bound": "memory" if memory_s >= compute_s else "compute"}


def expected_rooflines() -> list[dict[str, Any]]:
  """The rooflines of every workload on one TensorCore of v5e, v6e and v7 (JAX's `pltpu` chip table)."""
  from jax.experimental.pallas import tpu as pltpu  # pylint: disable=import-outside-toplevel
  chips = {"v5e": pltpu.ChipVersion.TPU_V5E, "v6e": pltpu.ChipVersion.TPU_V6E, "v7": pltpu.ChipVersion.TPU_7X}
  out = []
  for name, chip in chips.items():
    info = pltpu.get_tpu_info_for_chip(chip, 1)
    for w in WORKLOADS:
      for kv, itemsize, scales in (("bf16", 2.0, False), ("int8", 1.0, True)):
        out.append({"chip": name, "workload": w.name, "kv": kv,
                    **roofline(w, info.mem_bw_bytes_per_second, info.bf16_ops_per_second, kv_itemsize=itemsize,
                               scales=scales)})
  return out


def make_inputs(w: Workload, seed: int = 0):
  """Random bfloat16 inputs of the reference's signature for workload `w`, with shuffled pages."""
  rng = np.random.default_rng(seed)
  kv_lens = np.asarray([q + p for q, p in zip(w.q_lens, w.prefixes)], np.int32)
  pages_per_seq = -(-int(kv_lens.max()) // PAGE_SIZE)
  num_pages = len(w.q_lens) * pages_per_seq
  table = rng.permutation(num_pages).reshape(len(w.q_lens), pages_per_seq).astype(np.int32)
  key = jax.random.key(seed)
  kk, kv, kq = jax.random.split(key, 3)
  shape = (NUM_KV_HEADS, num_pages, PAGE_SIZE, HEAD_DIM)
  k_pages = jax.random.normal(kk, shape, jnp.bfloat16)
  v_pages = jax.random.normal(kv, shape, jnp.bfloat16)
  q = jax.random.normal(kq, (sum(w.q_lens), NUM_HEADS, HEAD_DIM), jnp.bfloat16)
  cu_q_lens = np.concatenate([[0], np.cumsum(w.q_lens)]).astype(np.int32)
  return (q, k_pages, v_pages, jnp.asarray(kv_lens), jnp.asarray(table), jnp.asarray(cu_q_lens),
          jnp.asarray([len(w.q_lens)], jnp.int32))


@jax.jit
def to_jax_rpa_layout(k_pages: jax.Array, v_pages: jax.Array) -> jax.Array:
  """pdopt's K and V pages `[K, P, page_size, D]` -> JAX's TPU kernel's `[P, page_size, 2K, D]`: per page and
  slot, KV head h's key at 2h and its value at 2h + 1."""
  kv = jnp.stack([k_pages, v_pages], axis=1)  # [K, 2, P, page_size, D]
  num_kv_heads, _, num_pages, page_size, head_dim = kv.shape
  return kv.transpose(2, 3, 0, 1, 4).reshape(num_pages, page_size, 2 * num_kv_heads, head_dim)


def reference_rows(args, num_seqs: int, sm_scale: float, rows_per_call: int = _CHECK_ROWS) -> np.ndarray:
  """The reference's output rows of the first `num_seqs` sequences, float32 [rows, H, D], computed
  `rows_per_call` query rows at a time: each call is the reference on one slice of one sequence's rows, with
  that sequence's pages and the keys those rows see, so its gather stays small at any workload size."""
  from pallas_kernels import reference  # pylint: disable=import-outside-toplevel

  q, k_pages, v_pages, kv_lens, table, cu_q_lens, _ = args
  fn = jax.jit(functools.partial(reference.ragged_paged_attention, sm_scale=sm_scale))
  one = jnp.asarray([1], jnp.int32)
  out = []
  for s in range(num_seqs):
    start, end = int(cu_q_lens[s]), int(cu_q_lens[s + 1])
    context = int(kv_lens[s]) - (end - start)  # cached prefix
    for lo in range(start, end, rows_per_call):
      hi = min(lo + rows_per_call, end)
      seen = jnp.asarray([context + hi - start], jnp.int32)  # keys of the slice's last row
      with jax.default_matmul_precision("highest"):
        out.append(np.asarray(fn(q[lo:hi], k_pages, v_pages, seen, table[s:s + 1],
                                 jnp.asarray([0, hi - lo], jnp.int32), one), np.float32))
  return np.concatenate(out)


def _rel_err(out, ref) -> float:
  out = np.asarray(out, np.float32)[:ref.shape[0]]
  return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def bench_workload(w: Workload, *, chip, quick: bool) -> list[dict[str, Any]]:
  """Times every implementation on one workload; one dict per implementation (times in us)."""
  from jax.experimental.pallas.ops.tpu import ragged_paged_attention as jax_rpa  # pylint: disable=import-outside-toplevel

  from pallas_kernels import reference  # pylint: disable=import-outside-toplevel
  from pallas_kernels.paged_decode import quantize_kv  # pylint: disable=import-outside-toplevel
  from pallas_kernels.ragged_paged import ragged_paged_attention  # pylint: disable=import-outside-toplevel

  sm_scale = HEAD_DIM ** -0.5
  args = make_inputs(w)
  ref = reference_rows(args, min(len(w.q_lens), _CHECK_SEQS), sm_scale)
  rows = []

  def measure(impl: str, fn: Callable[[], Any], *, kv_itemsize: float = 2.0, scales: bool = False,
              take: Callable[[Any], Any] = lambda out: out) -> None:
    row: dict[str, Any] = {"workload": w.name, "impl": impl}
    row.update(roofline(w, chip.mem_bw_bytes_per_second, chip.bf16_ops_per_second, kv_itemsize=kv_itemsize,
                        scales=scales))
    try:
      row["rel_err"] = _rel_err(take(jax.block_until_ready(fn())), ref)
      seconds = timing.time_jax_per_call(fn, iters=5 if quick else 9)
      row["us"] = seconds * 1e6
      row["pct_roofline"] = 100 * row["floor_us"] / row["us"]
    except Exception as e:  # pylint: disable=broad-except
      row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    print(f"  {w.name:<28} {impl:<10} {row.get('us', 0):10.1f} us  {row.get('pct_roofline', 0):5.1f}% of "
          f"{row['bound']} roofline ({row['floor_us']:.1f} us)  err={row.get('rel_err')} {row.get('error', '')}",
          flush=True)
    rows.append(row)

  ours = jax.jit(functools.partial(ragged_paged_attention, sm_scale=sm_scale))
  measure("ours", lambda: ours(*args))
  quant = jax.jit(functools.partial(quantize_kv, kind="int8", granularity="token", head_axis=0))
  (kq, ks), (vq, vs) = quant(args[1]), quant(args[2])
  measure("ours_int8", lambda: ours(args[0], kq, vq, *args[3:], k_scales=ks, v_scales=vs), kv_itemsize=1.0,
          scales=True)
  del kq, ks, vq, vs

  kv_pages = to_jax_rpa_layout(args[1], args[2])
  theirs = jax.jit(functools.partial(jax_rpa.ragged_paged_attention, sm_scale=sm_scale))
  q, _, _, kv_lens, table, cu_q_lens, num_seqs = args
  measure("jax_rpa", lambda: theirs(q, kv_pages, kv_lens, table, cu_q_lens, num_seqs))
  del kv_pages

  if w.whole_prompts:
    try:
      import tokamax  # pylint: disable=import-outside-toplevel
      batch, seq = len(w.q_lens), w.q_lens[0]
      dense = lambda pages: jnp.swapaxes(pages[:, table], 0, 1).reshape(  # noqa: E731
          batch, NUM_KV_HEADS, -1, HEAD_DIM)[:, :, :seq].transpose(0, 2, 1, 3)  # [B, S, K, D]
      k_dense, v_dense = dense(args[1]), dense(args[2])
      q_dense = q.reshape(batch, seq, NUM_HEADS, HEAD_DIM)
      tk = jax.jit(functools.partial(tokamax.dot_product_attention, is_causal=True, scale=sm_scale,
                                     implementation="mosaic"))
      measure("tokamax", lambda: tk(q_dense, k_dense, v_dense), take=lambda out: out.reshape(-1, NUM_HEADS, HEAD_DIM))
    except ImportError:
      pass

  if sum(w.q_lens) * table.shape[1] * PAGE_SIZE <= _XLA_MAX_KEYS:
    xla = jax.jit(functools.partial(reference.ragged_paged_attention, sm_scale=sm_scale))
    measure("xla", lambda: xla(*args))
  return rows


def _table(rows: list[dict[str, Any]]) -> str:
  """One line per workload: each implementation's time (us) and percent of the roofline."""
  impls = ["ours", "ours_int8", "jax_rpa", "tokamax", "xla"]
  head = f"{'workload':<28} {'floor us':>9} | " + " | ".join(f"{i:>16}" for i in impls) + " | jax_rpa/ours"
  lines = [head, "-" * len(head)]
  for name in dict.fromkeys(r["workload"] for r in rows):
    by = {r["impl"]: r for r in rows if r["workload"] == name}
    cells = [f"{by[i]['us']:8.1f} ({by[i]['pct_roofline']:3.0f}%)" if "us" in by.get(i, {}) else f"{'-':>16}"
             for i in impls]
    ratio = (by["jax_rpa"]["us"] / by["ours"]["us"] if "us" in by.get("jax_rpa", {}) and "us" in by.get("ours", {})
             else None)
    lines.append(f"{name:<28} {by['ours']['floor_us']:9.1f} | " + " | ".join(cells)
                 + (f" | {ratio:.2f}x" if ratio else " |"))
  return "\n".join(lines)


def run(out: str | None, quick: bool) -> dict[str, Any]:
  """Runs the benchmark on the TPU (or prints the expected rooflines without one) and writes JSON.

  Args:
    out: JSON file for the results, or None.
    quick: three workloads and fewer repetitions (smoke run).

  Returns:
    {"meta": ..., "rows": [...]} with a row per (workload, implementation) on a TPU, per (chip, workload,
    KV dtype) roofline without one; times in microseconds.
  """
  device = jax.devices()[0]
  meta = {"device": device.device_kind, "platform": device.platform, "jax": jax.__version__,
          "date": datetime.datetime.now().isoformat(timespec="seconds"), "quick": quick, "heads": NUM_HEADS,
          "kv_heads": NUM_KV_HEADS, "head_dim": HEAD_DIM, "page_size": PAGE_SIZE, "dtype": "bfloat16"}
  if device.platform != "tpu":
    rows = expected_rooflines()
    meta["measured"] = False
    print(f"no TPU ({device.platform}): nothing measured; expected rooflines per TensorCore:")
    for r in rows:
      print(f"  {r['chip']:<4} {r['workload']:<28} {r['kv']:<5} {r['floor_us']:10.1f} us ({r['bound']}-bound)")
  else:
    from jax.experimental.pallas import tpu as pltpu  # pylint: disable=import-outside-toplevel
    chip = pltpu.get_tpu_info()
    meta.update(measured=True, hbm_bytes_per_s=chip.mem_bw_bytes_per_second, bf16_flops=chip.bf16_ops_per_second)
    print(f"ragged paged attention on {device.device_kind}, jax {jax.__version__}", flush=True)
    rows = []
    for w in WORKLOADS:
      if not quick or w.name in _QUICK:
        rows += bench_workload(w, chip=chip, quick=quick)
    print(f"\n== ragged paged attention, {device.device_kind}, jax {jax.__version__}: us per call (percent of "
          f"the roofline) ==")
    print(_table(rows))
  result = {"meta": meta, "rows": rows}
  if out:
    pathlib.Path(out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(out).write_text(json.dumps(result, indent=1))
  return result
