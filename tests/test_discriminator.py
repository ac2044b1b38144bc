"""models/discriminator.py against a PyTorch construction of spec.md §5.1 with the same weights.

The torch side is built here from the spec: timm `vit_small_patch16_224` with tanh GELU (random
weights), the key part of the qkv bias zeroed, readouts after pos_embed and blocks 2/5/8/11 with
the class token added to every patch token, and five heads of
`torch.nn.utils.spectral_norm(Conv1d(..., padding_mode="circular"))` + BatchNorm1d(eps 1e-6,
train mode) + LeakyReLU(0.2). Same weights and u/v vectors on both sides.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from conftest import require
from softvq_jax.convert import dino_weights
from softvq_jax.convert.safetensors_io import CheckpointError, write_safetensors
from softvq_jax.models import discriminator as D

READOUTS = (2, 5, 8, 11)


# ------------------------------------------------------------------------------------------
# The PyTorch reference construction.
# ------------------------------------------------------------------------------------------

def _torch_reference(img_size, width, num_heads, seed=0, depth=12, readouts=READOUTS):
  timm = require("timm")
  torch = require("torch")
  from timm.layers import GELUTanh  # pylint: disable=import-outside-toplevel
  nn = torch.nn
  torch.manual_seed(seed)
  vitm = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0,
                           img_size=img_size, embed_dim=width, num_heads=num_heads,
                           depth=depth, act_layer=GELUTanh).eval()
  vitm.readouts = readouts
  with torch.no_grad():
    for name, p in vitm.named_parameters():  # random norms/biases: a wrong mapping shows up
      if p.ndim == 1:
        p.copy_(torch.randn_like(p) * 0.3 + (1.0 if name.endswith("weight") else 0.0))
    for blk in vitm.blocks:  # what the reference does at load time
      blk.attn.qkv.bias[width:2 * width] = 0.0
  vitm.requires_grad_(False)

  def block(k):
    conv = nn.utils.spectral_norm(nn.Conv1d(width, width, k, padding=k // 2,
                                            padding_mode="circular"))
    return nn.Sequential(conv, nn.BatchNorm1d(width, eps=1e-6), nn.LeakyReLU(0.2))

  class Residual(nn.Module):
    def __init__(self, fn):
      super().__init__()
      self.fn = fn

    def forward(self, x):
      return (self.fn(x) + x) / math.sqrt(2)

  heads = nn.ModuleList([
      nn.Sequential(block(1), Residual(block(9)), nn.utils.spectral_norm(nn.Conv1d(width, 1, 1)))
      for _ in range(1 + len(readouts))])
  with torch.no_grad():
    for m in heads.modules():
      if isinstance(m, nn.BatchNorm1d):
        m.weight.copy_(torch.rand_like(m.weight) + 0.5)
        m.bias.copy_(torch.randn_like(m.bias) * 0.1)
        m.running_mean.copy_(torch.randn_like(m.running_mean) * 0.1)
        m.running_var.copy_(torch.rand_like(m.running_var) + 0.5)
      if isinstance(m, nn.Conv1d):
        m.bias.copy_(torch.randn_like(m.bias) * 0.1)
  heads.train()
  return vitm, heads


def _torch_logits(torch, vitm, heads, x_nchw):
  t = vitm._pos_embed(vitm.patch_embed(x_nchw))  # pylint: disable=protected-access
  feats = [t]
  for i, blk in enumerate(vitm.blocks):
    t = blk(t)
    if i in vitm.readouts:
      feats.append(t)
  acts = [(f[:, 1:] + f[:, :1]).transpose(1, 2) for f in feats]
  return torch.cat([h(a).view(x_nchw.shape[0], -1) for h, a in zip(heads, acts)], dim=1)


def _torch_normalise(torch, x_nhwc):
  mean = torch.tensor(D.IMAGENET_MEAN).reshape(1, 3, 1, 1)
  std = torch.tensor(D.IMAGENET_STD).reshape(1, 3, 1, 1)
  return x_nhwc.permute(0, 3, 1, 2) * (0.5 / std) + (0.5 - mean) / std


def _heads_state(heads):
  """Our head variables {path: array} from the torch heads (weights, u/v, running stats)."""
  out = {}

  def conv(prefix, m):
    out[prefix + ("kernel",)] = m.weight_orig.detach().numpy().copy().transpose(2, 1, 0)
    out[prefix + ("bias",)] = m.bias.detach().numpy().copy()
    out[prefix + ("u",)] = m.weight_u.detach().numpy().copy()
    out[prefix + ("v",)] = m.weight_v.detach().numpy().copy()

  def bn(prefix, m):
    out[prefix + ("norm", "scale")] = m.weight.detach().numpy().copy()
    out[prefix + ("norm", "bias")] = m.bias.detach().numpy().copy()
    out[prefix + ("norm", "mean")] = m.running_mean.detach().numpy().copy()
    out[prefix + ("norm", "var")] = m.running_var.detach().numpy().copy()

  for i, h in enumerate(heads):
    conv(("heads", i, "block1", "conv"), h[0][0])
    bn(("heads", i, "block1"), h[0][1])
    conv(("heads", i, "block2", "conv"), h[1].fn[0])
    bn(("heads", i, "block2"), h[1].fn[1])
    conv(("heads", i, "out"), h[2])
  return out


def _load_heads(disc, heads):
  values = _heads_state(heads)
  flat = dict(nnx.to_flat_state(nnx.state(disc, nnx.Not(D.FROZEN))))
  assert set(flat) == set(values), set(flat) ^ set(values)
  nnx.update(disc, nnx.from_flat_state([(p, flat[p].replace(jnp.asarray(v)))
                                        for p, v in values.items()]))


def _ours(vitm, heads, img_size, width, num_heads, depth=12):
  # Abstract construction (no random init: every variable is filled from torch below).
  disc = nnx.eval_shape(lambda: D.DinoDiscriminator(
      img_size=img_size, width=width, num_heads=num_heads, depth=depth,
      readout_blocks=vitm.readouts, attention_backend="xla", rngs=nnx.Rngs(3)))
  sd = {k: v.detach().numpy() for k, v in vitm.state_dict().items()}
  dino_weights.load_dino_backbone(disc, sd, source="timm")
  _load_heads(disc, heads)
  return disc


def _compare_state(new_state, heads, atol):
  want = _heads_state(heads)
  got = dict(nnx.to_flat_state(new_state))
  for path, v in want.items():
    if path[-1] in ("u", "v", "mean", "var"):
      np.testing.assert_allclose(np.asarray(got[path][...]), v, atol=atol, rtol=0,
                                 err_msg=str(path))


# ------------------------------------------------------------------------------------------
# Full ViT-S/16 at 224 (no resize): logits, input gradient, u vectors, BN running stats.
# ------------------------------------------------------------------------------------------

def test_vit_s_224_matches_torch_logits_grad_and_state():
  torch = require("torch")
  vitm, heads = _torch_reference(224, 384, 6)
  disc = _ours(vitm, heads, 224, 384, 6)
  graphdef, frozen, params, state = D.split_discriminator(disc)
  rs = np.random.RandomState(0)
  x = rs.uniform(-1, 1, (2, 224, 224, 3)).astype(np.float32)
  w = rs.randn(2, 980).astype(np.float32)

  xt = torch.from_numpy(x).requires_grad_(True)
  ref = _torch_logits(torch, vitm, heads, _torch_normalise(torch, xt))
  (ref * torch.from_numpy(w)).sum().backward()
  ref_logits, ref_grad = ref.detach().numpy(), xt.grad.numpy()

  def loss(xx, pp, st):
    logits, new_state = D.apply_discriminator(graphdef, frozen, pp, st, xx, None)
    return jnp.sum(logits * w), (logits, new_state)

  with jax.default_matmul_precision("highest"):
    (_, (logits, new_state)), gx = jax.jit(jax.value_and_grad(loss, has_aux=True))(
        x, params, state)
  assert logits.shape == (2, 980) and logits.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(logits), ref_logits, atol=1e-4, rtol=0)
  scale = np.abs(ref_grad).max()
  np.testing.assert_allclose(np.asarray(gx) / scale, ref_grad / scale, atol=1e-4, rtol=0)
  _compare_state(new_state, heads, atol=1e-5)
  # The call did change the state (the comparison above is not trivially of unchanged values).
  old = dict(nnx.to_flat_state(state))
  moved = dict(nnx.to_flat_state(new_state))
  assert not np.allclose(np.asarray(old[("heads", 0, "block1", "norm", "mean")][...]),
                         np.asarray(moved[("heads", 0, "block1", "norm", "mean")][...]))


# ------------------------------------------------------------------------------------------
# A small backbone (64 px, width 48, 4 blocks, 3 heads): resize/crop paths, eval mode,
# gradients, sharding.
# ------------------------------------------------------------------------------------------

SMALL = dict(img_size=64, width=48, num_heads=2, depth=4)  # readouts after blocks 1 and 3


@pytest.fixture(scope="module")
def small():
  vitm, heads = _torch_reference(SMALL["img_size"], SMALL["width"], SMALL["num_heads"], seed=1,
                                 depth=SMALL["depth"], readouts=(1, 3))
  disc = _ours(vitm, heads, **SMALL)
  snapshot = {k: v.clone() for k, v in heads.state_dict().items()}

  def reset():  # torch's train-mode calls advance u and the running stats; ours is functional
    heads.load_state_dict(snapshot)
    heads.train()

  return vitm, heads, reset, D.split_discriminator(disc)


def _key_with_choice(h, w, want_crop):
  for seed in range(100):
    key = jax.random.key(seed)
    crop, offsets = D.crop_or_resize_choice(key, h, w, SMALL["img_size"])
    if bool(crop) == want_crop:
      return key, np.asarray(offsets)
  raise AssertionError("no key found")


@pytest.mark.parametrize("hw,path", [((80, 72), "area"), ((80, 72), "crop"),
                                     ((48, 56), "bicubic"), ((80, 48), "bicubic")])
def test_resize_and_crop_paths_match_torch(small, hw, path):
  torch = require("torch")
  F = torch.nn.functional
  vitm, heads, reset, (graphdef, frozen, params, state) = small
  h, w = hw
  s = SMALL["img_size"]
  x = np.random.RandomState(h + w).uniform(-1, 1, (2, h, w, 3)).astype(np.float32)
  key, offsets = (_key_with_choice(h, w, path == "crop") if path != "bicubic"
                  else (jax.random.key(0), None))
  xt = _torch_normalise(torch, torch.from_numpy(x))
  if path == "crop":
    xt = xt[:, :, offsets[0]:offsets[0] + s, offsets[1]:offsets[1] + s]
  else:
    xt = F.interpolate(xt, size=(s, s), mode=path)
  # The resizing alone equals torch's F.interpolate / the crop.
  np.testing.assert_allclose(np.asarray(D.to_backbone_input(jnp.asarray(x), key, s)),
                             xt.permute(0, 2, 3, 1).numpy(), atol=2e-5, rtol=0)
  reset()
  with torch.no_grad():
    ref = _torch_logits(torch, vitm, heads, xt).numpy()
  with jax.default_matmul_precision("highest"):
    logits, _ = jax.jit(lambda xx, k: D.apply_discriminator(graphdef, frozen, params, state,
                                                            xx, k))(x, key)
  assert logits.shape == (2, 3 * (s // 16) ** 2)
  np.testing.assert_allclose(np.asarray(logits), ref, atol=1e-4, rtol=0)


def test_both_branches_are_drawn_and_crops_vary():
  crops = [bool(D.crop_or_resize_choice(jax.random.key(i), 256, 256)[0]) for i in range(40)]
  assert 5 < sum(crops) < 35
  offs = {tuple(np.asarray(D.crop_or_resize_choice(jax.random.key(i), 256, 256)[1]))
          for i in range(40)}
  assert len(offs) > 10 and all(0 <= a <= 32 and 0 <= b <= 32 for a, b in offs)


def test_eval_mode_matches_torch_and_keeps_state(small):
  """Eval mode: running statistics and the stored u, v (no power iteration), as torch's .eval()."""
  torch = require("torch")
  vitm, heads, reset, (graphdef, frozen, params, state) = small
  reset()
  x = np.random.RandomState(5).uniform(-1, 1, (3, 64, 64, 3)).astype(np.float32)
  xt = _torch_normalise(torch, torch.from_numpy(x))
  bns = [m for m in heads.modules() if isinstance(m, torch.nn.BatchNorm1d)]
  try:
    # Running statistics of the size a trained model has (random ones give logits ~1e2).
    for m in bns:
      m.momentum = 1.0
    with torch.no_grad():
      _torch_logits(torch, vitm, heads, xt[:2])
    heads.eval()
    with torch.no_grad():
      ref = _torch_logits(torch, vitm, heads, xt).numpy()
    values = _heads_state(heads)
  finally:
    for m in bns:
      m.momentum = 0.1
    reset()
  flat = dict(nnx.to_flat_state(state))
  state = nnx.from_flat_state([(p, v.replace(jnp.asarray(values[p]))) for p, v in flat.items()])
  with jax.default_matmul_precision("highest"):
    logits, new_state = D.apply_discriminator(graphdef, frozen, params, state, jnp.asarray(x),
                                              None, train=False)
  np.testing.assert_allclose(np.asarray(logits), ref, atol=1e-4, rtol=0)
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(new_state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_no_gradient_to_frozen_backbone(small):
  _, _, _, (graphdef, frozen, params, state) = small
  x = jnp.asarray(np.random.RandomState(2).uniform(-1, 1, (2, 64, 64, 3)).astype(np.float32))

  def loss(fr, pa):
    return jnp.mean(D.apply_discriminator(graphdef, fr, pa, state, x, None)[0])

  g_frozen, g_params = jax.grad(loss, argnums=(0, 1))(frozen, params)
  assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(g_frozen))
  assert all(np.any(np.asarray(g) != 0) for g in jax.tree.leaves(g_params))
  # The split: backbone weights frozen, head weights trainable, BN stats + u/v as state.
  assert all(p[0] == "backbone" for p, _ in nnx.to_flat_state(frozen))
  assert all(p[0] == "heads" for p, _ in nnx.to_flat_state(params))
  assert {p[-1] for p, _ in nnx.to_flat_state(state)} == {"u", "v", "mean", "var"}


