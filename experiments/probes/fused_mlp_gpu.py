# python experiments/probes/fused_mlp_gpu.py OUT.json [llama-3.2-1b,llama-3.1-8b]
"""On a GPU: the skinny matmuls of `pallas_kernels.fused_mlp` against XLA on the same work, at the decode
shapes of Llama-3.2-1B and Llama-3.1-8B (bfloat16).

1. Each kernel against its reference (largest error over the reference's largest magnitude).
2. A sweep of launch parameters per kernel and row count (device busy time per call).
3. The layer's part after attention both ways, from the attention output and the residual to the next
   residual: XLA (o projection + add, RMSNorm, gate/up, SiLU product, down + add, as `pdopt.models.layers`
   computes them) against the three kernels with the sweep's best parameters: device busy time and kernels
   per call (`device_profile`), and the floor (the weights' bytes over the copy bandwidth measured here).
"""
import itertools
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import reference
from pallas_kernels.fused_mlp import SkinnyConfig, matmul_add, norm_gate_up_silu
from pallas_kernels.triton_util import dot_rows
from pdopt.benchmark.timing import device_profile, time_jax_per_call
from pdopt.models import layers

SHAPES = {"llama-3.2-1b": (2048, 8192), "llama-3.1-8b": (4096, 14336)}  # (E = H * D, F)
if len(sys.argv) > 2:  # the shapes to run, by name
  SHAPES = {name: SHAPES[name] for name in sys.argv[2].split(",")}
TOKENS = (1, 16, 64)
EPS = 1e-5


def busy_seconds(fn) -> float:
  """Device busy seconds per call of fn() (the device's own timestamps: no launch or host time)."""
  return device_profile(fn, calls=10)["busy_us"] / 1e6


def sweep(fn, configs):
  """(best busy seconds, best config, all) of fn(config) over the configs that compile."""
  results = []
  for config in configs:
    try:
      seconds = busy_seconds(lambda config=config: fn(config))
    except Exception as e:  # pylint: disable=broad-except
      print(f"  {config}: {type(e).__name__}: {str(e)[:120]}", flush=True)
      continue
    results.append((seconds, config))
  best = min(results, key=lambda r: r[0])
  return best[0], best[1], [(s, c.__dict__) for s, c in results]


def configs(cols, ks, launches, rows):
  return [SkinnyConfig(block_rows=rows, block_cols=c, block_k=k, num_warps=w, num_stages=s)
          for c, k, (w, s) in itertools.product(cols, ks, launches)]


def copy_bandwidth() -> float:
  a = jnp.ones((1 << 28,), jnp.bfloat16)  # 512 MB
  copy = jax.jit(lambda a: a + 1)
  return 2 * a.nbytes / time_jax_per_call(lambda: copy(a))


