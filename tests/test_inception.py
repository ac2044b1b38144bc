"""models/inception.py + convert/inception_weights.py against pytorch-fid's InceptionV3 (random
weights, built offline by patching the weight download inside `fid_inception_v3()`)."""
import functools
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from conftest import require
from softvq_jax.convert import inception_weights
from softvq_jax.convert.safetensors_io import CheckpointError, read_safetensors
from softvq_jax.models import inception


def _fid_structure(pfi):
  """The module tree `fid_inception_v3()` builds before loading its weights."""
  m = pfi._inception_v3(num_classes=1008, aux_logits=False, weights=None)
  m.Mixed_5b = pfi.FIDInceptionA(192, pool_features=32)
  m.Mixed_5c = pfi.FIDInceptionA(256, pool_features=64)
  m.Mixed_5d = pfi.FIDInceptionA(288, pool_features=64)
  m.Mixed_6b = pfi.FIDInceptionC(768, channels_7x7=128)
  m.Mixed_6c = pfi.FIDInceptionC(768, channels_7x7=160)
  m.Mixed_6d = pfi.FIDInceptionC(768, channels_7x7=160)
  m.Mixed_6e = pfi.FIDInceptionC(768, channels_7x7=192)
  m.Mixed_7b = pfi.FIDInceptionE_1(1280)
  m.Mixed_7c = pfi.FIDInceptionE_2(2048)
  return m


@functools.lru_cache(maxsize=None)
def _reference():
  """(pytorch-fid InceptionV3 [pool block], its fc layer, the random state dict as NumPy).

  BatchNorm weight/bias are random, the running statistics are calibrated on random images (so
  activations stay O(1) through 20 layers instead of exploding or dying) and then perturbed per
  channel, so mean, var, weight and bias all matter in every layer.
  """
  torch = require("torch")
  pfi = require("pytorch_fid.inception")
  torch.manual_seed(0)
  g = torch.Generator().manual_seed(1)
  src = _fid_structure(pfi)
  bns = [m for m in src.modules() if isinstance(m, torch.nn.BatchNorm2d)]
  with torch.no_grad():
    for bn in bns:
      bn.weight.uniform_(0.5, 1.5, generator=g)
      bn.bias.normal_(0.0, 0.3, generator=g)
      bn.momentum = None  # cumulative average: running stats = this batch's statistics
    src.train()
    # Statistics of the inputs the tests feed: a smooth (upsampled) and a pixel-noise image.
    smooth = torch.nn.functional.interpolate(torch.rand(1, 3, 64, 64, generator=g), size=(299, 299),
                                             mode="bilinear", align_corners=False)
    src(torch.cat([smooth, torch.rand(1, 3, 299, 299, generator=g)]) * 2 - 1)
    src.eval()
    for bn in bns:
      c = bn.num_features
      bn.running_mean.add_(0.1 * bn.running_var.sqrt() * torch.randn(c, generator=g))
      bn.running_var.mul_(torch.empty(c).uniform_(0.9, 1.1, generator=g))
    # Real FID pool features are mostly in [0, 3]; these random ones reach ~20. Scaling the last
    # block's BatchNorm affine brings them to that range, so the absolute 1e-4 tolerance below
    # means the same as it would with the real weights (float32 rounding is relative: torch's
    # own float32 forward differs from its float64 forward by ~1e-5 of the largest feature).
    for bn in (m for m in src.Mixed_7c.modules() if isinstance(m, torch.nn.BatchNorm2d)):
      bn.weight.mul_(0.2)
      bn.bias.mul_(0.2)
    src.fc.bias.normal_(0.0, 1.0, generator=g)
  sd = {k: v.detach().clone() for k, v in src.state_dict().items()}
  # pytorch-fid's own construction and loading path, with the download patched out.
  with mock.patch.object(pfi, "load_state_dict_from_url", lambda *a, **k: sd):
    ref = pfi.InceptionV3([3]).eval()
  return ref, src.fc, {k: v.numpy() for k, v in sd.items()}


@functools.lru_cache(maxsize=None)
def _ours():
  _, _, sd = _reference()
  model = nnx.eval_shape(inception.FIDInception)
  return inception_weights.load_inception_state_dict(model, sd, source="random")


def _torch_features(images_m11):
  """pytorch-fid on the same images given its way: NCHW in [0, 1]."""
  torch = require("torch")
  ref, fc, _ = _reference()
  x = torch.from_numpy((images_m11 + 1) / 2).permute(0, 3, 1, 2)
  with torch.no_grad():
    pool = ref(x)[0][:, :, 0, 0]
    return pool.numpy(), fc(pool).numpy()


def _run(model, x):
  with jax.default_matmul_precision("highest"):
    out = jax.jit(lambda m, v: m(v))(model, x)
  return {k: np.asarray(v) for k, v in out.items()}


