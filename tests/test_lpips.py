"""models/lpips.py against `lpips.LPIPS(net="vgg")` (random VGG16, the shipped v0.1 heads), and the
weight converter (convert/lpips_weights.py): strict loading, single-file round trip, CLI."""
import os
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import require
from softvq_jax import sharding
from softvq_jax.convert import lpips_weights as lw
from softvq_jax.convert.safetensors_io import CheckpointError
from softvq_jax.models.lpips import LPIPS


@pytest.fixture(scope="module")
def torch_lpips():
  """(torch LPIPS, torchvision-format VGG dict, heads dict): random VGG16 with random biases (so a
  dropped or misplaced bias shows up), the lpips package's trained heads."""
  torch = require("torch")
  lpips = require("lpips")
  torch.manual_seed(0)
  with warnings.catch_warnings():  # torchvision deprecation notices about `pretrained=`
    warnings.simplefilter("ignore")
    m = lpips.LPIPS(net="vgg", version="0.1", pnet_rand=True, verbose=False).eval()
  with torch.no_grad():
    for name, p in m.net.named_parameters():
      if name.endswith("bias"):
        p.copy_(torch.randn_like(p) * 0.1)
  # lpips keeps torchvision's module indices inside its slices: net.slice2.5.weight = features.5.
  vgg = {"features." + n.split(".", 1)[1]: p.detach().numpy().copy()
         for n, p in m.net.named_parameters()}
  heads = {k: v.detach().numpy().copy() for k, v in m.state_dict().items()
           if re.fullmatch(r"lin\d\.model\.1\.weight", k)}  # (also present as lins.K.*)
  assert len(vgg) == 26 and len(heads) == 5
  return m, vgg, heads


@pytest.fixture(scope="module")
def ours(torch_lpips):
  _, vgg, heads = torch_lpips
  model = nnx.eval_shape(lambda: LPIPS(rngs=nnx.Rngs(0)))  # shapes only: the load fills all
  lw.load_lpips_weights(model, vgg, heads)
  return model


def _torch_lpips(m, x, y, grad=False):
  torch = require("torch")
  tx = torch.from_numpy(x).permute(0, 3, 1, 2).requires_grad_(grad)
  ty = torch.from_numpy(y).permute(0, 3, 1, 2)
  d = m(tx, ty).reshape(-1)
  if not grad:
    return d.detach().numpy()
  d.sum().backward()
  return d.detach().numpy(), tx.grad.permute(0, 2, 3, 1).numpy()


def _photos(size_hw):
  """Crops of two real photographs in [-1, 1], [2, h, w, 3] each (x: astronaut, chelsea)."""
  data = require("skimage.data")
  h, w = size_hw
  a, c = data.astronaut(), data.chelsea()
  x = np.stack([a[100:100 + h, 180:180 + w], c[60:60 + h, 200:200 + w]])
  y = np.stack([a[104:104 + h, 183:183 + w], a[300:300 + h, 50:50 + w]])  # near-shift; other crop
  return [(v.astype(np.float32) / 127.5 - 1.0) for v in (x, y)]


_call = jax.jit(lambda model, x, y: model(x, y))


@pytest.mark.parametrize("size_hw", [(64, 64), (50, 36)])
def test_matches_lpips_on_photographs(torch_lpips, ours, size_hw):
  """(50, 36): odd sizes exercise the floor-mode max-pool (50 -> 25 -> 12 -> 6 -> 3)."""
  x, y = _photos(size_hw)
  ref = _torch_lpips(torch_lpips[0], x, y)
  with jax.default_matmul_precision("highest"):
    got = np.asarray(_call(ours, x, y))
  assert got.shape == (2,) and got.dtype == np.float32
  assert np.all(ref > 1e-3)  # a real, non-trivial distance
  np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-5)
  with jax.default_matmul_precision("highest"):  # symmetric and zero on identical images
    np.testing.assert_allclose(np.asarray(_call(ours, y, x)), got, atol=1e-6, rtol=1e-5)
    assert np.max(np.abs(np.asarray(_call(ours, x, x)))) < 1e-7