def main(out_path: str):
  key = jax.random.PRNGKey(0)
  bandwidth = copy_bandwidth()
  report = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "copy_tb_s": bandwidth / 1e12,
            "shapes": {}}
  print(report, flush=True)
  launches = [(4, 3), (4, 5), (8, 3), (8, 5)]
  for name, (hidden, width) in SHAPES.items():
    best = {}
    ks = jax.random.split(key, 6)
    o_w = (jax.random.normal(ks[0], (hidden, hidden)) / np.sqrt(hidden)).astype(jnp.bfloat16)
    gu_w = (jax.random.normal(ks[1], (hidden, 2, width)) / np.sqrt(hidden)).astype(jnp.bfloat16)
    down_w = (jax.random.normal(ks[2], (width, hidden)) / np.sqrt(width)).astype(jnp.bfloat16)
    norm_w = (1 + 0.1 * jax.random.normal(ks[3], (hidden,))).astype(jnp.bfloat16)
    weight_bytes = o_w.nbytes + gu_w.nbytes + down_w.nbytes
    for tokens in TOKENS:
      attn = jax.random.normal(ks[4], (tokens, hidden)).astype(jnp.bfloat16)
      x = (3 * jax.random.normal(ks[5], (tokens, hidden))).astype(jnp.bfloat16)
      act = jax.nn.silu(x[:, :1]) * jnp.ones((tokens, width), jnp.bfloat16)
      row = {}
      # 1. Errors against the references.
      got, want = norm_gate_up_silu(x, norm_w, gu_w, eps=EPS), reference.norm_gate_up_silu(x, norm_w, gu_w, eps=EPS)
      row["gate_up_rel_err"] = float(jnp.max(jnp.abs(got.astype(jnp.float32) - want.astype(jnp.float32)))
                                     / jnp.max(jnp.abs(want.astype(jnp.float32))))
      got, want = matmul_add(act, down_w, x), reference.matmul_add(act, down_w, x)
      row["down_rel_err"] = float(jnp.max(jnp.abs(got.astype(jnp.float32) - want.astype(jnp.float32)))
                                  / jnp.max(jnp.abs(want.astype(jnp.float32))))
      # 2. Launch parameters (one token and 16 share the row block of 16, so 16 reuses one token's).
      rows = dot_rows(tokens, 64)
      if tokens != 16:
        best[rows] = (
            sweep(lambda c: norm_gate_up_silu(x, norm_w, gu_w, eps=EPS, config=c),
                  configs((16, 32, 64), (64, 128, 256, 512), launches, rows)),
            sweep(lambda c: matmul_add(act, down_w, x, config=c),
                  configs((16, 32), (128, 256, 512, 1024), launches, rows)),
            sweep(lambda c: matmul_add(attn, o_w, x, config=c), configs((16, 32), (64, 128, 256), launches, rows)))
      (gu_s, gu_c, gu_all), (down_s, down_c, down_all), (o_s, o_c, o_all) = best[rows]
      gu_s = busy_seconds(lambda: norm_gate_up_silu(x, norm_w, gu_w, eps=EPS, config=gu_c))
      down_s = busy_seconds(lambda: matmul_add(act, down_w, x, config=down_c))
      o_s = busy_seconds(lambda: matmul_add(attn, o_w, x, config=o_c))
      xla_gu = jax.jit(lambda x: (lambda gu: jax.nn.silu(gu[:, 0]) * gu[:, 1])(
          layers.einsum("TE,ECF->TCF", layers.rms_norm(x, norm_w, EPS), gu_w)))
      xla_down = jax.jit(lambda act, x: x + layers.einsum("TF,FE->TE", act, down_w))
      xla_o = jax.jit(lambda attn, x: x + layers.einsum("TE,EN->TN", attn, o_w))
      row.update(
          gate_up_us=gu_s * 1e6, gate_up_config=gu_c.__dict__, gate_up_xla_us=busy_seconds(lambda: xla_gu(x)) * 1e6,
          down_us=down_s * 1e6, down_config=down_c.__dict__,
          down_xla_us=busy_seconds(lambda: xla_down(act, x)) * 1e6,
          o_us=o_s * 1e6, o_config=o_c.__dict__, o_xla_us=busy_seconds(lambda: xla_o(attn, x)) * 1e6,
          sweeps={"gate_up": gu_all, "down": down_all, "o": o_all})

      # 3. The layer after attention, both ways.
      @jax.jit
      def xla_chain(attn, x):
        h = x + layers.einsum("TE,EN->TN", attn, o_w)
        gu = layers.einsum("TE,ECF->TCF", layers.rms_norm(h, norm_w, EPS), gu_w)
        return h + layers.einsum("TF,FE->TE", jax.nn.silu(gu[:, 0]) * gu[:, 1], down_w)

      @jax.jit
      def fused_chain(attn, x):
        h = matmul_add(attn, o_w, x, config=o_c)
        return matmul_add(norm_gate_up_silu(h, norm_w, gu_w, eps=EPS, config=gu_c), down_w, h, config=down_c)

      a, b = np.asarray(xla_chain(attn, x), np.float32), np.asarray(fused_chain(attn, x), np.float32)
      row["chain_rel_diff"] = float(np.max(np.abs(a - b)) / np.max(np.abs(a)))
      for label, fn in (("xla", xla_chain), ("fused", fused_chain)):
        profile = device_profile(lambda fn=fn: fn(attn, x), calls=20)
        row[f"chain_{label}"] = {k: profile.get(k) for k in ("busy_us", "kernels", "span_us", "top_kernels")}
        row[f"chain_{label}_per_call_us"] = time_jax_per_call(lambda fn=fn: fn(attn, x)) * 1e6
      row["floor_us"] = weight_bytes / bandwidth * 1e6
      report["shapes"][f"{name} T={tokens}"] = row
      print(f"{name} T={tokens}: floor {row['floor_us']:.1f} us; busy xla {row['chain_xla']['busy_us']:.1f} us "
            f"({row['chain_xla']['kernels']} kernels), fused {row['chain_fused']['busy_us']:.1f} us "
            f"({row['chain_fused']['kernels']}); gate/up {gu_s * 1e6:.1f} vs xla {row['gate_up_xla_us']:.1f}, "
            f"down {down_s * 1e6:.1f} vs {row['down_xla_us']:.1f}, o {o_s * 1e6:.1f} vs {row['o_xla_us']:.1f}; "
            f"errors {row['gate_up_rel_err']:.1e} {row['down_rel_err']:.1e}, chain diff {row['chain_rel_diff']:.1e}",
            flush=True)
      with open(out_path, "w") as f:
        json.dump(report, f, indent=1, default=str)


if __name__ == "__main__":
  main(sys.argv[1])
