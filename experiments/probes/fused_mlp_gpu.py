# python experiments/probes/fused_mlp_gpu.py OUT.json [llama-3.2-1b,llama-3.1-8b]
"""On a GPU: the skinny matmuls of `pallas_kernels.fused_mlp` against XLA on the same work, at the decode
shapes of Llama-3.2-1B and Llama-3.1-8B (bfloat16).

1. Each kernel against its reference (largest error over the reference's largest magnitude).
2. A sweep of launch parameters per kernel and row count (device busy time per call). Each call reads a
   different copy of the weights, cycling through copies that hold more than twice the L2 cache, so that the
   weights come from HBM as in a model's step (one weight read alone, again and again, stays in L2 and favours
   fewer, longer programs).
3. The layer's part after attention both ways, over `LAYERS` layers with their own weights, from the attention
   output and the residual to the next residual: XLA (o projection + add, RMSNorm, gate/up, SiLU product,
   down + add, as `pdopt.models.layers` computes them) against the three kernels with the sweep's best
   parameters: device busy time and kernels per layer (`device_profile`), and the floor (the weights' bytes
   over the copy bandwidth measured here).
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
L2_BYTES = 64 << 20  # At least the L2 cache of an H100 (50 MB) or H200.
LAYERS = 4


def busy_seconds(fn) -> float:
  """Device busy seconds per call of fn() (the device's own timestamps: no launch or host time)."""
  return device_profile(fn, calls=10)["busy_us"] / 1e6


def copies(w: jax.Array) -> list[jax.Array]:
  """Distinct copies of `w` that together hold at least twice `L2_BYTES`."""
  return [w] + [jnp.copy(w) for _ in range(-(-2 * L2_BYTES // w.nbytes) - 1)]


def per_weight(fn, ws):
  """Device busy seconds of one fn(w), w cycling through the copies `ws`."""
  return busy_seconds(lambda: [fn(w) for w in ws]) / len(ws)


def sweep(fn, configs, ws):
  """(best busy seconds, best config, all) of fn(config, w), per weight copy of `ws`, over the configs that
  compile."""
  results = []
  for config in configs:
    try:
      seconds = per_weight(lambda w, config=config: fn(config, w), ws)
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
  launches = [(4, 3), (4, 5), (8, 3)]
  for name, (hidden, width) in SHAPES.items():
    best = {}
    ks = jax.random.split(key, 6 + 4 * LAYERS)
    layer_weights = []  # (o, gate/up, down, norm) per layer
    for i in range(LAYERS):
      k = ks[6 + 4 * i:10 + 4 * i]
      layer_weights.append((
          (jax.random.normal(k[0], (hidden, hidden)) / np.sqrt(hidden)).astype(jnp.bfloat16),
          (jax.random.normal(k[1], (hidden, 2, width)) / np.sqrt(hidden)).astype(jnp.bfloat16),
          (jax.random.normal(k[2], (width, hidden)) / np.sqrt(width)).astype(jnp.bfloat16),
          (1 + 0.1 * jax.random.normal(k[3], (hidden,))).astype(jnp.bfloat16)))
    o_w, gu_w, down_w, norm_w = layer_weights[0]
    o_ws, gu_ws, down_ws = copies(o_w), copies(gu_w), copies(down_w)
    weight_bytes = o_w.nbytes + gu_w.nbytes + down_w.nbytes
    for tokens in TOKENS:
      attn = jax.random.normal(ks[4], (tokens, hidden)).astype(jnp.bfloat16)
      x = (3 * jax.random.normal(ks[5], (tokens, hidden))).astype(jnp.bfloat16)
      act = jax.nn.silu(x[:, :1]) * jnp.ones((tokens, width), jnp.bfloat16)
      row = {"weight_copies": {"o": len(o_ws), "gate_up": len(gu_ws), "down": len(down_ws)}}
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
            sweep(lambda c, w: norm_gate_up_silu(x, norm_w, w, eps=EPS, config=c),
                  configs((16, 32, 64), (64, 128, 256, 512), launches, rows), gu_ws),
            sweep(lambda c, w: matmul_add(act, w, x, config=c),
                  configs((16, 32, 64), (128, 256, 512, 1024), launches, rows), down_ws),
            sweep(lambda c, w: matmul_add(attn, w, x, config=c), configs((16, 32, 64), (64, 128, 256), launches, rows),
                  o_ws))
      (gu_s, gu_c, gu_all), (down_s, down_c, down_all), (o_s, o_c, o_all) = best[rows]
      gu_s = per_weight(lambda w: norm_gate_up_silu(x, norm_w, w, eps=EPS, config=gu_c), gu_ws)
      down_s = per_weight(lambda w: matmul_add(act, w, x, config=down_c), down_ws)
      o_s = per_weight(lambda w: matmul_add(attn, w, x, config=o_c), o_ws)
      xla_gu = jax.jit(lambda x, w: (lambda gu: jax.nn.silu(gu[:, 0]) * gu[:, 1])(
          layers.einsum("TE,ECF->TCF", layers.rms_norm(x, norm_w, EPS), w)))
      xla_add = jax.jit(lambda a, w, x: x + layers.einsum("TF,FE->TE", a, w))
      row.update(
          gate_up_us=gu_s * 1e6, gate_up_config=gu_c.__dict__,
          gate_up_xla_us=per_weight(lambda w: xla_gu(x, w), gu_ws) * 1e6,
          down_us=down_s * 1e6, down_config=down_c.__dict__,
          down_xla_us=per_weight(lambda w: xla_add(act, w, x), down_ws) * 1e6,
          o_us=o_s * 1e6, o_config=o_c.__dict__, o_xla_us=per_weight(lambda w: xla_add(attn, w, x), o_ws) * 1e6,
          sweeps={"gate_up": gu_all, "down": down_all, "o": o_all})

      # 3. The layers after attention, both ways (the attention output reused for every layer).
      @jax.jit
      def xla_chain(attn, x, weights):
        for o, gu_w, down, norm in weights:
          h = x + layers.einsum("TE,EN->TN", attn, o)
          gu = layers.einsum("TE,ECF->TCF", layers.rms_norm(h, norm, EPS), gu_w)
          x = h + layers.einsum("TF,FE->TE", jax.nn.silu(gu[:, 0]) * gu[:, 1], down)
        return x

      @jax.jit
      def fused_chain(attn, x, weights):
        for o, gu_w, down, norm in weights:
          h = matmul_add(attn, o, x, config=o_c)
          x = matmul_add(norm_gate_up_silu(h, norm, gu_w, eps=EPS, config=gu_c), down, h, config=down_c)
        return x

      a = np.asarray(xla_chain(attn, x, layer_weights), np.float32)
      b = np.asarray(fused_chain(attn, x, layer_weights), np.float32)
      row["chain_rel_diff"] = float(np.max(np.abs(a - b)) / np.max(np.abs(a)))
      for label, fn in (("xla", xla_chain), ("fused", fused_chain)):
        profile = device_profile(lambda fn=fn: fn(attn, x, layer_weights), calls=10)
        row[f"chain_{label}"] = {k: profile.get(k) for k in ("busy_us", "kernels", "span_us", "top_kernels")}
        row[f"chain_{label}_per_layer_us"] = profile["busy_us"] / LAYERS
        row[f"chain_{label}_kernels_per_layer"] = profile["kernels"] / LAYERS
      row["floor_us"] = weight_bytes / bandwidth * 1e6
      report["shapes"][f"{name} T={tokens}"] = row
      print(f"{name} T={tokens}: per layer, floor {row['floor_us']:.1f} us; busy xla "
            f"{row['chain_xla_per_layer_us']:.1f} us ({row['chain_xla_kernels_per_layer']:g} kernels), "
            f"fused {row['chain_fused_per_layer_us']:.1f} us ({row['chain_fused_kernels_per_layer']:g}); "
            f"gate/up {gu_s * 1e6:.1f} vs xla {row['gate_up_xla_us']:.1f} {gu_c}, "
            f"down {down_s * 1e6:.1f} vs {row['down_xla_us']:.1f} {down_c}, o {o_s * 1e6:.1f} vs "
            f"{row['o_xla_us']:.1f} {o_c}; errors {row['gate_up_rel_err']:.1e} {row['down_rel_err']:.1e}, "
            f"chain diff {row['chain_rel_diff']:.1e}", flush=True)
      with open(out_path, "w") as f:
        json.dump(report, f, indent=1, default=str)


if __name__ == "__main__":
  main(sys.argv[1])
