"""models/repa.py against PyTorch: projector, DINOv2 teacher features and the REPA loss (spec.md §5)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import require
from softvq_jax.convert import state_dict as sd_lib
from softvq_jax.convert.safetensors_io import CheckpointError, write_safetensors
from softvq_jax import pretrained
from softvq_jax.models import repa

TEACHER = "vit_small_patch14_dinov2"  # same architecture family as the recipe's DINOv2-L
IMG, DEPTH = 64, 2


def _torch_mlp(e, hidden, out):
  """REPA's `build_mlp` as the official tokenizer builds its `projection`."""
  torch = require("torch")
  torch.manual_seed(0)
  nn = torch.nn
  return nn.Sequential(nn.Linear(e, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                       nn.Linear(hidden, out))


def _official_projector_sd(mlp):
  return {"projection." + k: v.detach().numpy() for k, v in mlp.state_dict().items()}


def _torch_repa_loss(torch, z, z_hat):
  """The official `repa_align == 'repeat'` branch (without the 0.1 weight)."""
  F = torch.nn.functional
  b, l, d = z_hat.shape
  z_hat = z_hat.unsqueeze(2).expand(-1, -1, z.size(1) // l, -1).reshape(b, -1, d)
  z = F.normalize(z, dim=-1)
  z_hat = F.normalize(z_hat, dim=-1)
  return torch.mean(-(z * z_hat).sum(dim=-1), dim=1).mean()


def test_projector_matches_torch_sequential_and_official_keys():
  torch = require("torch")
  mlp = _torch_mlp(8, 32, 48)
  official = _official_projector_sd(mlp)
  proj = repa.REPAProjector(8, 32, 48, rngs=nnx.Rngs(0))
  # Our parameter names are the official keys: export gives exactly them, import consumes them.
  exported = sd_lib.export_state_dict(proj, "projection.")
  assert {k: v.shape for k, v in exported.items()} == {k: v.shape for k, v in official.items()}
  sd_lib.load_state_dict(proj, official, source="official", prefix="projection.")
  z = np.random.RandomState(0).randn(3, 5, 8).astype(np.float32)
  with torch.no_grad():
    ref = mlp(torch.from_numpy(z)).numpy()
  with jax.default_matmul_precision("highest"):
    got = np.asarray(jax.jit(lambda m, x: m(x))(proj, z))
  assert got.shape == (3, 5, 48)
  np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-5)
  # bfloat16 activations stay bfloat16 (parameters float32)
  assert proj(jnp.asarray(z, jnp.bfloat16)).dtype == jnp.bfloat16
  with pytest.raises(ValueError, match="codebook_embed_dim"):
    proj(jnp.zeros((1, 2, 7)))


def test_projector_init_and_sharding_metadata():
  proj = nnx.eval_shape(lambda: repa.REPAProjector(32, rngs=nnx.Rngs(0)))
  flat = {".".join(map(str, p)): v for p, v in nnx.to_flat_state(nnx.state(proj, nnx.Param))}
  assert flat["0.kernel"].shape == (32, 1024) and flat["4.kernel"].shape == (1024, 1024)
  assert flat["0.kernel"].out_sharding == (None, "mlp")
  assert flat["2.kernel"].out_sharding == ("embed", "mlp")
  assert flat["4.bias"].out_sharding == ("embed",)
  # torch.nn.Linear default init: weight and bias ~ U(+-1/sqrt(fan_in))
  real = repa.REPAProjector(16, 64, 64, rngs=nnx.Rngs(1))
  for name, fan_in in (("0", 16), ("2", 64)):
    layer = getattr(real, name)
    for arr in (layer.kernel[...], layer.bias[...]):
      assert float(jnp.max(jnp.abs(arr))) <= fan_in ** -0.5
      assert float(jnp.std(arr)) > 0.4 * fan_in ** -0.5  # uniform: std = bound / sqrt(3)


def _timm_dinov2(img_size, patch_size, seed):
  timm = require("timm")
  torch = require("torch")
  torch.manual_seed(seed)
  m = timm.create_model(TEACHER, pretrained=False, num_classes=0, img_size=img_size,
                        patch_size=patch_size, depth=DEPTH).eval()
  # Random LayerScale / norms / biases so every parameter's mapping shows up in the features.
  with torch.no_grad():
    for name, p in m.named_parameters():
      if p.ndim == 1:
        p.copy_(torch.randn_like(p) * 0.5 + (1.0 if "weight" in name or "gamma" in name else 0))
  return m


def _reference_teacher_tokens(torch, model, x_nhwc):
  """The official REPA branch: scale(de_scale(x)) -> forward_features -> drop prefix tokens."""
  x = torch.from_numpy(x_nhwc).permute(0, 3, 1, 2)
  mean = torch.tensor(repa.IMAGENET_MEAN).view(1, 3, 1, 1)
  std = torch.tensor(repa.IMAGENET_STD).view(1, 3, 1, 1)
  x = ((x * 0.5 + 0.5) - mean) / std
  with torch.no_grad():
    return model.forward_features(x)[:, model.num_prefix_tokens:].numpy()


@pytest.mark.parametrize("source_patch,file_ext", [(16, "safetensors"), (14, "pth")])
def test_teacher_features_match_timm(tmp_path, source_patch, file_ext):
  """Patch 16: direct import. Patch 14 (a pretrained DINOv2's layout): the file is resampled as
  timm does when the reference creates the teacher with pretrained=True at patch 16."""
  torch = require("torch")
  timm = require("timm")
  if source_patch == 16:
    ref_model = _timm_dinov2(IMG, 16, seed=0)
    sd = {k: v.detach() for k, v in ref_model.state_dict().items()}
  else:
    src = _timm_dinov2(7 * 14, 14, seed=1)  # patch 14, 7x7 grid (a small stand-in for 37x37)
    sd = {k: v.detach() for k, v in src.state_dict().items()}
    ref_model = timm.create_model(TEACHER, pretrained=False, num_classes=0, img_size=IMG,
                                  patch_size=16, depth=DEPTH).eval()
    from timm.models.vision_transformer import checkpoint_filter_fn
    ref_model.load_state_dict(checkpoint_filter_fn(sd, ref_model))
  path = str(tmp_path / f"dinov2.{file_ext}")
  if file_ext == "safetensors":
    write_safetensors(path, {k: v.numpy() for k, v in sd.items()})
  else:
    torch.save(sd, path)
  teacher = pretrained.repa_teacher_from_weights(path, "S", IMG, 16, depth=DEPTH,
                                                attention_backend="xla")
  x = np.random.RandomState(2).uniform(-1, 1, (2, IMG, IMG, 3)).astype(np.float32)
  ref = _reference_teacher_tokens(torch, ref_model, x)
  with jax.default_matmul_precision("highest"):
    got = np.asarray(jax.jit(repa.teacher_features)(teacher, x))
  assert got.shape == ref.shape == (2, (IMG // 16) ** 2, 384) and got.dtype == np.float32
  np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)


def test_teacher_is_stop_gradient_and_rejects_bad_inputs():
  teacher = repa.build_repa_teacher("S", 32, 16, depth=1, attention_backend="xla",
                                    rngs=nnx.Rngs(0))
  x = jnp.asarray(np.random.RandomState(0).uniform(-1, 1, (1, 32, 32, 3)), jnp.float32)
  g = jax.grad(lambda im: jnp.sum(repa.teacher_features(teacher, im) ** 2))(x)
  assert float(jnp.max(jnp.abs(g))) == 0.0
  assert float(jnp.sum(repa.teacher_features(teacher, x) ** 2)) > 0.0
  with pytest.raises(ValueError, match="NHWC"):
    repa.teacher_features(teacher, jnp.zeros((1, 3, 32, 32)))
  with pytest.raises(ValueError, match="img_size 32"):
    repa.teacher_features(teacher, jnp.zeros((1, 48, 48, 3)))
  with pytest.raises(ValueError, match="not one of"):
    repa.build_repa_teacher("XL", rngs=nnx.Rngs(0))
  # a checkpoint of another width fails strictly, naming the keys
  other = repa.build_repa_teacher("micro", 32, 16, depth=1, rngs=nnx.Rngs(0))
  with pytest.raises(CheckpointError, match="shape mismatches"):
    pretrained.repa_teacher_from_weights(sd_lib.export_state_dict(other), "S", 32, 16, depth=1)


def _numpy_repa_loss(t, h):
  """Spec 5 written out: latent i aligned with teacher tokens i*P/N..(i+1)*P/N-1, mean of -cos."""
  t, h = t.astype(np.float64), h.astype(np.float64)
  b, p, _ = t.shape
  r = p // h.shape[1]
  total = 0.0
  for bi in range(b):
    for j in range(p):
      a, c = t[bi, j], h[bi, j // r]
      total -= a @ c / (max(np.linalg.norm(a), 1e-12) * max(np.linalg.norm(c), 1e-12))
  return total / (b * p)


def test_repa_loss_matches_spec_and_official_torch():
  torch = require("torch")
  rs = np.random.RandomState(0)
  t = rs.randn(2, 16, 12).astype(np.float32)
  h = rs.randn(2, 4, 12).astype(np.float32)
  h[1, 2] = 0.0  # an all-zero token: F.normalize's eps gives cos 0, not NaN
  got = float(jax.jit(repa.repa_loss)(t, h))
  np.testing.assert_allclose(got, _numpy_repa_loss(t, h), atol=1e-6)
  ref = float(_torch_repa_loss(torch, torch.from_numpy(t), torch.from_numpy(h)))
  np.testing.assert_allclose(got, ref, atol=1e-6)
  # perfectly aligned tokens give -1; bfloat16 inputs give a float32 loss
  aligned = np.repeat(h[:1, :2], 8, axis=1) * 3.0
  np.testing.assert_allclose(float(repa.repa_loss(aligned, h[:1, :2])), -1.0, atol=1e-6)
  assert repa.repa_loss(jnp.asarray(t, jnp.bfloat16), jnp.asarray(h, jnp.bfloat16)).dtype == jnp.float32


def test_repa_loss_rejects_bad_shapes():
  with pytest.raises(ValueError, match="multiple of the 5 latent tokens"):
    repa.repa_loss(jnp.zeros((2, 16, 8)), jnp.zeros((2, 5, 8)))
  with pytest.raises(ValueError, match="teacher width"):
    repa.repa_loss(jnp.zeros((2, 16, 8)), jnp.zeros((2, 4, 6)))
  with pytest.raises(ValueError, match=r"\[B, P, D\]"):
    repa.repa_loss(jnp.zeros((16, 8)), jnp.zeros((2, 4, 8)))


def test_loss_gradient_wrt_projector_input_matches_torch():
  torch = require("torch")
  mlp = _torch_mlp(8, 32, 24)
  proj = repa.REPAProjector(8, 32, 24, rngs=nnx.Rngs(0))
  sd_lib.load_state_dict(proj, _official_projector_sd(mlp), source="official", prefix="projection.")
  rs = np.random.RandomState(3)
  t = rs.randn(2, 16, 24).astype(np.float32)
  z = rs.randn(2, 4, 8).astype(np.float32)
  zt = torch.from_numpy(z).requires_grad_(True)
  loss_t = _torch_repa_loss(torch, torch.from_numpy(t), mlp(zt))
  loss_t.backward()
  with jax.default_matmul_precision("highest"):
    loss, g = jax.jit(jax.value_and_grad(lambda zz: repa.repa_loss(t, proj(zz))))(z)
  g = np.asarray(g)
  assert np.all(np.isfinite(g)) and np.max(np.abs(g)) > 0
  np.testing.assert_allclose(float(loss), float(loss_t.detach()), atol=1e-6)
  np.testing.assert_allclose(g, zt.grad.numpy(), atol=1e-6, rtol=1e-4)