def test_matches_lpips_on_random_pairs_and_gradient(torch_lpips, ours):
  rs = np.random.RandomState(0)
  x = rs.uniform(-1, 1, (2, 48, 48, 3)).astype(np.float32)
  y = np.clip(x + rs.normal(0, 0.3, x.shape), -1, 1).astype(np.float32)
  ref, ref_grad = _torch_lpips(torch_lpips[0], x, y, grad=True)

  @jax.jit
  def value_and_grad(model, xx, yy):  # the model is an argument: closed over, XLA constant-folds it
    d, vjp = jax.vjp(lambda z: model(z, yy), xx)
    return d, vjp(jnp.ones_like(d))[0]

  with jax.default_matmul_precision("highest"):
    got, got_grad = (np.asarray(a) for a in value_and_grad(ours, x, y))
  np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-5)
  scale = np.max(np.abs(ref_grad))
  assert scale > 0 and np.all(np.isfinite(got_grad))
  np.testing.assert_allclose(got_grad, ref_grad, atol=5e-5 * scale, rtol=0)  # measured 7.5e-6


def test_train_mode_dropout_matches_lpips_with_the_same_masks(torch_lpips, ours):
  """The official loss runs LPIPS in train mode: Dropout(0.5) before each head (spec.md §5). Our masks,
  fed to the lpips package in place of its own dropout (a pre-hook on each head's conv), give the
  same distance: the dropout acts where lpips' does, on the per-position squared differences."""
  torch = require("torch")
  m = torch_lpips[0]
  rs = np.random.RandomState(1)
  x = rs.uniform(-1, 1, (2, 48, 48, 3)).astype(np.float32)
  y = np.clip(x + rs.normal(0, 0.3, x.shape), -1, 1).astype(np.float32)
  key, rate = jax.random.key(3), 0.5
  keys = jax.random.split(key, 5)
  sizes = (48, 24, 12, 6, 3)
  masks = [np.asarray(jax.random.bernoulli(k, 1 - rate, (2, s, s, c)), np.float32)
           for k, s, c in zip(keys, sizes, (64, 128, 256, 512, 512))]
  hooks = [m.lins[i].model[1].register_forward_pre_hook(
      lambda _, inp, mk=torch.from_numpy(mk.transpose(0, 3, 1, 2)): (inp[0] * mk / (1 - rate),))
           for i, mk in enumerate(masks)]
  try:
    ref = _torch_lpips(m, x, y)  # m is in eval mode: its own dropout is off, ours replaces it
  finally:
    for h in hooks:
      h.remove()
  fn = jax.jit(lambda model, a, b, k: model(a, b, dropout_rate=rate, dropout_key=k))
  with jax.default_matmul_precision("highest"):
    got = np.asarray(fn(ours, x, y, key))
    plain = np.asarray(_call(ours, x, y))
    again = np.asarray(fn(ours, x, y, key))
    other = np.asarray(fn(ours, x, y, jax.random.key(4)))
  np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-5)
  np.testing.assert_array_equal(again, got)  # deterministic per key
  assert np.all(np.abs(got - plain) > 1e-6) and np.all(np.abs(other - got) > 1e-6)
  # About half of the elements dropped: the masks are Bernoulli(1 - rate).
  assert abs(np.mean(np.concatenate([mk.ravel() for mk in masks])) - (1 - rate)) < 0.01


def test_sharded_batch_equals_unsharded(ours):
  """jit over an 8-device batch-sharded input, parameters replicated: same values as one device."""
  mesh = sharding.create_mesh((-1, 1, 1))
  rs = np.random.RandomState(1)
  x = rs.uniform(-1, 1, (8, 32, 32, 3)).astype(np.float32)
  y = rs.uniform(-1, 1, (8, 32, 32, 3)).astype(np.float32)
  graphdef, state = nnx.split(ours)
  with jax.default_matmul_precision("highest"):
    plain = np.asarray(jax.jit(lambda s, a, b: nnx.merge(graphdef, s)(a, b))(state, x, y))
    f = jax.jit(lambda s, a, b: nnx.merge(graphdef, s)(a, b),
                in_shardings=(sharding.replicated(mesh), sharding.batch_sharding(mesh),
                              sharding.batch_sharding(mesh)),
                out_shardings=sharding.batch_sharding(mesh))
    out = f(state, x, y)
  assert len(out.sharding.device_set) == 8
  np.testing.assert_allclose(np.asarray(out), plain, atol=1e-6, rtol=1e-6)