@pytest.mark.parametrize("size", [(64, 64), (299, 299), (320, 320)])
def test_pool_and_logits_match_pytorch_fid(size):
  """Upsampling, identity and downsampling resize + the whole network + fc, vs pytorch-fid, on a
  batch sharded over 2 devices (as the evaluator feeds it)."""
  x = np.random.RandomState(size[0]).uniform(-1, 1, (2, *size, 3)).astype(np.float32)
  ref_pool, ref_logits = _torch_features(x)
  mesh = Mesh(np.array(jax.devices()[:2]), ("data",))
  out = _run(_ours(), jax.device_put(x, NamedSharding(mesh, PartitionSpec("data"))))
  assert out["pool"].shape == (2, 2048) and out["pool"].dtype == np.float32
  assert out["logits"].shape == (2, 1008) and out["logits"].dtype == np.float32
  assert 0.05 < np.abs(ref_pool).mean() and np.abs(ref_pool).max() < 10, (
      "reference features degenerate; fix the test's random weights")
  np.testing.assert_allclose(out["pool"], ref_pool, atol=1e-4, rtol=0)
  np.testing.assert_allclose(out["logits"], ref_logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("in_hw", [(64, 64), (320, 320), (37, 517), (299, 299)])
def test_resize_matches_torch_interpolate_and_commutes_with_affine(in_hw):
  torch = require("torch")
  x01 = np.random.RandomState(1).uniform(0, 1, (2, *in_hw, 3)).astype(np.float32)
  ref = torch.nn.functional.interpolate(torch.from_numpy(x01).permute(0, 3, 1, 2), size=(299, 299),
                                        mode="bilinear", align_corners=False)
  ref = ref.permute(0, 2, 3, 1).numpy()
  got = np.asarray(inception.resize_bilinear(jnp.asarray(x01), (299, 299)))
  np.testing.assert_allclose(got, ref, atol=1e-6, rtol=0)
  # pytorch-fid resizes [0, 1] images and then maps 2x - 1; we resize [-1, 1] images directly.
  got_m11 = np.asarray(inception.resize_bilinear(jnp.asarray(2 * x01 - 1), (299, 299)))
  np.testing.assert_allclose(got_m11, 2 * ref - 1, atol=2e-6, rtol=0)


def test_bfloat16_compute_stays_close():
  x = np.random.RandomState(64).uniform(-1, 1, (2, 64, 64, 3)).astype(np.float32)
  ref_pool, _ = _torch_features(x)
  _, state = nnx.split(_ours())
  bf16 = nnx.merge(nnx.graphdef(nnx.eval_shape(
      lambda: inception.FIDInception(dtype=jnp.bfloat16))), state)
  pool16 = _run(bf16, x)["pool"]
  assert pool16.dtype == np.float32
  rel = np.linalg.norm(pool16 - ref_pool) / np.linalg.norm(ref_pool)
  assert 1e-5 < rel < 0.15, rel  # really computed in bf16, and still close


def test_safetensors_and_pth_round_trip(tmp_path):
  torch = require("torch")
  pfi = require("pytorch_fid.inception")
  _, _, sd = _reference()
  ours = _ours()
  st = tmp_path / "fid_inception.safetensors"
  inception_weights.export_inception(ours, st)
  exported = read_safetensors(st)
  expected = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
  assert sorted(exported) == sorted(expected)
  for k, v in expected.items():
    np.testing.assert_array_equal(exported[k], v, err_msg=k)
  # The export is a valid pytorch-fid state dict (strict load).
  _fid_structure(pfi).load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()})

  pth = tmp_path / "pt_inception.pth"
  torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, pth)
  out = tmp_path / "cli.safetensors"
  assert inception_weights.main([f"--pth={pth}", f"--out={out}"]) == 0
  cli = read_safetensors(out)
  assert sorted(cli) == sorted(exported)
  for k, v in exported.items():
    np.testing.assert_array_equal(cli[k], v, err_msg=k)
  for path in (st, pth):
    loaded = inception_weights.load_inception(path)
    for (p1, v1), (p2, v2) in zip(nnx.to_flat_state(nnx.state(loaded)),
                                  nnx.to_flat_state(nnx.state(ours))):
      assert p1 == p2
      np.testing.assert_array_equal(np.asarray(v1[...]), np.asarray(v2[...]), err_msg=str(p1))


def test_wrong_keys_raise_a_clear_error():
  _, _, sd = _reference()
  bad = dict(sd)
  bad["Mixed_5b.branch1x1.conv.weight_typo"] = bad.pop("Mixed_5b.branch1x1.conv.weight")
  bad["Mixed_6e.branch_pool.bn.running_var"] = np.ones(7, np.float32)
  model = nnx.eval_shape(inception.FIDInception)
  with pytest.raises(CheckpointError) as e:
    inception_weights.load_inception_state_dict(model, bad, source="bad.pth")
  msg = str(e.value)
  assert "bad.pth" in msg
  assert "missing keys (1): Mixed_5b.branch1x1.conv.weight" in msg
  assert "unexpected keys (1): Mixed_5b.branch1x1.conv.weight_typo" in msg
  assert "Mixed_6e.branch_pool.bn.running_var: file (7,) vs model (192,)" in msg


def test_bad_input_raises():
  model = nnx.eval_shape(inception.FIDInception)  # the checks run before any weight is used
  with pytest.raises(ValueError, match="NHWC"):
    model(jnp.zeros((1, 3, 64, 64)))
  with pytest.raises(ValueError, match="127.5"):
    model(jnp.zeros((1, 64, 64, 3), jnp.uint8))
