"""SoftVQ: the soft vector quantizer (spec.md §1.3).

A token is not snapped to one codeword: it becomes the softmax(similarity / tau)-weighted sum of
all codewords of its codebook, so the whole map is differentiable and the "quantised" tokens are
continuous. Everything here runs in float32 whatever the model's compute dtype, because the
temperature (0.07) and the entropy term's 1/0.01 sharpen logits enough for bfloat16 to matter.

Gradient paths (spec.md §1.3 / 6): the logits see a stop-gradient codebook, the weighted sum does not,
so the codebook learns only through the decoder's use of z_q and z learns through both. There is no
straight-through estimator, commitment loss or codebook loss.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from softvq_jax.models.vit import l2_normalize, make_param

Array = jax.Array

# Constants of the reference entropy loss (spec.md §1.3 step 7).
ENTROPY_TEMPERATURE = 0.01
ENTROPY_EPS = 1e-6


def entropy_loss(logits: Array) -> Array:
  """H_sample - H_avg over rows of [R, K] un-tempered logits (spec.md §1.3 step 7), unweighted.

  Low per-token entropy (confident assignments) and high entropy of the average assignment
  (all codes used) both lower it.
  """
  a = logits / ENTROPY_TEMPERATURE
  p = jax.nn.softmax(a, axis=-1)
  logp = jax.nn.log_softmax(a, axis=-1)
  sample_entropy = -jnp.mean(jnp.sum(p * logp, axis=-1))
  avg_p = jnp.mean(p, axis=0)
  avg_entropy = -jnp.sum(avg_p * jnp.log(avg_p + ENTROPY_EPS))
  return sample_entropy - avg_entropy


@dataclasses.dataclass
class QuantizerOutput:
  """What one quantizer call returns (a pytree, so it crosses jit boundaries)."""
  z_q: Array             # [B, N, e] float32: the tokens the decoder and generators consume
  entropy_loss: Array    # [] float32, unweighted H_sample - H_avg
  stats: dict            # scalars and per-codebook arrays, see `usage_stats`


jax.tree_util.register_dataclass(QuantizerOutput, data_fields=["z_q", "entropy_loss", "stats"],
                                 meta_fields=[])


def usage_stats(probs: Array, logits: Array, z_hat: Array, z_q: Array) -> dict:
  """Codebook diagnostics, computed correctly (the reference's usage counter is mis-indexed).

  probs, logits: [C, R, K] (R = B * N / C rows per codebook); z_hat, z_q: [C, R, e].
  - `perplexity`: exp(entropy of the mean soft assignment), per codebook [C]; K means uniform use.
  - `usage`: fraction of the K codes that are some row's argmax in this batch, per codebook [C].
  - `code_hist`: [C, K] argmax counts, summed over steps by the trainer for windowed usage.
  - `cos_sim`, `max_prob`, `mean_prob` as the reference reports them.
  """
  k = probs.shape[-1]
  avg_p = jnp.mean(probs, axis=1)  # [C, K]
  perplexity = jnp.exp(-jnp.sum(avg_p * jnp.log(avg_p + ENTROPY_EPS), axis=-1))
  idx = jnp.argmax(logits, axis=-1)  # [C, R]
  hist = jnp.sum(jax.nn.one_hot(idx, k, dtype=jnp.int32), axis=1)  # [C, K]
  usage = jnp.mean((hist > 0).astype(jnp.float32), axis=-1)
  cos = jnp.sum(l2_normalize(z_hat) * l2_normalize(z_q), axis=-1)
  return {
      "perplexity": perplexity,
      "usage": usage,
      "code_hist": hist,
      "cos_sim": jnp.mean(cos),
      "max_prob": jnp.mean(jnp.max(probs, axis=-1)),
      "mean_prob": jnp.mean(probs),
  }


def soft_quantize(z: Array, codebook: Array, *, tau: float, l2_norm: bool = True,
                  with_stats: bool = True) -> QuantizerOutput:
  """z [B, N, e], codebook [C, K, e] -> QuantizerOutput (pure function of the spec's formulas).

  Token t belongs to codebook t // (N / C): contiguous segments of the sequence.
  """
  b, n, e = z.shape
  c, k, e2 = codebook.shape
  if e != e2:
    raise ValueError(f"token dim {e} != codebook dim {e2}")
  if n % c:
    raise ValueError(f"{n} tokens cannot be split over {c} codebooks")
  seg = n // c
  z = z.astype(jnp.float32)
  zc = z.reshape(b, c, seg, e).transpose(1, 0, 2, 3).reshape(c, b * seg, e)  # [C, R, e]
  emb = codebook.astype(jnp.float32)
  if l2_norm:
    zc = l2_normalize(zc)
    emb = l2_normalize(emb)
  hp = jax.lax.Precision.HIGHEST  # tiny matmuls; keep the sharp softmax exact on TPU too
  logits = jnp.einsum("cre,cke->crk", zc, jax.lax.stop_gradient(emb), precision=hp)
  probs = jax.nn.softmax(logits / tau, axis=-1)
  zq = jnp.einsum("crk,cke->cre", probs, emb, precision=hp)  # codebook gets gradient here
  z_q = zq.reshape(c, b, seg, e).transpose(1, 0, 2, 3).reshape(b, n, e)
  ent = entropy_loss(logits.reshape(c * b * seg, k))
  stats = usage_stats(probs, logits, zc, zq) if with_stats else {}
  return QuantizerOutput(z_q=z_q, entropy_loss=ent, stats=stats)


def code_probs(z: Array, codebook: Array, *, tau: float, l2_norm: bool = True) -> Array:
  """Soft assignments of tokens to their codebook's codes: z [B, N, e] -> probs [B, C, N/C, K].

  The same logits and softmax as `soft_quantize`, kept per example so that evaluation can mask
  padded examples out of usage and perplexity (`soft_quantize`'s statistics pool the batch).
  """
  b, n, e = z.shape
  c = codebook.shape[0]
  zc = z.astype(jnp.float32).reshape(b, c, n // c, e)
  emb = codebook.astype(jnp.float32)
  if l2_norm:
    zc, emb = l2_normalize(zc), l2_normalize(emb)
  logits = jnp.einsum("bcse,cke->bcsk", zc, emb, precision=jax.lax.Precision.HIGHEST)
  return jax.nn.softmax(logits / tau, axis=-1)


class SoftVectorQuantizer(nnx.Module):
  """Holds the codebook `embedding` [C, K, e] (official key `quantize.embedding`)."""

  def __init__(self, codebook_size: int, embed_dim: int, num_codebooks: int = 1, *,
               tau: float = 0.07, l2_norm: bool = True, rngs: nnx.Rngs):
    self.tau = tau
    self.l2_norm = l2_norm
    bound = 1.0 / codebook_size

    def init(key, shape, dtype):  # uniform(-1/K, 1/K), l2-normalised once if l2_norm
      w = jax.random.uniform(key, shape, dtype, -bound, bound)
      return l2_normalize(w) if l2_norm else w

    self.embedding = make_param(rngs, init, (num_codebooks, codebook_size, embed_dim),
                                (None, "vocab", None))

  def __call__(self, z: Array, *, with_stats: bool = True) -> QuantizerOutput:
    return soft_quantize(z, self.embedding[...], tau=self.tau, l2_norm=self.l2_norm,
                         with_stats=with_stats)