def test_bfloat16_activations_close_to_float32(ours):
  rs = np.random.RandomState(2)
  x = rs.uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
  y = np.clip(x + rs.normal(0, 0.5, x.shape), -1, 1).astype(np.float32)
  graphdef, state = nnx.split(ours)
  bf16 = nnx.merge(graphdef, state)
  bf16.dtype = jnp.dtype(jnp.bfloat16)
  assert bf16.features(x)[0].dtype == jnp.bfloat16
  got = np.asarray(_call(bf16, x, y))
  with jax.default_matmul_precision("highest"):
    ref = np.asarray(_call(ours, x, y))
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, ref, rtol=0.05)


def test_export_load_file_round_trip(ours, tmp_path):
  path = tmp_path / "lpips_vgg.safetensors"
  lw.export_lpips(ours, path)
  back = lw.load_lpips_file(path)
  a = nnx.to_flat_state(nnx.state(ours, nnx.Param))
  b = dict(nnx.to_flat_state(nnx.state(back, nnx.Param)))
  assert len(a) == len(b) == 31
  for p, v in a:
    np.testing.assert_array_equal(np.asarray(b[p][...]), np.asarray(v[...]), err_msg=str(p))
  x, y = _photos((32, 32))
  with jax.default_matmul_precision("highest"):
    np.testing.assert_array_equal(np.asarray(_call(back, x, y)), np.asarray(_call(ours, x, y)))


def test_cli_from_pth_files_with_shipped_heads(torch_lpips, tmp_path):
  """The .pth route: a torchvision-format VGG file (with a classifier to drop) + default heads."""
  torch = require("torch")
  m, vgg, _ = torch_lpips
  sd = {k: torch.from_numpy(v) for k, v in vgg.items()}
  sd["classifier.6.bias"] = torch.zeros(1000)
  torch.save(sd, tmp_path / "vgg16.pth")
  out = tmp_path / "lpips.safetensors"
  lw.main([f"--vgg={tmp_path / 'vgg16.pth'}", f"--out={out}"])
  model = lw.load_lpips_file(out)
  x, y = _photos((32, 32))
  with jax.default_matmul_precision("highest"):
    got = np.asarray(_call(model, x, y))
  np.testing.assert_allclose(got, _torch_lpips(m, x, y), atol=1e-5, rtol=1e-5)


def test_bad_state_dicts_raise_naming_the_keys(torch_lpips):
  _, vgg, heads = torch_lpips
  model = nnx.eval_shape(lambda: LPIPS(rngs=nnx.Rngs(0)))
  lw.load_lpips_weights(model, vgg, heads)
  missing = {k: 2 * v for k, v in vgg.items() if k != "features.28.bias"}  # other values changed
  with pytest.raises(CheckpointError, match=r"missing keys \(1\): features\.28\.bias"):
    lw.load_lpips_weights(model, missing, heads)
  with pytest.raises(CheckpointError, match=r"unexpected keys \(1\): features\.30\.weight"):
    lw.load_lpips_weights(model, {**vgg, "features.30.weight": vgg["features.0.weight"]}, heads)
  with pytest.raises(CheckpointError, match=r"missing keys \(1\): lin4\.model\.1\.weight"):
    lw.load_lpips_weights(model, vgg,
                          {k: v for k, v in heads.items() if k != "lin4.model.1.weight"})
  swapped = {**vgg, "features.0.weight": vgg["features.2.weight"]}
  with pytest.raises(CheckpointError, match=r"shape mismatches \(1\): features\.0\.weight"):
    lw.load_lpips_weights(model, swapped, heads)
  # A failed load writes nothing: conv 0 still holds the first load's values, not 2x them.
  np.testing.assert_array_equal(np.asarray(model.convs[0].kernel[...]),
                                vgg["features.0.weight"].transpose(2, 3, 1, 0))
  with pytest.raises(CheckpointError, match="no such file"):
    lw.load_lpips_file(os.path.join("/nonexistent", "lpips.safetensors"))


def test_bad_inputs_raise():
  model = nnx.eval_shape(lambda: LPIPS(rngs=nnx.Rngs(0)))
  x = jnp.zeros((1, 8, 8, 3))
  with pytest.raises(ValueError, match="at least 16 px"):
    jax.eval_shape(model, x, x)
  with pytest.raises(ValueError, match=r"NHWC"):
    jax.eval_shape(model, jnp.zeros((1, 3, 32, 32)), jnp.zeros((1, 3, 32, 32)))
  with pytest.raises(ValueError, match="differ in shape"):
    jax.eval_shape(model, jnp.zeros((1, 32, 32, 3)), jnp.zeros((2, 32, 32, 3)))