def test_sharded_batch_equals_single_device(small):
  """BatchNorm over a batch sharded on 8 devices uses the global batch statistics."""
  _, _, _, (graphdef, frozen, params, state) = small
  x = np.random.RandomState(3).uniform(-1, 1, (8, 80, 80, 3)).astype(np.float32)
  key = jax.random.key(4)
  fn = lambda xx, k: D.apply_discriminator(graphdef, frozen, params, state, xx, k)  # noqa: E731
  mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(8), ("data",))
  xs = jax.device_put(x, NamedSharding(mesh, PartitionSpec("data")))
  assert len(xs.sharding.device_set) == 8
  with jax.default_matmul_precision("highest"):
    want, want_state = jax.jit(fn)(jax.device_put(x, jax.devices()[0]), key)
    got, got_state = jax.jit(fn)(xs, key)
    # Per-device statistics (what an unsynchronised BatchNorm would give) differ clearly.
    local = jnp.concatenate([jax.jit(fn)(x[i:i + 4], key)[0] for i in (0, 4)])
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=0)
  for a, b in zip(jax.tree.leaves(got_state), jax.tree.leaves(want_state)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=0)
  assert np.abs(np.asarray(local) - np.asarray(want)).max() > 1e-3


# ------------------------------------------------------------------------------------------
# Loading the DINO checkpoint format.
# ------------------------------------------------------------------------------------------

