"""The tokenizer against a PyTorch construction of spec.md §1.2-1.4 from timm blocks, the official
checkpoint format (keys, shapes, errors; the released files' older format), and the public
encode/decode API. Parameter counts of every released variant: tests/test_variants.py."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import softvq_jax
from conftest import require
from softvq_jax.convert import official
from softvq_jax.convert.safetensors_io import CheckpointError
from softvq_jax.convert.state_dict import expected_keys, to_torch
from softvq_jax.models.tokenizer import TokenizerConfig, abstract_tokenizer

HERE = os.path.dirname(__file__)
EXAMPLE_CONFIG = {  # the field set of an official config.json (reference/official_config_example)
    "base_image_size": 256, "codebook_embed_dim": 32, "codebook_l2_norm": True,
    "codebook_show_usage": False, "codebook_size": 8192, "commit_loss_beta": 0.25,
    "dec_cls_token": True, "dec_drop_path_rate": 0.0, "dec_patch_size": 16,
    "dec_pretrained": False, "dec_tuning_method": "full", "dec_type": "vit",
    "decoder_ch_mult": [1, 1, 2, 2, 4], "decoder_model": "vit_small_patch14_dinov2.lvd142m",
    "dropout_p": 0.0, "enc_drop_path_rate": 0.0, "enc_patch_size": 16, "enc_pretrained": False,
    "enc_token_drop": 0.0, "enc_token_drop_max": 0.6, "enc_tuning_method": "full",
    "enc_type": "vit", "encoder_ch_mult": [1, 1, 2, 2, 4],
    "encoder_model": "vit_small_patch14_dinov2.lvd142m", "entropy_loss_ratio": 0.01,
    "image_size": 256, "kl_loss_weight": 1e-06, "num_codebooks": 4, "num_latent_tokens": 32,
    "repa": False, "repa_align": "global", "repa_loss_weight": 0.1,
    "repa_model": "vit_base_patch16_224", "repa_patch_size": 16, "repa_proj_dim": 2048,
    "rope_mixed": False, "rope_theta": 10.0, "to_pixel": "linear", "use_ape": True,
    "use_rope": False, "vq_loss_ratio": 1.0, "vq_mean": 0.0, "vq_std": 1.0, "z_channels": 256,
    "tau": 0.07,
}


SMALL, BASE = "vit_small_patch14_dinov2.lvd142m", "vit_base_patch14_dinov2.lvd142m"


def _torch_softvq(img_size=64, n=8, codebooks=2, k=64, e=8, seed=0, enc_model=SMALL,
                  dec_model=SMALL):
  """Independent PyTorch model with the official module/key structure (spec.md §1.2-1.4, 3)."""
  torch = require("torch")
  timm = require("timm")
  nn = torch.nn
  torch.manual_seed(seed)

  def vit(name):
    m = timm.create_model(name, pretrained=False, num_classes=0, img_size=img_size,
                          patch_size=16)
    with torch.no_grad():  # LayerScale 1e-5 would hide attention/MLP mapping errors
      for blk in m.blocks:
        blk.ls1.gamma.uniform_(0.5, 1.0)
        blk.ls2.gamma.uniform_(0.5, 1.0)
    return m

  class ToPixel(nn.Module):
    def __init__(self, d):
      super().__init__()
      self.model = nn.Linear(d, 3 * 16 * 16)

  class Enc(nn.Module):
    def __init__(self):
      super().__init__()
      self.model = vit(enc_model)
      d = self.model.embed_dim
      self.latent_tokens = nn.Parameter(torch.randn(1, n, d) * 0.02)
      self.latent_pos_embed = nn.Parameter(torch.randn(1, n, d) * 0.02)

    def forward(self, x):
      x = self.model._pos_embed(self.model.patch_embed(x))
      x = torch.cat([x, (self.latent_tokens + self.latent_pos_embed).expand(x.shape[0], -1, -1)], 1)
      for blk in self.model.blocks:
        x = blk(x)
      return self.model.norm(x)[:, -n:]

  class Dec(nn.Module):
    def __init__(self):
      super().__init__()
      self.model = vit(dec_model)
      d = self.model.embed_dim
      self.mask_token = nn.Parameter(torch.randn(1, 1, d) * 0.02)
      self.latent_pos_embed = nn.Parameter(torch.randn(1, n, d) * 0.02)
      self.to_pixel = ToPixel(d)

    def forward(self, z):
      g = img_size // 16
      x = self.model._pos_embed(self.mask_token.expand(z.shape[0], g * g, -1))
      x = torch.cat([x, z + self.latent_pos_embed], 1)
      for blk in self.model.blocks:
        x = blk(x)
      x = self.to_pixel.model(self.model.norm(x)[:, 1:1 + g * g])
      x = x.reshape(-1, g, g, 16, 16, 3).permute(0, 5, 1, 3, 2, 4)
      return x.reshape(-1, 3, img_size, img_size)

  class Quant(nn.Module):
    def __init__(self):
      super().__init__()
      self.embedding = nn.Parameter(torch.randn(codebooks, k, e))

    def forward(self, z):
      b = z.shape[0]
      zc = z.reshape(b, codebooks, n // codebooks, e).transpose(0, 1).reshape(codebooks, -1, e)
      zc = nn.functional.normalize(zc, dim=-1)
      emb = nn.functional.normalize(self.embedding, dim=-1)
      q = torch.softmax(torch.einsum("cre,cke->crk", zc, emb.detach()) / 0.07, -1)
      zq = torch.einsum("crk,cke->cre", q, emb)
      return zq.reshape(codebooks, b, n // codebooks, e).transpose(0, 1).reshape(b, n, e)

  class SoftVQ(nn.Module):
    def __init__(self):
      super().__init__()
      self.encoder = Enc()
      self.quant_conv = nn.Linear(self.encoder.model.embed_dim, e)
      self.quantize = Quant()
      self.decoder = Dec()
      self.post_quant_conv = nn.Linear(e, self.decoder.model.embed_dim)

    def encode(self, x):
      return self.quantize(self.quant_conv(self.encoder(x)))

    def decode(self, z):
      return self.decoder(self.post_quant_conv(z))

  model = SoftVQ().eval()
  cfg = dict(EXAMPLE_CONFIG, image_size=img_size, num_latent_tokens=n, num_codebooks=codebooks,
             codebook_size=k, codebook_embed_dim=e, vq_mean=0.25, vq_std=1.5,
             encoder_model=enc_model, decoder_model=dec_model)
  return model, cfg


def _write_official(tmp_path, model, cfg):
  safetensors_numpy = require("safetensors.numpy")
  d = tmp_path / "official"
  d.mkdir(exist_ok=True)
  sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  safetensors_numpy.save_file(sd, str(d / "model.safetensors"))
  (d / "config.json").write_text(json.dumps(cfg))
  return d, sd


def test_official_checkpoint_matches_pytorch_reference(tmp_path):
  torch = require("torch")
  model, cfg = _torch_softvq()
  d, _ = _write_official(tmp_path, model, cfg)
  tok = softvq_jax.load_tokenizer(str(d), compute_dtype="float32", attention_backend="xla")
  assert tok.config.num_codebooks == 2 and tok.config.codebook_size == 64
  x = np.random.RandomState(0).uniform(-1, 1, (2, 64, 64, 3)).astype(np.float32)
  with torch.no_grad():
    ref_z = model.encode(torch.from_numpy(x).permute(0, 3, 1, 2))
    ref_img = model.decode(ref_z).permute(0, 2, 3, 1).numpy()
  with jax.default_matmul_precision("highest"):
    z = np.asarray(tok.encode(x))
    img = np.asarray(tok.decode(ref_z.numpy()))
    zn = np.asarray(tok.encode(x, normalize=True))
  np.testing.assert_allclose(z, ref_z.numpy(), atol=1e-5)
  np.testing.assert_allclose(img, ref_img, atol=1e-5)
  np.testing.assert_allclose(zn, (z - 0.25) / 1.5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(tok.denormalize(jnp.asarray(zn))), z, atol=1e-5)


def test_export_roundtrip_loads_in_pytorch(tmp_path):
  torch = require("torch")
  model, cfg = _torch_softvq(seed=1)
  d, sd = _write_official(tmp_path, model, cfg)
  tok = softvq_jax.load_tokenizer(str(d), compute_dtype="float32")
  out = tmp_path / "exported"
  tok.save(str(out))
  safetensors_numpy = require("safetensors.numpy")
  back = safetensors_numpy.load_file(str(out / "model.safetensors"))
  assert set(back) == set(sd)
  for k in sd:
    if "decoder.model.patch_embed" not in k:  # unused by the decoder; exported as zeros
      np.testing.assert_array_equal(back[k], sd[k], err_msg=k)
  model.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)
  exported_cfg = json.loads((out / "config.json").read_text())
  assert set(exported_cfg) == set(EXAMPLE_CONFIG)
  assert official.config_from_official(exported_cfg) == tok.config.replace(
      compute_dtype=official.config_from_official(exported_cfg).compute_dtype)


# The released files were written by the Dec-2024 revision of the official code (spec.md §3): their
# config.json lacks these fields of the current ModelArgs and has `repa_layer_indices` instead.
DEC2024_MISSING = ("base_image_size", "to_pixel", "dec_cls_token", "use_ape", "use_rope",
                   "rope_mixed", "rope_theta", "enc_token_drop", "enc_token_drop_max")


def test_released_format_loads_strictly_and_saves_the_current_official_format(tmp_path):
  """A checkpoint written the way the released ones are: the Dec-2024 field set (37 fields), no
  decoder patch_embed, a `quantize.codebook_used` buffer, 32 tokens of dim e = 64 and an encoder
  narrower than the decoder (L-32 is B/L; S/B here to keep the test small). It loads strictly,
  encodes/decodes as the PyTorch model does, and `Tokenizer.save` writes the current official
  format (decoder patch_embed present, current field set), which PyTorch loads with strict=True."""
  torch = require("torch")
  safetensors_numpy = require("safetensors.numpy")
  model, cfg = _torch_softvq(n=32, codebooks=4, k=64, e=64, enc_model=SMALL, dec_model=BASE,
                             seed=2)
  released_cfg = {k: v for k, v in cfg.items() if k not in DEC2024_MISSING}
  released_cfg["repa_layer_indices"] = [8]  # its value is irrelevant to the tokenizer
  assert len(released_cfg) == 37
  d = tmp_path / "released"
  d.mkdir()
  (d / "config.json").write_text(json.dumps(released_cfg))
  sd = {k: v.detach().numpy() for k, v in model.state_dict().items()
        if not k.startswith("decoder.model.patch_embed.")}
  sd["quantize.codebook_used"] = np.zeros((4, 65536), np.float32)
  safetensors_numpy.save_file(sd, str(d / "model.safetensors"))

  tok = softvq_jax.load_tokenizer(str(d), compute_dtype="float32", attention_backend="xla")
  c = tok.config
  assert (c.encoder_size, c.decoder_size, c.num_latent_tokens, c.codebook_embed_dim) == (
      "S", "B", 32, 64)
  assert c.dec_cls_token and (c.vq_mean, c.vq_std) == (0.25, 1.5)
  x = np.random.RandomState(2).uniform(-1, 1, (2, 64, 64, 3)).astype(np.float32)
  with torch.no_grad():
    ref_z = model.encode(torch.from_numpy(x).permute(0, 3, 1, 2))
    ref_img = model.decode(ref_z).permute(0, 2, 3, 1).numpy()
  with jax.default_matmul_precision("highest"):
    np.testing.assert_allclose(np.asarray(tok.encode(x)), ref_z.numpy(), atol=1e-5)
    np.testing.assert_allclose(np.asarray(tok.decode(ref_z.numpy())), ref_img, atol=1e-5)

  # A key the released format does not explain is still refused.
  bad = tmp_path / "bad"
  bad.mkdir()
  (bad / "config.json").write_text(json.dumps(released_cfg))
  safetensors_numpy.save_file(dict(sd, **{"quantize.extra": np.zeros(3, np.float32)}),
                              str(bad / "model.safetensors"))
  with pytest.raises(CheckpointError, match="quantize.extra"):
    softvq_jax.load_tokenizer(str(bad), compute_dtype="float32")

  out = tmp_path / "saved"
  tok.save(str(out))
  back = safetensors_numpy.load_file(str(out / "model.safetensors"))
  model.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)
  for k, v in sd.items():
    if k != "quantize.codebook_used":
      np.testing.assert_array_equal(back[k], v, err_msg=k)
  saved_cfg = json.loads((out / "config.json").read_text())
  assert set(saved_cfg) == set(EXAMPLE_CONFIG)
  assert (saved_cfg["encoder_model"], saved_cfg["decoder_model"]) == (SMALL, BASE)
  assert saved_cfg["codebook_embed_dim"] == 64 and saved_cfg["num_latent_tokens"] == 32


def test_key_names_and_shapes_match_official_b64_256():
  """Our parameter tree, named the PyTorch way, is exactly the released SoftVQ-B-64 state dict."""
  ref = {}
  with open(os.path.join(HERE, "data", "official_state_dict_b64_256.tsv")) as f:
    for line in f:
      key, shape, _ = line.rstrip("\n").split("\t")
      shape = tuple(json.loads(shape.replace("(", "[").replace(")", "]").replace(",]", "]")))
      if "{i}" in key:
        for i in range(12):
          ref[key.replace("{i}", str(i))] = shape
      else:
        ref[key] = shape
  model = abstract_tokenizer(TokenizerConfig(encoder_size="B", decoder_size="B",
                                             num_latent_tokens=64, image_size=256))
  ours = {k: tuple(to_torch(np.zeros(s, np.int8), kind).shape)
          for k, (_, kind, s) in expected_keys(model).items()}
  unused = {k for k in ref if k.startswith("decoder.model.patch_embed.")}
  assert len(unused) == 2
  assert ours == {k: v for k, v in ref.items() if k not in unused}


def _mini_dir(tmp_path, image_size=256):
  """A small official-format checkpoint written by our exporter from a random 'mini' model."""
  from softvq_jax.models.tokenizer import build_tokenizer
  cfg = TokenizerConfig(image_size=image_size, encoder_size="mini", decoder_size="mini",
                        num_latent_tokens=32, codebook_size=128, num_codebooks=4)
  d = tmp_path / f"mini{image_size}"
  official.export_official(build_tokenizer(cfg), str(d))
  return d


@pytest.mark.parametrize("image_size", [256, 512])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_encode_decode_shapes_and_dtypes(tmp_path, image_size, dtype):
  tok = softvq_jax.load_tokenizer(str(_mini_dir(tmp_path, image_size)), compute_dtype=dtype)
  for b in (1, 3):
    x = np.random.RandomState(b).uniform(-1, 1, (b, image_size, image_size, 3)).astype(np.float32)
    z = tok.encode(x)
    assert z.shape == (b, 32, 32) and z.dtype == jnp.float32
    y = tok.decode(z)
    assert y.shape == (b, image_size, image_size, 3) and y.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(y)))
  # uint8 input is scaled; a single image without a batch axis gets a clear error
  assert tok.encode(np.zeros((1, image_size, image_size, 3), np.uint8)).shape == (1, 32, 32)
  with pytest.raises(ValueError, match="add a batch axis"):
    tok.encode(np.zeros((image_size, image_size, 3), np.float32))
  with pytest.raises(ValueError, match=f"expected NHWC images \\[B, {image_size}"):
    tok.encode(np.zeros((1, 3, image_size, image_size), np.float32))


@pytest.mark.parametrize("image_size", [256, 512])
def test_released_sizes_trace_at_both_resolutions(image_size):
  cfg = TokenizerConfig(image_size=image_size, encoder_size="B", decoder_size="L",
                        num_latent_tokens=64, compute_dtype="bfloat16")
  model = abstract_tokenizer(cfg)
  from flax import nnx
  graphdef, state = nnx.split(model)
  x = jax.ShapeDtypeStruct((3, image_size, image_size, 3), jnp.float32)
  out = jax.eval_shape(lambda s, xx: nnx.merge(graphdef, s)(xx), state, x)
  assert out.tokens.shape == (3, 64, 32) and out.tokens.dtype == jnp.float32
  assert out.reconstruction.shape == (3, image_size, image_size, 3)
  assert out.reconstruction.dtype == jnp.float32 and out.entropy_loss.shape == ()


def _official_files(tmp_path):
  model, cfg = _torch_softvq(seed=2)
  return _write_official(tmp_path, model, cfg)


def test_missing_extra_and_misshapen_keys_are_named(tmp_path):
  safetensors_numpy = require("safetensors.numpy")
  d, sd = _official_files(tmp_path)
  cases = {
      "missing keys \\(1\\): encoder.model.blocks.3.attn.qkv.weight":
          {k: v for k, v in sd.items() if k != "encoder.model.blocks.3.attn.qkv.weight"},
      "unexpected keys \\(1\\): decoder.extra_head.weight":
          dict(sd, **{"decoder.extra_head.weight": np.zeros((2, 2), np.float32)}),
      "shape mismatches \\(1\\): quantize.embedding: file \\(2, 64, 9\\) vs model \\(2, 64, 8\\)":
          dict(sd, **{"quantize.embedding": np.zeros((2, 64, 9), np.float32)}),
  }
  for pattern, bad in cases.items():
    safetensors_numpy.save_file(bad, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match=pattern) as e:
      softvq_jax.load_tokenizer(str(d))
    assert "model.safetensors" in str(e.value)
  # Keys the spec says to accept: decoder patch_embed, usage buffer, REPA teacher + projector.
  safetensors_numpy.save_file(dict(sd, **{"quantize.codebook_used": np.zeros(5, np.float32),
                                          "repa_model.blocks.0.norm1.weight": np.ones(3, np.float32),
                                          "projection.0.weight": np.ones((2, 2), np.float32)}),
                              str(d / "model.safetensors"))
  softvq_jax.load_tokenizer(str(d))


def test_corrupt_safetensors_names_the_file(tmp_path):
  d, _ = _official_files(tmp_path)
  path = d / "model.safetensors"
  data = path.read_bytes()
  path.write_bytes(data[: len(data) // 2])  # truncated download
  with pytest.raises(CheckpointError, match="model.safetensors.*outside the file's data"):
    softvq_jax.load_tokenizer(str(d))
  path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
  with pytest.raises(CheckpointError, match="model.safetensors: unreadable safetensors header"):
    softvq_jax.load_tokenizer(str(d))
  path.write_bytes(b"\x01\x02")
  with pytest.raises(CheckpointError, match="too short"):
    softvq_jax.load_tokenizer(str(d))


def test_unsupported_official_options_fail_naming_the_field(tmp_path):
  d, _ = _official_files(tmp_path)
  base = json.loads((d / "config.json").read_text())
  for field, value in [("use_rope", True), ("to_pixel", "conv"), ("enc_type", "cnn"),
                       ("encoder_model", "vit_giant_patch14_dinov2.lvd142m"),
                       ("enc_tuning_method", "lora")]:
    (d / "config.json").write_text(json.dumps(dict(base, **{field: value})))
    with pytest.raises(CheckpointError, match=field):
      softvq_jax.load_tokenizer(str(d))
  (d / "config.json").write_text(json.dumps({k: v for k, v in base.items()
                                            if k != "codebook_size"}))
  with pytest.raises(CheckpointError, match="missing field.*codebook_size"):
    softvq_jax.load_tokenizer(str(d))


def test_bad_paths_are_explained(tmp_path):
  with pytest.raises(CheckpointError, match="neither an official-format directory .* nor a "
                                            "training workdir"):
    softvq_jax.load_tokenizer(str(tmp_path))
  with pytest.raises(CheckpointError, match="not a hub id"):
    softvq_jax.load_tokenizer(str(tmp_path / "does" / "not" / "exist"))


def test_normalize_with_default_statistics_warns_once(tmp_path, caplog):
  """encode(normalize=True) on a tokenizer whose vq_mean / vq_std are the defaults (0, 1) says
  once that nothing is normalised and how to measure the statistics."""
  tok = softvq_jax.load_tokenizer(str(_mini_dir(tmp_path, image_size=32)), compute_dtype="float32")
  assert (tok.config.vq_mean, tok.config.vq_std) == (0.0, 1.0)
  x = np.zeros((1, 32, 32, 3), np.float32)
  with caplog.at_level("WARNING"):
    tok.encode(x, normalize=True)
    tok.encode(x, normalize=True)
    tok.encode(x)
  warnings_ = [r for r in caplog.records if "nothing is normalised" in r.getMessage()]
  assert len(warnings_) == 1 and "--mode=stats" in warnings_[0].getMessage()
