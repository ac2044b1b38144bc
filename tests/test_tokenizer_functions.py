"""The public pure-function form of a tokenizer (softvq_jax.tokenizer_functions /
Tokenizer.functions): what a Flax app calls inside its own jitted, sharded step. Must equal
tok.encode / tok.decode."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import softvq_jax
from softvq_jax import pixels
from softvq_jax.models.tokenizer import TokenizerConfig, build_tokenizer


@pytest.fixture(scope="module")
def tok():
  cfg = TokenizerConfig(image_size=32, patch_size=16, encoder_size="micro", decoder_size="micro",
                        num_latent_tokens=8, codebook_size=16, codebook_embed_dim=4,
                        num_codebooks=2, attention_backend="xla", vq_mean=0.25, vq_std=0.5)
  return softvq_jax.Tokenizer(cfg, build_tokenizer(cfg, seed=0))


def _images(n=16, seed=0):
  return np.random.default_rng(seed).uniform(-1, 1, (n, 32, 32, 3)).astype(np.float32)


def test_public_names(tok):
  fns = softvq_jax.tokenizer_functions(tok)
  assert isinstance(fns, softvq_jax.TokenizerFunctions)
  assert fns.config is tok.config
  params, encode, decode, _ = tok.functions()  # a NamedTuple: unpacks
  assert jax.tree.structure(params) == jax.tree.structure(fns.params)
  assert callable(encode) and callable(decode)


def test_jitted_pure_functions_equal_the_methods(tok):
  fns = softvq_jax.tokenizer_functions(tok)
  images = _images()
  enc = jax.jit(fns.encode, static_argnames="normalize")
  dec = jax.jit(fns.decode, static_argnames="denormalize")
  z = enc(fns.params, images)
  np.testing.assert_allclose(z, tok.encode(images), rtol=1e-6, atol=1e-6)
  zn = enc(fns.params, images, normalize=True)
  np.testing.assert_allclose(zn, tok.encode(images, normalize=True), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(zn, (np.asarray(z) - 0.25) / 0.5, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(dec(fns.params, z), tok.decode(z), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dec(fns.params, zn, denormalize=True),
                             tok.decode(zn, denormalize=True), rtol=1e-5, atol=1e-5)
  # uint8 images are scaled as the input pipeline does (pixels.to_model_range).
  u8 = np.random.default_rng(1).integers(0, 256, (4, 32, 32, 3)).astype(np.uint8)
  np.testing.assert_allclose(enc(fns.params, u8),
                             tok.encode(pixels.to_model_range(jnp.asarray(u8))), rtol=1e-6,
                             atol=1e-6)


def test_sharded_over_eight_devices_equals_the_methods(tok):
  """Batch split over 8 devices, weights replicated (the generator trainer's online path)."""
  assert len(jax.devices()) >= 8
  fns = softvq_jax.tokenizer_functions(tok)
  mesh = Mesh(np.asarray(jax.devices()[:8]), ("data",))
  rows, rep = NamedSharding(mesh, PartitionSpec("data")), NamedSharding(mesh, PartitionSpec())
  params = jax.device_put(fns.params, rep)
  images = _images(16, seed=2)

  def step(params, images):
    z = fns.encode(params, images, normalize=True)
    return z, fns.decode(params, z, denormalize=True)

  step = jax.jit(step, in_shardings=(rep, rows), out_shardings=(rows, rows))
  z, recon = step(params, jax.device_put(images, rows))
  assert z.sharding.is_equivalent_to(rows, z.ndim)
  np.testing.assert_allclose(z, tok.encode(images, normalize=True), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(recon, tok.decode(tok.encode(images)), rtol=1e-5, atol=1e-5)


def test_decode_is_differentiable(tok):
  fns = softvq_jax.tokenizer_functions(tok)
  z = tok.encode(_images(2))
  g = jax.grad(lambda z: jnp.sum(fns.decode(fns.params, z) ** 2))(z)
  assert g.shape == z.shape and bool(jnp.isfinite(g).all()) and float(jnp.abs(g).max()) > 0


def test_bad_inputs(tok):
  fns = tok.functions()
  with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
    fns.encode(fns.params, _images(1)[0])
  with pytest.raises(TypeError, match="uint8"):
    fns.encode(fns.params, np.zeros((1, 32, 32, 3), np.int32))
  with pytest.raises(ValueError, match=r"\[B, N, e\]"):
    fns.decode(fns.params, np.zeros((8, 4), np.float32))
