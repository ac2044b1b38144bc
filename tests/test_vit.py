"""models/vit.py against timm with random weights (spec.md §1.1), and the weight-resampling helpers."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import require
from softvq_jax.convert import resample, timm_vit
from softvq_jax.convert.safetensors_io import CheckpointError
from softvq_jax.models import vit


def _timm_model(name, **kw):
  timm = require("timm")
  torch = require("torch")
  torch.manual_seed(0)
  m = timm.create_model(name, pretrained=False, num_classes=0, **kw).eval()
  # Random LayerScale / norms so a wrong mapping of any parameter shows up in the output.
  with torch.no_grad():
    for p_name, p in m.named_parameters():
      if p.ndim == 1:
        p.copy_(torch.randn_like(p) * 0.5 + (1.0 if "weight" in p_name or "gamma" in p_name else 0))
  return m


def _sd(m):
  return {k: v.detach().numpy() for k, v in m.state_dict().items()}


def _ours_like(m, img_size, patch_size, layer_scale=True, gelu_approximate=False):
  return vit.VisionTransformer(
      img_size=img_size, patch_size=patch_size, width=m.embed_dim, depth=len(m.blocks),
      num_heads=m.blocks[0].attn.num_heads, layer_scale_init=1e-5 if layer_scale else None,
      gelu_approximate=gelu_approximate, attention_backend="xla", rngs=nnx.Rngs(1))


@pytest.mark.parametrize("name,img,patch,layer_scale", [
    ("vit_small_patch14_dinov2.lvd142m", 256, 16, True),
    ("vit_base_patch16_224", 224, 16, False),
])
def test_forward_features_match_timm(name, img, patch, layer_scale):
  torch = require("torch")
  m = _timm_model(name, img_size=img, patch_size=patch)
  ours = _ours_like(m, img, patch, layer_scale)
  timm_vit.load_timm_vit(ours, _sd(m), source=name)
  x = np.random.RandomState(0).uniform(-1, 1, (2, img, img, 3)).astype(np.float32)
  with torch.no_grad():
    ref = m.forward_features(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
  with jax.default_matmul_precision("highest"):
    got = np.asarray(jax.jit(lambda mm, xx: mm.forward_features(xx))(ours, x))
  assert got.shape == ref.shape
  np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)


def test_pretrained_grid_and_patch_resampling_match_timm():
  """A patch-14 / 518-px DINOv2 checkpoint loaded into a patch-16 / 256-px model, as timm does."""
  timm = require("timm")
  torch = require("torch")
  src = _timm_model("vit_small_patch14_dinov2.lvd142m", img_size=518, patch_size=14)
  sd = {k: v.detach() for k, v in src.state_dict().items()}
  dst = timm.create_model("vit_small_patch14_dinov2.lvd142m", pretrained=False, num_classes=0,
                          img_size=256, patch_size=16).eval()
  # timm's own pretrained-loading filter does the resampling we must reproduce.
  from timm.models.vision_transformer import checkpoint_filter_fn
  dst.load_state_dict(checkpoint_filter_fn(sd, dst))
  ours = _ours_like(dst, 256, 16)
  timm_vit.load_timm_vit(ours, {k: v.numpy() for k, v in sd.items()}, source="dinov2-518")
  np.testing.assert_allclose(np.asarray(ours.pos_embed[...]),
                             dst.pos_embed.detach().numpy(), atol=1e-5)
  np.testing.assert_allclose(np.asarray(ours.patch_embed.kernel[...]),
                             dst.patch_embed.proj.weight.detach().numpy().transpose(2, 3, 1, 0),
                             atol=1e-4)
  x = np.random.RandomState(1).uniform(-1, 1, (1, 256, 256, 3)).astype(np.float32)
  with torch.no_grad():
    ref = dst.forward_features(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
  with jax.default_matmul_precision("highest"):
    got = np.asarray(ours.forward_features(jnp.asarray(x)))
  np.testing.assert_allclose(got, ref, atol=1e-4)


def test_resize_matrix_matches_torch_interpolate():
  torch = require("torch")
  for n_in, n_out in [(37, 16), (14, 16), (16, 32), (7, 3)]:
    eye = torch.eye(n_in, dtype=torch.float64).reshape(n_in, 1, 1, n_in)
    ref = torch.nn.functional.interpolate(eye, size=(1, n_out), mode="bicubic", antialias=True,
                                          align_corners=False)
    np.testing.assert_allclose(resample.resize_weight_matrix(n_in, n_out),
                               ref.reshape(n_in, n_out).numpy().T, atol=1e-7)


def test_patchify_roundtrip_and_layout():
  x = np.arange(2 * 32 * 48 * 3, dtype=np.float32).reshape(2, 32, 48, 3)
  t = vit.patchify(jnp.asarray(x), 16)
  assert t.shape == (2, 6, 16 * 16 * 3)
  # token 1 is the patch at grid row 0, column 1; inside it (row, col, channel), channel fastest
  np.testing.assert_array_equal(np.asarray(t[0, 1]), x[0, 0:16, 16:32].reshape(-1))
  np.testing.assert_array_equal(np.asarray(vit.unpatchify(t, 16, (2, 3))), x)


def test_attention_backends_agree():
  k = jax.random.split(jax.random.key(0), 3)
  q, kk, v = (jax.random.normal(ki, (2, 19, 4, 16)) for ki in k)
  with jax.default_matmul_precision("highest"):
    a = vit.attention(q, kk, v, "xla")
    b = vit.attention(q, kk, v, "jax")
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
  with pytest.raises(ValueError, match="unknown attention backend"):
    vit.attention(q, kk, v, "flash9")


def test_timm_import_rejects_bad_state_dicts():
  m = vit.VisionTransformer(img_size=32, patch_size=16, width=32, depth=1, num_heads=2,
                            rngs=nnx.Rngs(0))
  from softvq_jax.convert.state_dict import export_state_dict
  good = export_state_dict(m)
  bad = dict(good)
  del bad["blocks.0.mlp.fc1.weight"]
  with pytest.raises(CheckpointError, match=r"missing keys \(1\): blocks\.0\.mlp\.fc1\.weight"):
    timm_vit.load_timm_vit(m, bad)
  bad = dict(good, **{"blocks.0.attn.extra": np.zeros(3, np.float32)})
  with pytest.raises(CheckpointError, match=r"unexpected keys \(1\): blocks\.0\.attn\.extra"):
    timm_vit.load_timm_vit(m, bad)
  bad = dict(good, **{"blocks.0.norm1.weight": np.zeros(5, np.float32)})
  with pytest.raises(CheckpointError, match=r"shape mismatches \(1\): blocks\.0\.norm1\.weight"):
    timm_vit.load_timm_vit(m, bad)
  # heads of classification checkpoints are accepted and dropped
  timm_vit.load_timm_vit(m, dict(good, **{"head.weight": np.zeros((10, 32), np.float32)}))


def test_zero_qk_bias():
  m = vit.VisionTransformer(img_size=32, patch_size=16, width=32, depth=2, num_heads=2,
                            rngs=nnx.Rngs(0))
  from softvq_jax.convert.state_dict import export_state_dict
  sd = export_state_dict(m)
  for i in range(2):
    sd[f"blocks.{i}.attn.qkv.bias"] = np.ones(96, np.float32)
  timm_vit.load_timm_vit(m, sd, zero_qk_bias=True)
  b = np.asarray(m.blocks[1].attn.qkv.bias[...])
  np.testing.assert_array_equal(b, np.r_[np.ones(32), np.zeros(32), np.ones(32)])


def test_l2_normalize_is_torch_normalize_with_a_finite_gradient_at_zero():
  x = np.random.RandomState(0).randn(3, 5).astype(np.float32)
  x[1] = 0.0
  got = np.asarray(vit.l2_normalize(jnp.asarray(x)))
  want = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)
  assert np.all(got[1] == 0.0)
  g = jax.grad(lambda a: jnp.sum(vit.l2_normalize(a) * jnp.arange(5.0)))(jnp.asarray(x))
  assert np.all(np.isfinite(np.asarray(g)))
  whole = np.asarray(vit.l2_normalize(jnp.asarray(x), None))  # axis=None: the whole array
  np.testing.assert_allclose(whole, x / np.linalg.norm(x), rtol=1e-6)
