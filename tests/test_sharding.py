"""Mesh construction and logical-axis sharding of the tokenizer on 8 fake CPU devices."""
import jax
import numpy as np
import pytest
from flax import nnx

from softvq_jax import sharding
from softvq_jax.models.tokenizer import TokenizerConfig, abstract_tokenizer, build_tokenizer


def test_mesh_shapes_resolve():
  assert jax.device_count() == 8
  assert sharding.create_mesh((-1, 1, 1)).devices.shape == (8, 1, 1)
  assert sharding.create_mesh((1, -1, 1)).devices.shape == (1, 8, 1)
  assert sharding.create_mesh((2, 4, 1)).devices.shape == (2, 4, 1)
  assert sharding.create_mesh((2, 2, 2)).axis_names == ("data", "fsdp", "tensor")
  with pytest.raises(ValueError, match="needs 6 devices"):
    sharding.create_mesh((2, 3, 1))
  with pytest.raises(ValueError, match="does not divide 8 devices"):
    sharding.create_mesh((3, -1, 1))
  with pytest.raises(ValueError, match="3 entries"):
    sharding.create_mesh((8, 1))


def test_logical_rules():
  mesh = sharding.create_mesh((1, 4, 2))
  rules = sharding.DEFAULT_RULES
  P = jax.sharding.PartitionSpec
  assert sharding.logical_to_spec(("embed", "mlp"), rules, mesh, (768, 3072)) == P("fsdp", "tensor")
  # a mesh axis is used once per array; indivisible dims stay unsplit
  assert sharding.logical_to_spec(("embed", "embed"), rules, mesh, (8, 8)) == P("fsdp", None)
  assert sharding.logical_to_spec(("embed",), rules, mesh, (6,)) == P(None)
  assert sharding.logical_to_spec(("norm",), rules, mesh, (768,)) == P(None)
  with pytest.raises(ValueError, match="no such mesh axis"):
    sharding.logical_to_spec(("embed",), (("embed", "model"),), mesh, (8,))


def test_fsdp_splits_tokenizer_parameters_eightfold():
  cfg = TokenizerConfig(encoder_size="B", decoder_size="B", num_latent_tokens=64)
  state = nnx.state(abstract_tokenizer(cfg), nnx.Param)
  replicated = sharding.per_device_bytes(state, jax.tree.map(
      lambda _: sharding.replicated(sharding.create_mesh((-1, 1, 1))), state))
  fsdp = sharding.per_device_bytes(state, sharding.state_shardings(
      state, sharding.create_mesh((1, -1, 1))))
  assert fsdp <= replicated / 8 * 1.05, (fsdp, replicated)


def test_sharded_forward_equals_single_device():
  cfg = TokenizerConfig(image_size=64, encoder_size="mini", decoder_size="mini",
                        num_latent_tokens=16, codebook_size=64, num_codebooks=2,
                        compute_dtype="float32", attention_backend="xla")
  model = build_tokenizer(cfg)
  graphdef, state = nnx.split(model)
  x = np.random.RandomState(0).uniform(-1, 1, (8, 64, 64, 3)).astype(np.float32)
  fwd = lambda s, xx: nnx.merge(graphdef, s)(xx).reconstruction
  with jax.default_matmul_precision("highest"):
    ref = np.asarray(jax.jit(fwd)(state, x))
    mesh = sharding.create_mesh((2, 2, 2))
    shardings = sharding.state_shardings(state, mesh)
    st = jax.device_put(state, shardings)
    xs = jax.device_put(x, sharding.batch_sharding(mesh))
    got = jax.jit(fwd, in_shardings=(shardings, sharding.batch_sharding(mesh)))(st, xs)
  assert got.sharding.spec[0] in (("data", "fsdp"), "data")
  np.testing.assert_allclose(np.asarray(got), ref, atol=1e-5)
