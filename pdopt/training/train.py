"""Trains pdopt's shipped byte-level models with optax, and evaluates them.

Training runs a dense causal forward over a `[B, T]` batch (`dense_logits`) that calls the very modules and
`nnx.Param` tensors of `pdopt.models.transformer.Transformer`: the same norms, projections, RoPE and MLP, and
the GQA head grouping of the reference attention (query head h reads KV head h // G). Only the attention
itself is dense with a causal mask instead of ragged and paged, because the paged reference gathers a
sequence's keys per query token. The trained state is the Transformer's own state, so `pdopt.logits` and the
engine serve it unchanged; `ragged_eval_loss` checks that the two forwards agree on held-out text.

Losses are in nats per token; one token is one byte except the BOS/EOS of each file, so bits per byte is
loss / ln 2 (within about 0.1% given files of several kilobytes). Letters of shapes and einsums: the legend of
`pallas_kernels` (`pallas_kernels/__init__.py`).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import pathlib
import shutil
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from pdopt.models import checkpoints, tokenizer as tok
from pdopt.models.config import Family, ModelConfig
from pdopt.models.layers import einsum
from pdopt.models.transformer import Transformer, init_model, logits as ragged_logits
from pdopt.training import data


def model_config(c: ml_collections.ConfigDict) -> ModelConfig:
  """The ModelConfig of one `config.models.<name>` entry (byte vocabulary, Llama family, float32)."""
  return ModelConfig(
      family=Family.LLAMA, vocab_size=tok.VOCAB_SIZE, hidden_size=c.hidden_size,
      intermediate_size=c.intermediate_size, num_layers=c.num_layers, num_heads=c.num_heads,
      num_kv_heads=c.num_kv_heads, head_dim=c.hidden_size // c.num_heads,
      max_position_embeddings=c.max_position_embeddings, rope_theta=10000.0, rms_norm_eps=1e-5,
      tie_word_embeddings=False, dtype="float32", bos_token_id=tok.BOS_ID, eos_token_id=(tok.EOS_ID,))


def dense_logits(model: Transformer, tokens: jax.Array) -> jax.Array:
  """Causal forward of whole sequences, each starting at position 0.

  Args:
    model: the Transformer (no sliding window).
    tokens: [B, T] int32.

  Returns:
    [B, T, V] float32 logits.
  """
  cfg = model.config
  if cfg.sliding_window is not None:
    raise NotImplementedError("dense_logits does not implement sliding-window attention")
  b, l = tokens.shape
  k_heads, group = cfg.num_kv_heads, cfg.group_size
  positions = jnp.tile(jnp.arange(l, dtype=jnp.int32), b)  # [B*T]
  causal = jnp.tril(jnp.ones((l, l), bool))  # [T, J]
  x = model.embed[...][tokens.reshape(-1)]  # [B*T, E]
  for layer in model.layers:
    attn = layer.attn
    h = layer.input_norm(x)
    q, k, v = attn.project(h, positions)
    qg = q.astype(jnp.float32).reshape(b, l, k_heads, group, -1)  # [B, T, K, G, D]
    kb = k.astype(jnp.float32).reshape(b, l, k_heads, -1)  # [B, J, K, D]
    vb = v.astype(jnp.float32).reshape(b, l, k_heads, -1)  # [B, J, K, D]
    scores = jnp.einsum("BTKGD,BJKD->BKGTJ", qg, kb, precision=jax.lax.Precision.HIGHEST) * attn.sm_scale
    scores = jnp.where(causal, scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("BKGTJ,BJKD->BTKGD", probs, vb, precision=jax.lax.Precision.HIGHEST)
    out = out.reshape(b * l, cfg.num_heads, cfg.head_dim).astype(x.dtype)
    x = x + einsum("THD,HDE->TE", out, attn.o_proj[...])
    x = x + layer.mlp(layer.post_attn_norm(x))
  x = model.final_norm(x)
  head = model.embed[...].T if cfg.tie_word_embeddings else model.lm_head[...]
  return einsum("TE,EV->TV", x, head, out_dtype=jnp.float32).reshape(b, l, -1)


def loss_fn(model: Transformer, batch: jax.Array) -> jax.Array:
  """Mean next-token cross entropy (nats) of `batch` [B, T + 1]."""
  logits = dense_logits(model, batch[:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()


def make_optimizer(c: ml_collections.ConfigDict, steps: int) -> optax.GradientTransformation:
  """AdamW with linear warmup, cosine decay to 10% and global-norm clipping."""
  warmup = min(c.warmup_steps, max(1, steps // 10))
  schedule = optax.warmup_cosine_decay_schedule(0.0, c.learning_rate, warmup, max(steps, warmup + 1),
                                                end_value=c.learning_rate * 0.1)
  return optax.chain(optax.clip_by_global_norm(c.grad_clip),
                     optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=c.weight_decay))


class Trainer:
  """A model, its optimizer state and a jitted train step (the model's Param state is updated in place)."""

  def __init__(self, model: Transformer, optimizer: optax.GradientTransformation):
    self.model = model
    self.graphdef, self.params, self.rest = nnx.split(model, nnx.Param, ...)
    self.opt_state = optimizer.init(self.params)

    def step(params, opt_state, batch):
      def loss_of(p):
        return loss_fn(nnx.merge(self.graphdef, p, self.rest), batch)
      loss, grads = jax.value_and_grad(loss_of)(params)
      updates, opt_state = optimizer.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, loss

    self._step = jax.jit(step, donate_argnums=(0, 1))
    self._loss = jax.jit(lambda params, batch: loss_fn(nnx.merge(self.graphdef, params, self.rest), batch))

  def step(self, batch: np.ndarray) -> float:
    """One optimizer step on `batch` [B, T + 1]; returns the loss before the update (nats/token)."""
    self.params, self.opt_state, loss = self._step(self.params, self.opt_state, jnp.asarray(batch))
    return float(loss)

  def loss(self, batch: np.ndarray) -> float:
    return float(self._loss(self.params, jnp.asarray(batch)))

  def sync(self) -> Transformer:
    """Writes the trained parameters back into the model and returns it."""
    nnx.update(self.model, self.params)
    return self.model


def dense_eval_loss(model: Transformer, windows: np.ndarray, batch_size: int = 8) -> float:
  """Mean loss (nats/token) of the dense forward over `windows` [N, T + 1]."""
  graphdef, state = nnx.split(model)
  fn = jax.jit(lambda s, b: loss_fn(nnx.merge(graphdef, s), b))
  losses = [float(fn(state, jnp.asarray(windows[i:i + batch_size]))) * len(windows[i:i + batch_size])
            for i in range(0, len(windows), batch_size)]
  return sum(losses) / len(windows)


def ragged_eval_loss(model: Transformer, windows: np.ndarray) -> float:
  """Mean loss (nats/token) of `pdopt.logits` (the serving forward) over `windows` [N, T + 1]."""
  total = 0.0
  for w in windows:
    lg = ragged_logits(model, w[:-1])
    lg = lg - lg.max(-1, keepdims=True)
    logp = lg - np.log(np.exp(lg).sum(-1, keepdims=True))
    total += float(-logp[np.arange(len(w) - 1), w[1:]].mean())
  return total / len(windows)


def bf16_rounded(model: Transformer) -> Transformer:
  """The model with every parameter rounded to bfloat16 and back (what the shipped checkpoint holds)."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  params = jax.tree.map(lambda p: p.astype(jnp.bfloat16).astype(p.dtype), params)
  return nnx.merge(graphdef, params, rest)


def save_bf16(model: Transformer, directory: str | os.PathLike) -> None:
  """Saves the model with bfloat16 parameter storage (half the bytes).

  The config keeps the model's dtype (float32), so `checkpoints.restore` upcasts the stored bfloat16 values
  exactly: the restored model equals `bf16_rounded(model)` and computes in float32.
  """
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
  checkpoints.save(nnx.merge(graphdef, params, rest), directory)


def _settings(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
  """The model's training settings with the CPU-small overrides applied when `config.cpu_small`."""
  c = ml_collections.ConfigDict(config.models[name].to_dict())
  if config.cpu_small:
    c.update(config.models[name].cpu_small.to_dict())
  del c["cpu_small"]
  return c


def train_model(name: str, config: ml_collections.ConfigDict, corpus: data.Corpus,
                run_dir: pathlib.Path) -> tuple[Transformer, dict[str, Any]]:
  """Trains `config.models[name]`, logging the loss curve to `run_dir/<name>/loss.csv`.

  Returns:
    (the trained float32 model, a summary dict for the manifest).
  """
  c = _settings(config, name)
  mcfg = model_config(c)
  model = init_model(mcfg, seed=c.seed)
  trainer = Trainer(model, make_optimizer(c, c.steps))
  rng = np.random.default_rng(c.seed)
  eval_batch = data.eval_windows(corpus.eval_tokens, c.seq_len, config.eval_windows)
  out_dir = run_dir / name
  out_dir.mkdir(parents=True, exist_ok=True)
  curve = []
  start = time.time()
  with open(out_dir / "loss.csv", "w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f)
    writer.writerow(["step", "train_loss", "eval_loss", "seconds"])
    for step in range(1, c.steps + 1):
      loss = trainer.step(data.sample_batch(corpus.train_tokens, c.batch_size, c.seq_len, rng))
      eval_loss = ""
      if step % config.eval_every == 0 or step == c.steps:
        eval_loss = dense_eval_loss(trainer.sync(), eval_batch)
      row = [step, round(loss, 5), "" if eval_loss == "" else round(eval_loss, 5), round(time.time() - start, 2)]
      writer.writerow(row)
      f.flush()
      curve.append(row)
      if step % config.log_every == 0 or step == c.steps:
        logging.info("%s step %d/%d loss %.4f eval %s (%.0f s)", name, step, c.steps, loss, eval_loss,
                     time.time() - start)
  model = trainer.sync()
  final_train = float(np.mean([r[1] for r in curve[-min(20, len(curve)):]]))
  eval_f32 = dense_eval_loss(model, eval_batch)
  shipped = bf16_rounded(model)
  eval_bf16 = dense_eval_loss(shipped, eval_batch)
  check = eval_batch[:config.verify_windows]
  verify = {"windows": int(len(check))}
  if len(check):
    verify.update(dense_loss=round(dense_eval_loss(shipped, check), 6),
                  pdopt_logits_loss=round(ragged_eval_loss(shipped, check), 6))
  summary = {
      "num_params": mcfg.num_params(),
      "training": {k: v for k, v in c.to_dict().items()},
      "tokens_seen": c.steps * c.batch_size * c.seq_len,
      "train_seconds": round(time.time() - start, 1),
      "final_train_loss_last20_mean": round(final_train, 5),
      "eval": {
          "windows": config.eval_windows, "seq_len": c.seq_len,
          "loss_float32": round(eval_f32, 5),
          "loss": round(eval_bf16, 5),
          "perplexity": round(math.exp(eval_bf16), 4),
          "bits_per_byte": round(eval_bf16 / math.log(2), 5),
          "uniform_loss": round(math.log(tok.VOCAB_SIZE), 5),
          "note": "loss/perplexity/bits_per_byte of the shipped (bfloat16-stored) weights, nats per token",
      },
      "verify": verify,
  }
  with open(out_dir / "summary.json", "w", encoding="utf-8") as f:
    json.dump(summary, f, indent=2)
  return model, summary


def _warn_if_corpus_differs(config: ml_collections.ConfigDict, corpus_manifest: dict[str, Any]) -> None:
  """Logs a warning when the stdlib read here differs from the one the shipped checkpoints saw."""
  for name in config.models:
    path = pathlib.Path(config.out_dir or "pdopt/pretrained") / config.models[name].checkpoint_name / "manifest.json"
    if not path.exists():
      continue
    with open(path, encoding="utf-8") as f:
      shipped = json.load(f).get("corpus", {})
    for key in ("train_sha256", "eval_sha256"):
      if shipped.get(key) != corpus_manifest[key]:
        logging.warning("corpus differs from the one %s was trained on (%s: %s here, %s in %s; Python %s here, "
                        "%s there)", path.parent.name, key, corpus_manifest[key], shipped.get(key), path,
                        corpus_manifest["python_version"], shipped.get("python_version"))


def run(config: ml_collections.ConfigDict) -> dict[str, dict[str, Any]]:
  """Trains every model of `config.train`, and saves checkpoints with manifests to `config.out_dir`.

  Args:
    config: see `configs/train_tiny.py`.

  Returns:
    Model name -> summary (also written to `<run_dir>/<name>/summary.json` and the manifest).
  """
  corpus = data.load_corpus(config.holdout_every, config.corpus_root or None,
                            exclude=tuple(g.strip() for g in config.exclude.split(",") if g.strip()))
  corpus_manifest = corpus.manifest()
  _warn_if_corpus_differs(config, corpus_manifest)
  run_dir = pathlib.Path(config.run_dir)
  run_dir.mkdir(parents=True, exist_ok=True)
  summaries = {}
  for name in [n.strip() for n in config.train.split(",") if n.strip()]:
    if name not in config.models:
      raise ValueError(f"unknown model {name!r} in config.train; valid: {', '.join(sorted(config.models))}")
    model, summary = train_model(name, config, corpus, run_dir)
    summaries[name] = summary
    if config.out_dir:
      target = pathlib.Path(config.out_dir) / config.models[name].checkpoint_name
      tmp = pathlib.Path(tempfile.mkdtemp(dir=target.parent if target.parent.exists() else None))
      save_bf16(model, tmp / "ckpt")
      manifest = {"name": config.models[name].checkpoint_name,
                  "tokenizer": "byte-level: ids 0-255 bytes, 256 BOS, 257 EOS, 258-263 reserved (vocab 264)",
                  "cpu_small": bool(config.cpu_small), "device": str(jax.devices()[0].device_kind),
                  "parameter_storage": "bfloat16 (restored as float32)", **summary, "corpus": corpus_manifest}
      with open(tmp / "ckpt" / "manifest.json", "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)
      shutil.rmtree(target, ignore_errors=True)
      shutil.move(str(tmp / "ckpt"), target)
      shutil.rmtree(tmp, ignore_errors=True)
      logging.info("saved %s to %s", name, target)
  return summaries