def _abstract(img_size):
  """A small discriminator without random init (the loader fills the backbone)."""
  return nnx.eval_shape(lambda: D.DinoDiscriminator(
      img_size=img_size, width=48, num_heads=2, depth=4, readout_blocks=(1, 3), rngs=nnx.Rngs(0)))


def test_load_dino_backbone_from_file_zeroes_key_bias(tmp_path):
  torch = require("torch")
  timm = require("timm")
  torch.manual_seed(0)
  src = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, img_size=32,
                          embed_dim=48, num_heads=2, depth=4)
  sd = {k: v.detach().numpy() for k, v in src.state_dict().items()}
  sd = {k: v + np.float32(0.5) if k.endswith("qkv.bias") else v for k, v in sd.items()}
  disc = _abstract(img_size=32)
  pth = tmp_path / "dino.pth"
  torch.save({f"module.{k}": torch.from_numpy(v) for k, v in sd.items()}, pth)
  dino_weights.load_dino_backbone_file(disc, str(pth))
  bias = np.asarray(disc.backbone.blocks[3].attn.qkv.bias[...])
  ref = sd["blocks.3.attn.qkv.bias"]
  np.testing.assert_array_equal(bias[:48], ref[:48])
  np.testing.assert_array_equal(bias[48:96], 0.0)
  np.testing.assert_array_equal(bias[96:], ref[96:])
  np.testing.assert_array_equal(np.asarray(disc.backbone.blocks[3].mlp.fc1.kernel[...]),
                                sd["blocks.3.mlp.fc1.weight"].T)
  # .safetensors without torch, with DINO's projection head keys present (ignored).
  st = tmp_path / "dino.safetensors"
  write_safetensors(st, {**sd, "head.mlp.0.weight": np.zeros((4, 48), np.float32)})
  disc2 = _abstract(img_size=32)
  dino_weights.load_dino_backbone_file(disc2, str(st))
  for a, b in zip(jax.tree.leaves(nnx.state(disc.backbone)),
                  jax.tree.leaves(nnx.state(disc2.backbone))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Missing keys are named.
  bad = {k: v for k, v in sd.items() if not k.startswith("blocks.2.")}
  with pytest.raises(CheckpointError, match="missing keys.*blocks.2"):
    dino_weights.load_dino_backbone(disc2, bad)
  # A backbone built at another resolution is refused with the fix.
  with pytest.raises(CheckpointError, match="img_size=224"):
    dino_weights.load_dino_backbone(
        _abstract(img_size=64), sd)
