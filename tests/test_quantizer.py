"""SoftVQ quantizer against an independent NumPy implementation of spec.md §1.3 (values and gradients)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from softvq_jax.models import quantizer


def np_normalize(x):
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def np_softmax(a):
  a = a - a.max(-1, keepdims=True)
  e = np.exp(a)
  return e / e.sum(-1, keepdims=True)


def np_softvq(z, emb_logits, emb_sum, tau, l2=True):
  """Spec 1.3 in NumPy. The codebook enters twice so the stop-gradient is explicit: the logits use
  `emb_logits` (no gradient), the weighted sum uses `emb_sum` (gradient)."""
  b, n, e = z.shape
  c, k, _ = emb_sum.shape
  seg = n // c
  zc = z.reshape(b, c, seg, e).transpose(1, 0, 2, 3).reshape(c, b * seg, e)
  el, es = emb_logits, emb_sum
  if l2:
    zc, el, es = np_normalize(zc), np_normalize(el), np_normalize(es)
  logits = np.einsum("cre,cke->crk", zc, el)
  q = np_softmax(logits / tau)
  zq = np.einsum("crk,cke->cre", q, es)
  z_q = zq.reshape(c, b, seg, e).transpose(1, 0, 2, 3).reshape(b, n, e)
  flat = logits.reshape(-1, k) / 0.01
  p = np_softmax(flat)
  logp = np.log(p)
  h_sample = -np.mean(np.sum(p * logp, -1))
  pbar = p.mean(0)
  h_avg = -np.sum(pbar * np.log(pbar + 1e-6))
  return z_q, h_sample - h_avg, q


def _inputs(seed=0, b=2, n=8, c=2, k=16, e=4):
  rs = np.random.RandomState(seed)
  return rs.randn(b, n, e), rs.randn(c, k, e) * 0.3


@pytest.mark.parametrize("l2", [True, False])
def test_values_match_numpy(l2):
  z, emb = _inputs()
  tau = 0.07 if l2 else 1.0
  ref_zq, ref_ent, ref_q = np_softvq(z, emb, emb, tau, l2)
  out = quantizer.soft_quantize(jnp.asarray(z, jnp.float32), jnp.asarray(emb, jnp.float32),
                                tau=tau, l2_norm=l2)
  np.testing.assert_allclose(np.asarray(out.z_q), ref_zq, atol=1e-5)
  np.testing.assert_allclose(float(out.entropy_loss), ref_ent, atol=1e-5)
  # statistics: perplexity of the mean assignment per codebook, argmax usage per codebook
  pbar = ref_q.mean(1)
  np.testing.assert_allclose(np.asarray(out.stats["perplexity"]),
                             np.exp(-np.sum(pbar * np.log(pbar + 1e-6), -1)), rtol=1e-5)
  idx = ref_q.argmax(-1)
  usage = [len(np.unique(idx[i])) / emb.shape[1] for i in range(emb.shape[0])]
  np.testing.assert_allclose(np.asarray(out.stats["usage"]), usage)
  assert int(out.stats["code_hist"].sum()) == z.shape[0] * z.shape[1]


def test_token_segments_are_contiguous():
  """Token t uses codebook t // (N / C): making codebook 1 huge changes only the second half."""
  z, emb = _inputs()
  emb2 = emb.copy()
  emb2[1] *= 5.0
  a = quantizer.soft_quantize(jnp.asarray(z), jnp.asarray(emb), tau=0.07, l2_norm=False).z_q
  b = quantizer.soft_quantize(jnp.asarray(z), jnp.asarray(emb2), tau=0.07, l2_norm=False).z_q
  np.testing.assert_array_equal(np.asarray(a[:, :4]), np.asarray(b[:, :4]))
  assert not np.allclose(np.asarray(a[:, 4:]), np.asarray(b[:, 4:]))


def _fd_grad(f, x, eps=1e-6):
  g = np.zeros_like(x)
  it = np.nditer(x, flags=["multi_index"])
  for _ in it:
    i = it.multi_index
    xp, xm = x.copy(), x.copy()
    xp[i] += eps
    xm[i] -= eps
    g[i] = (f(xp) - f(xm)) / (2 * eps)
  return g


def test_gradients_match_numpy_finite_differences():
  """d/dz and d/dcodebook of a scalar of z_q and the entropy loss, incl. the stop-gradient."""
  z, emb = _inputs(seed=3)
  w = np.random.RandomState(4).randn(*z.shape)

  def np_obj(z_, el, es):
    zq, ent, _ = np_softvq(z_, el, es, 0.07)
    return float(np.sum(zq * w) + 0.5 * ent)

  g_z_ref = _fd_grad(lambda x: np_obj(x, emb, emb), z)
  g_e_ref = _fd_grad(lambda x: np_obj(z, emb, x), emb)  # only through the weighted sum

  with jax.enable_x64(True):
    def obj(z_, e_):
      out = quantizer.soft_quantize(z_, e_, tau=0.07, with_stats=False)
      return jnp.sum(out.z_q * w) + 0.5 * out.entropy_loss
    g_z, g_e = jax.grad(obj, argnums=(0, 1))(jnp.asarray(z), jnp.asarray(emb))
    g_z, g_e = np.asarray(g_z), np.asarray(g_e)
  np.testing.assert_allclose(g_z, g_z_ref, atol=1e-5)
  np.testing.assert_allclose(g_e, g_e_ref, atol=1e-5)
  assert np.abs(g_e).max() > 1e-3 and np.abs(g_z).max() > 1e-3


def test_entropy_gradient_reaches_tokens_only():
  z, emb = _inputs(seed=5)
  g_e = jax.grad(lambda e_: quantizer.soft_quantize(
      jnp.asarray(z, jnp.float32), e_, tau=0.07).entropy_loss)(jnp.asarray(emb, jnp.float32))
  assert float(jnp.abs(g_e).max()) == 0.0


def test_init_is_normalised_and_rejects_bad_split():
  from flax import nnx
  q = quantizer.SoftVectorQuantizer(32, 8, 4, rngs=nnx.Rngs(0))
  np.testing.assert_allclose(np.linalg.norm(np.asarray(q.embedding[...]), axis=-1), 1.0, rtol=1e-5)
  with pytest.raises(ValueError, match="cannot be split over 4 codebooks"):
    q(jnp.zeros((1, 6, 8)))
