"""GAN loss terms of losses.py against direct NumPy evaluations of spec.md §5, and diffaugment.py
against a NumPy port of Zhao et al. 2020's DiffAugment functions (written from their formulas)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from softvq_jax import diffaugment as da
from softvq_jax import losses


def _logits(seed, shape=(4, 980)):
  return np.random.RandomState(seed).randn(*shape).astype(np.float32) * 1.5


def _relu(x):
  return np.maximum(x, 0.0)


def _softplus(x):
  return np.log1p(np.exp(-np.abs(x))) + np.maximum(x, 0.0)


# ------------------------------------------------------------------------------------------
# Loss terms.
# ------------------------------------------------------------------------------------------

def test_discriminator_and_generator_losses():
  real, fake = _logits(0), _logits(1)
  hinge = 0.5 * (_relu(1 - real).mean() + _relu(1 + fake).mean())
  vanilla = 0.5 * (_softplus(-real).mean() + _softplus(fake).mean())
  np.testing.assert_allclose(losses.hinge_d_loss(real, fake), hinge, rtol=1e-6)
  np.testing.assert_allclose(losses.discriminator_loss(real, fake, "hinge"), hinge, rtol=1e-6)
  np.testing.assert_allclose(losses.vanilla_d_loss(real, fake), vanilla, rtol=1e-6)
  # Non-saturating = BCE(real -> 1) + BCE(fake -> 0), computed here from the sigmoid.
  sig = lambda z: 1 / (1 + np.exp(-z.astype(np.float64)))  # noqa: E731
  bce = 0.5 * (-np.log(sig(real)).mean() - np.log(1 - sig(fake)).mean())
  np.testing.assert_allclose(losses.discriminator_loss(real, fake, "non-saturating"), bce,
                             rtol=1e-5)
  np.testing.assert_allclose(losses.generator_adversarial_loss(fake), -fake.mean(), rtol=1e-6)
  np.testing.assert_allclose(losses.generator_adversarial_loss(fake, "non-saturating"),
                             -np.log(sig(fake)).mean(), rtol=1e-5)
  assert losses.hinge_d_loss(jnp.asarray(real, jnp.bfloat16), fake).dtype == jnp.float32
  with pytest.raises(ValueError, match="hinge"):
    losses.discriminator_loss(real, fake, "wgan")


def test_lecam_ema_and_regularizer():
  ema = losses.lecam_init()
  ema_np = {"real": 0.0, "fake": 0.0}
  for i in range(3):  # the EMAs are updated before use, starting from 0
    real, fake = _logits(10 + i) + 0.5, _logits(20 + i) - 0.5
    ema = losses.lecam_update(ema, real, fake, decay=0.9)
    ema_np = {"real": ema_np["real"] * 0.9 + real.mean() * 0.1,
              "fake": ema_np["fake"] * 0.9 + fake.mean() * 0.1}
    np.testing.assert_allclose(ema["real"], ema_np["real"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(ema["fake"], ema_np["fake"], rtol=1e-5, atol=1e-7)
  want = (np.square(_relu(real - ema_np["fake"])).mean()
          + np.square(_relu(ema_np["real"] - fake)).mean())
  got = losses.lecam_regularizer(real, fake, ema["real"], ema["fake"])
  np.testing.assert_allclose(got, want, rtol=1e-5)
  # No gradient through the EMAs (constants in the reference: `.item()`).
  g_ema = jax.grad(lambda e: losses.lecam_regularizer(real, fake, e["real"], e["fake"]))(ema)
  assert float(g_ema["real"]) == 0.0 and float(g_ema["fake"]) == 0.0
  g_upd = jax.grad(lambda r: losses.lecam_update(ema, r, fake)["real"])(jnp.asarray(real))
  assert float(jnp.abs(g_upd).max()) == 0.0
  # The reference's decay 0.999 is the default.
  ema = losses.lecam_update(losses.lecam_init(), np.ones(3, np.float32), -np.ones(3, np.float32))
  np.testing.assert_allclose([float(ema["real"]), float(ema["fake"])], [1e-3, -1e-3], rtol=1e-5)


def test_consistency_loss():
  r, f, rs, fs = (_logits(s, (3, 20)) for s in range(4))
  want = 4.0 * np.mean(np.square(np.concatenate([r, f]) - np.concatenate([rs, fs])))
  np.testing.assert_allclose(losses.consistency_loss(r, f, rs, fs, weight=4.0), want, rtol=1e-6)
  # Gradient reaches both the weakly and the strongly augmented logits.
  gr, grs = jax.grad(lambda a, b: losses.consistency_loss(a, f, b, fs), argnums=(0, 1))(r, rs)
  np.testing.assert_allclose(gr, 2 * (r - rs) / (2 * r.size), rtol=1e-5)
  np.testing.assert_allclose(grs, -np.asarray(gr), rtol=1e-6)
  with pytest.raises(ValueError, match="differ"):
    losses.consistency_loss(r, f, rs[:2], fs)


def test_adaptive_generator_weight():
  for rec, adv in [(3.0, 0.5), (2.0, 0.0), (1e3, 1e-3), (0.0, 1.0)]:
    want = np.clip(rec / (adv + 1e-4), 0.0, 1e4)
    np.testing.assert_allclose(losses.adaptive_generator_weight(rec, adv), want, rtol=1e-6)
  assert float(losses.adaptive_generator_weight(2.0, 0.0)) == 1e4  # clamped
  g = jax.grad(lambda a: losses.adaptive_generator_weight(1.0, a))(jnp.float32(0.3))
  assert float(g) == 0.0  # a detached weight, as in the reference


# ------------------------------------------------------------------------------------------
# DiffAugment: NumPy port of the published functions (NCHW, as written by Zhao et al.).
# ------------------------------------------------------------------------------------------

def ref_brightness(x, r):  # r ~ U(0, 1) per example
  return x + (r.reshape(-1, 1, 1, 1) - 0.5)


def ref_saturation(x, r):
  x_mean = x.mean(axis=1, keepdims=True)
  return (x - x_mean) * (r.reshape(-1, 1, 1, 1) * 2) + x_mean


def ref_contrast(x, r):
  x_mean = x.mean(axis=(1, 2, 3), keepdims=True)
  return (x - x_mean) * (r.reshape(-1, 1, 1, 1) + 0.5) + x_mean


def ref_translation(x, tx, ty):  # tx on H (dim 2), ty on W (dim 3), zero padding of 1
  b, _, h, w = x.shape
  gb, gx, gy = np.meshgrid(np.arange(b), np.arange(h), np.arange(w), indexing="ij")
  gx = np.clip(gx + tx.reshape(-1, 1, 1) + 1, 0, h + 1)
  gy = np.clip(gy + ty.reshape(-1, 1, 1) + 1, 0, w + 1)
  x_pad = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
  return x_pad.transpose(0, 2, 3, 1)[gb, gx, gy].transpose(0, 3, 1, 2)


def ref_cutout(x, ox, oy, ratio):
  b, _, h, w = x.shape
  cs = int(h * ratio + 0.5), int(w * ratio + 0.5)
  gb, gx, gy = np.meshgrid(np.arange(b), np.arange(cs[0]), np.arange(cs[1]), indexing="ij")
  gx = np.clip(gx + ox.reshape(-1, 1, 1) - cs[0] // 2, 0, h - 1)
  gy = np.clip(gy + oy.reshape(-1, 1, 1) - cs[1] // 2, 0, w - 1)
  mask = np.ones((b, h, w), x.dtype)
  mask[gb, gx, gy] = 0
  return x * mask[:, None]


def _nchw(x):
  return x.transpose(0, 3, 1, 2)


def _nhwc(x):
  return np.asarray(x).transpose(0, 2, 3, 1)


@pytest.fixture
def images():
  return np.random.RandomState(0).uniform(-1, 1, (5, 16, 24, 3)).astype(np.float32)


def test_color_transforms_match_reference(images):
  r = np.random.RandomState(1).rand(5).astype(np.float32)
  np.testing.assert_allclose(da.brightness(images, r - 0.5),
                             _nhwc(ref_brightness(_nchw(images), r)), atol=1e-6)
  np.testing.assert_allclose(da.saturation(images, r * 2),
                             _nhwc(ref_saturation(_nchw(images), r)), atol=1e-6)
  np.testing.assert_allclose(da.contrast(images, r + 0.5),
                             _nhwc(ref_contrast(_nchw(images), r)), atol=1e-6)


def test_translation_matches_reference(images):
  sy, sx = da.translation_max_shift(16, 24)
  assert (sy, sx) == (2, 3)
  tx = np.array([-sy, sy, 0, 1, -1])
  ty = np.array([sx, -sx, 2, 0, -3])
  got = da.translation(images, np.stack([tx, ty], 1))
  np.testing.assert_array_equal(np.asarray(got), _nhwc(ref_translation(_nchw(images), tx, ty)))


@pytest.mark.parametrize("ratio", [0.2, 0.5])
def test_cutout_matches_reference(images, ratio):
  size = da.cutout_size(16, 24, ratio)
  assert size == (int(16 * ratio + 0.5), int(24 * ratio + 0.5))
  hi = (16 + (1 - size[0] % 2), 24 + (1 - size[1] % 2))  # the reference's exclusive maxima
  ox = np.array([0, hi[0] - 1, 7, 1, 15])
  oy = np.array([hi[1] - 1, 0, 11, 23, 2])
  got = da.cutout(images, np.stack([ox, oy], 1), size)
  np.testing.assert_array_equal(np.asarray(got), _nhwc(ref_cutout(_nchw(images), ox, oy, ratio)))


def test_policy_parsing():
  assert da.parse_policy("color,translation,cutout_0.2") == (
      ("color", None), ("translation", None), ("cutout", 0.2))
  assert da.parse_policy("cutout", cutout_ratio=0.3) == (("cutout", 0.3),)
  assert da.parse_policy("") == ()
  for bad in ("colour", "cutout_x", "color_1", "cutout_2.0"):
    with pytest.raises(ValueError):
      da.parse_policy(bad)


def test_diff_augment_deterministic_per_key(images):
  f = jax.jit(lambda x, k: da.diff_augment(x, k, "color,translation,cutout_0.5", prob=1.0))
  a = np.asarray(f(images, jax.random.key(0)))
  np.testing.assert_array_equal(a, np.asarray(f(images, jax.random.key(0))))
  assert not np.allclose(a, np.asarray(f(images, jax.random.key(1))))
  np.testing.assert_array_equal(
      np.asarray(da.diff_augment(images, jax.random.key(3), "color,translation,cutout", prob=0.0)),
      images)


def test_one_coin_per_item_for_the_whole_batch(images):
  """prob 0.5: each call augments all examples or none with an item; about half of the calls."""
  applied = []
  for seed in range(40):
    out = np.asarray(da.diff_augment(images, jax.random.key(seed), "color", prob=0.5))
    changed = [not np.allclose(out[i], images[i]) for i in range(len(images))]
    assert len(set(changed)) == 1, changed  # the whole batch or none
    applied.append(changed[0])
  assert 8 <= sum(applied) <= 32


def test_translation_and_cutout_parameters_are_per_example_and_in_range(images):
  sy, sx = da.translation_max_shift(16, 24)
  shifts = set()
  for seed in range(6):
    out = np.asarray(da.diff_augment(images, jax.random.key(seed), "translation", prob=1.0))
    for i in range(len(images)):
      found = [(dy, dx) for dy in range(-sy, sy + 1) for dx in range(-sx, sx + 1)
               if np.array_equal(out[i], _nhwc(ref_translation(
                   _nchw(images[i:i + 1]), np.array([dy]), np.array([dx])))[0])]
      assert found, f"example {i}: not a translation within +-({sy}, {sx})"
      shifts.add(found[0])
  assert len(shifts) > 8  # drawn per example
  size = da.cutout_size(16, 24, 0.5)
  for seed in range(4):
    out = np.asarray(da.diff_augment(images, jax.random.key(seed), "cutout_0.5", prob=1.0))
    for i in range(len(images)):
      zero = np.all(out[i] == 0, axis=-1)
      rows, cols = np.nonzero(zero.any(1))[0], np.nonzero(zero.any(0))[0]
      assert 0 < len(rows) <= size[0] and 0 < len(cols) <= size[1]
      assert zero[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()  # one rectangle
      np.testing.assert_array_equal(out[i][~zero], images[i][~zero])


def test_diff_augment_is_differentiable(images):
  w = np.random.RandomState(2).randn(*images.shape).astype(np.float32)
  g = jax.grad(lambda x: jnp.sum(w * da.diff_augment(x, jax.random.key(0),
                                                     "color,translation,cutout", prob=1.0)))(
      jnp.asarray(images))
  assert np.isfinite(np.asarray(g)).all() and np.abs(np.asarray(g)).sum() > 0
