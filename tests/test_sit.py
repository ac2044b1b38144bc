"""SiT / DiT networks (softvq_jax/models/sit.py) against the PyTorch construction of the official
modules (benchmarks/torch_sit_reference.py), and the released hub format
(softvq_jax/convert/generator_official.py): keys, shapes, config fields, errors, both directions.

Every torch weight is perturbed before a comparison (adaLN-Zero's zero init would make the blocks
identities and hide any error in them). Small sizes: depth 2, width 64 (4 heads)."""
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import ONE_DEVICE_XLA_FLAGS, require
from softvq_jax.convert import generator_official as gen_official
from softvq_jax.convert.safetensors_io import CheckpointError
from softvq_jax.models import sit as sit_lib

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))

SMALL = dict(hidden_size=64, depth=2, num_heads=4)


def _reference():
  require("torch")
  import torch_sit_reference  # pylint: disable=import-outside-toplevel
  return torch_sit_reference


def _torch_model(kind="sit", vae_1d=True, input_size=8, in_channels=4, patch_size=2,
                 learn_sigma=True, class_dropout_prob=0.1, seed=0, perturb=True):
  torch = require("torch")
  ref = _reference()
  torch.manual_seed(seed)
  if kind == "sit":
    model = ref.SiT(input_size=input_size, patch_size=1 if vae_1d else patch_size,
                    in_channels=in_channels, decoder_hidden_size=SMALL["hidden_size"],
                    class_dropout_prob=class_dropout_prob, vae_1d=vae_1d, qk_norm=False, **SMALL)
  else:
    model = ref.DiT(input_size=input_size, patch_size=1 if vae_1d else patch_size,
                    in_channels=in_channels, learn_sigma=learn_sigma,
                    class_dropout_prob=class_dropout_prob, vae_1d=vae_1d, **SMALL)
  if perturb:
    ref.perturb_(model, seed=seed)
  return model.eval()


def _ours_from_torch(model, cfg):
  ours = sit_lib.build_sit(cfg.replace(compute_dtype="float32", attention_backend="xla"), seed=9)
  sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  gen_official.load_generator_state_dict(ours, sd, source="torch")
  return ours


_jitted_apply = jax.jit(sit_lib.sit_apply, static_argnums=0)


def _apply(model, x, t, y):
  """The network through the pure-function form used inside jax.jit (eager calls compile every
  op separately: minutes on a loaded 2-core CPU), float32 at full matmul precision."""
  graphdef, state = nnx.split(model)
  with jax.default_matmul_precision("highest"):
    return np.asarray(_jitted_apply(graphdef, state, jnp.asarray(x), jnp.asarray(t),
                                    jnp.asarray(y)))


def _inputs(cfg, batch=3, seed=0):
  rng = np.random.RandomState(seed)
  x = rng.randn(batch, *cfg.input_shape).astype(np.float32)
  if cfg.kind == "sit":
    t = rng.uniform(0, 1, batch).astype(np.float32)
  else:
    t = rng.randint(0, 1000, batch).astype(np.int32)
  y = np.array([3, cfg.null_class, 7][:batch], np.int32)
  return x, t, y


def _torch_forward(model, cfg, x, t, y):
  torch = require("torch")
  xt = torch.from_numpy(x)
  if not cfg.vae_1d:
    xt = xt.permute(0, 3, 1, 2)  # NHWC -> NCHW
  tt = torch.from_numpy(t) if cfg.kind == "sit" else torch.from_numpy(t.astype(np.int64))
  with torch.no_grad():
    out = model(xt, tt, torch.from_numpy(y.astype(np.int64)))
  out = out.numpy()
  return out if cfg.vae_1d else out.transpose(0, 2, 3, 1)


CASES = {
    "sit_1d": dict(kind="sit", vae_1d=True, input_size=8, in_channels=4),
    "sit_2d": dict(kind="sit", vae_1d=False, input_size=8, in_channels=4, patch_size=2),
    "dit_1d_learn_sigma": dict(kind="dit", vae_1d=True, input_size=8, in_channels=4,
                               learn_sigma=True),
    "dit_2d_learn_sigma": dict(kind="dit", vae_1d=False, input_size=8, in_channels=4,
                               patch_size=2, learn_sigma=True),
}


def _cfg(case):
  kw = dict(case)
  kind = kw.pop("kind")
  return sit_lib.SiTConfig(
      input_size=kw["input_size"], in_channels=kw["in_channels"],
      patch_size=1 if kw["vae_1d"] else kw["patch_size"], vae_1d=kw["vae_1d"],
      learn_sigma=kind == "dit" and kw.get("learn_sigma", True), kind=kind, **SMALL)


@pytest.mark.parametrize("name", list(CASES))
def test_network_matches_official_pytorch(name):
  case = CASES[name]
  model = _torch_model(**case)
  cfg = _cfg(case)
  ours = _ours_from_torch(model, cfg)
  x, t, y = _inputs(cfg)
  ref = _torch_forward(model, cfg, x, t, y)
  out = _apply(ours, x, t, y)
  assert out.shape == ref.shape == (3,) + cfg.input_shape[:-1] + (cfg.out_channels,)
  assert np.abs(ref).max() > 0.1  # perturbed weights: the output is not a near-zero constant
  np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)


def test_init_follows_the_official_rules():
  """Fresh weights: zero adaLN / final layer (output exactly 0), xavier bounds, N(0, 0.02)
  tables, and the fixed position tables equal to the reference's (1-D interleaved, 2-D)."""
  torch = require("torch")
  for vae_1d in (True, False):
    case = dict(kind="sit", vae_1d=vae_1d, input_size=8, in_channels=4, patch_size=2)
    cfg = _cfg(case)
    ours = sit_lib.build_sit(cfg, seed=0)
    model = _torch_model(**case, perturb=False)
    np.testing.assert_allclose(np.asarray(ours.pos_embed[...]),
                               model.pos_embed.detach().numpy(), atol=1e-6)
    assert isinstance(ours.pos_embed, sit_lib.FixedPosEmbed)  # stored, not an nnx.Param
    x, t, y = _inputs(cfg)
    assert np.all(_apply(ours, x, t, y) == 0)
  del torch
  d = SMALL["hidden_size"]
  for blk in ours.blocks:
    assert not np.any(np.asarray(blk.adaLN_modulation[1].kernel[...]))
    bound = np.sqrt(6.0 / (d + 3 * d))  # xavier-uniform of qkv [D, 3D]
    k = np.asarray(blk.attn.qkv.kernel[...])
    assert np.abs(k).max() <= bound and np.abs(k).max() > 0.9 * bound
    assert not np.any(np.asarray(blk.attn.qkv.bias[...]))
  assert not np.any(np.asarray(ours.final_layer.linear.kernel[...]))
  table = np.asarray(ours.y_embedder.embedding_table.weight[...])
  assert table.shape == (1001, d) and abs(table.std() - 0.02) < 0.002
  t0 = np.asarray(ours.t_embedder.mlp[0].kernel[...])
  assert abs(t0.std() - 0.02) < 0.002
  pk = np.asarray(ours.x_embedder.proj.kernel[...])  # xavier on [D, C p p]
  bound = np.sqrt(6.0 / (4 * 2 * 2 + d))
  assert np.abs(pk).max() <= bound and np.abs(pk).max() > 0.9 * bound


def test_sit_xl1_parameter_count():
  """SiT-XL/1 on 64 tokens of dim 32: 674,926,880 as PyTorch counts it (the fixed pos_embed is
  an nn.Parameter there), shape-evaluated without memory."""
  model = sit_lib.abstract_sit(sit_lib.SiTConfig.named("XL", input_size=64, in_channels=32))
  assert sit_lib.count_params(model, include_pos_embed=True) == 674_926_880
  assert sit_lib.count_params(model) == 674_926_880 - 64 * 1152


def test_label_dropout_only_in_training():
  cfg = sit_lib.SiTConfig(input_size=8, in_channels=4, class_dropout_prob=0.5, **SMALL)
  model = sit_lib.build_sit(cfg)
  emb = model.y_embedder
  y = jnp.arange(64, dtype=jnp.int32) % 10
  table = np.asarray(emb.embedding_table.weight[...])
  np.testing.assert_array_equal(np.asarray(emb(y)), table[np.asarray(y)])
  dropped = np.asarray(emb(y, train=True, dropout_key=jax.random.key(0)))
  is_null = np.all(dropped == table[cfg.null_class], axis=-1)
  assert 16 < is_null.sum() < 48  # p = 0.5 of 64
  with pytest.raises(ValueError, match="dropout_key"):
    emb(y, train=True)


def test_bad_inputs_name_the_expected_shape():
  cfg = sit_lib.SiTConfig(input_size=8, in_channels=4, **SMALL)
  model = sit_lib.build_sit(cfg)
  with pytest.raises(ValueError, match=r"\[B, 8, 4\]"):
    model(jnp.zeros((2, 8, 5)), jnp.zeros(2), jnp.zeros(2, jnp.int32))
  with pytest.raises(TypeError, match="integer class labels"):
    model(jnp.zeros((2, 8, 4)), jnp.zeros(2), jnp.zeros(2))
  with pytest.raises(ValueError, match="patch_size=1"):
    sit_lib.SiTConfig(patch_size=2, vae_1d=True)


# ----------------------------------------------------------------------------- hub format


def _save_pretrained(model, d):
  require("huggingface_hub")
  model.save_pretrained(str(d))
  return d


def test_save_pretrained_directory_loads_strictly_and_matches(tmp_path):
  """A directory written by the official constructor's save_pretrained (PyTorchModelHubMixin:
  config.json with every constructor argument, model.safetensors) loads offline; outputs match."""
  for name in ("sit_1d", "dit_2d_learn_sigma"):
    case = CASES[name]
    model = _torch_model(**case, seed=3)
    d = _save_pretrained(model, tmp_path / name)
    raw = json.loads((d / "config.json").read_text())
    cfg = gen_official.read_generator_config(d)
    assert cfg.replace(compute_dtype="float32") == _cfg(case)
    assert ("path_type" in raw) == (case["kind"] == "sit")
    ours = sit_lib.build_sit(cfg.replace(attention_backend="xla"), seed=5)
    gen_official.load_generator_weights(ours, d)
    x, t, y = _inputs(cfg, seed=1)
    out = _apply(ours, x, t, y)
    np.testing.assert_allclose(out, _torch_forward(model, cfg, x, t, y), atol=1e-4, rtol=0)


def test_export_loads_in_pytorch_strictly(tmp_path):
  """Our export: the official from_pretrained builds the model from our config.json, and
  load_state_dict(strict=True) takes our model.safetensors; same outputs."""
  torch = require("torch")
  st = require("safetensors.torch")
  ref = _reference()
  for name in ("sit_2d", "dit_1d_learn_sigma"):
    case = CASES[name]
    cfg = _cfg(case)
    ours = _ours_from_torch(_torch_model(**case, seed=4), cfg)
    d = tmp_path / name
    gen_official.export_generator(ours, d)
    cls = ref.SiT if cfg.kind == "sit" else ref.DiT
    back = cls.from_pretrained(str(d)).eval()
    back.load_state_dict(st.load_file(str(d / "model.safetensors")), strict=True)
    x, t, y = _inputs(cfg, seed=2)
    out = _apply(ours, x, t, y)
    np.testing.assert_allclose(out, _torch_forward(back, cfg, x, t, y), atol=1e-4, rtol=0)
    assert gen_official.read_generator_config(d) == cfg.replace(attention_backend="auto")
  del torch


def _write(d, config, sd):
  safetensors_numpy = require("safetensors.numpy")
  d.mkdir(parents=True, exist_ok=True)
  (d / "config.json").write_text(json.dumps(config))
  safetensors_numpy.save_file(sd, str(d / "model.safetensors"))
  return d


def _official_files():
  cfg = sit_lib.SiTConfig(input_size=8, in_channels=4, **SMALL)
  model = sit_lib.build_sit(cfg, seed=1)
  return cfg, gen_official.config_to_official(cfg), gen_official.generator_state_dict(model)


def test_strict_loading_lists_bad_keys(tmp_path):
  cfg, config, sd = _official_files()
  ours = sit_lib.build_sit(cfg)
  bad = dict(sd)
  del bad["blocks.1.attn.qkv.bias"]
  bad["blocks.0.attn.q_norm.weight"] = np.ones(16, np.float32)
  bad["x_embedder.weight"] = np.zeros((64, 5), np.float32)
  d = _write(tmp_path / "bad", config, bad)
  with pytest.raises(CheckpointError) as e:
    gen_official.load_generator_weights(ours, d)
  msg = str(e.value)
  assert "missing keys (1): blocks.1.attn.qkv.bias" in msg
  assert "unexpected keys (1): blocks.0.attn.q_norm.weight" in msg
  assert "x_embedder.weight: file (64, 5) vs model (64, 4)" in msg
  # a pos_embed of another layout (e.g. a 2-D table in a 1-D file) is refused
  bad = dict(sd)
  bad["pos_embed"] = sit_lib.sincos_2d(2, 64)[None].repeat(2, axis=1)
  d = _write(tmp_path / "pos", config, bad)
  with pytest.raises(CheckpointError, match="pos_embed is not the fixed sin-cos"):
    gen_official.load_generator_weights(ours, d)


def test_config_fields(tmp_path):
  cfg, config, _ = _official_files()
  # unknown-but-harmless fields are ignored
  noisy = dict(config, some_future_field=[1, 2], fused_attn=True, flash_attn=True, use_cfg=False,
               path_type="linear")
  assert gen_official.config_from_official(noisy) == cfg
  with pytest.raises(CheckpointError, match="qk_norm=true is not supported"):
    gen_official.config_from_official(dict(config, qk_norm=True))
  with pytest.raises(CheckpointError, match="decoder_hidden_size=768"):
    gen_official.config_from_official(dict(config, decoder_hidden_size=768))
  with pytest.raises(CheckpointError, match=r"missing field\(s\) \['depth'\]"):
    gen_official.config_from_official({k: v for k, v in config.items() if k != "depth"})
  with pytest.raises(CheckpointError, match="cannot tell a SiT from a DiT"):
    gen_official.config_from_official(dict(config, learn_sigma=True))
  with pytest.raises(CheckpointError, match="hidden_size='64'"):
    gen_official.config_from_official(dict(config, hidden_size="64"))
  # the official 1-D form ignores patch_size; a DiT config becomes kind="dit"
  assert gen_official.config_from_official(dict(config, patch_size=2)).patch_size == 1
  dit = {k: v for k, v in config.items() if k not in ("path_type", "qk_norm")}
  dcfg = gen_official.config_from_official(dict(dit, learn_sigma=True))
  assert dcfg.kind == "dit" and dcfg.learn_sigma and dcfg.out_channels == 8
  # no null row without label dropout, as in the reference
  cfg0 = gen_official.config_from_official(dict(config, class_dropout_prob=0.0))
  assert sit_lib.abstract_sit(cfg0).y_embedder.embedding_table.weight.shape == (1000, 64)


def test_sample_benchmark_runs():
  """benchmarks/sample.py end to end on the micro size: parity guard passed, both frameworks and
  both forms timed, one JSON line (so BENCHMARKS.md's commands keep working)."""
  import subprocess  # pylint: disable=import-outside-toplevel
  require("torch")
  root = os.path.join(os.path.dirname(__file__), "..")
  proc = subprocess.run(
      [sys.executable, "benchmarks/sample.py", "--size=micro", "--batch_size=2", "--repeats=1",
       "--window_s=0", "--tokens=8", "--channels=4", "--latent_size=8"],
      cwd=root, env=dict(os.environ, XLA_FLAGS=ONE_DEVICE_XLA_FLAGS), capture_output=True,
      text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = [l for l in proc.stdout.splitlines() if l.strip()]
  assert len(lines) == 1, proc.stdout
  result = json.loads(lines[0])
  for form, seq in (("1d", 8), ("2d", 16)):
    r = result["forms"][form]
    assert r["sequence_length"] == seq and r["parity_float32"]["max_abs_diff"] <= 1e-3
    assert r["jax"]["img_s"] > 0 and r["torch"]["img_s"] > 0
  assert result["ratio_1d_over_2d"]["jax"] > 0


def test_logical_axes_shard_over_a_mesh_and_remat_is_the_same_function():
  """Every stored array (parameters and pos_embed) gets a sharding from the logical-axis rules;
  FSDP over 8 devices splits the big matrices; remat=True computes the same output."""
  from softvq_jax import sharding  # pylint: disable=import-outside-toplevel
  cfg = sit_lib.SiTConfig(input_size=8, in_channels=4, attention_backend="xla", **SMALL)
  _, state = nnx.split(sit_lib.abstract_sit(cfg))
  mesh = sharding.create_mesh((1, -1, 1))
  shardings = dict(nnx.to_flat_state(sharding.state_shardings(state, mesh)))
  assert ("pos_embed",) in shardings
  spec = shardings[("blocks", 0, "adaLN_modulation", 1, "kernel")].value.spec
  assert "fsdp" in tuple(spec), spec
  model = sit_lib.build_sit(cfg, seed=3)
  leaves, tree = jax.tree.flatten(nnx.state(model, nnx.Param))
  keys = jax.random.split(jax.random.key(0), len(leaves))
  nnx.update(model, jax.tree.unflatten(
      tree, [a + 0.05 * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys)]))
  x, t, y = _inputs(cfg)
  out = _apply(model, x, t, y)
  graphdef, state = nnx.split(model)
  remat = nnx.merge(nnx.graphdef(sit_lib.abstract_sit(cfg.replace(remat=True))), state)
  np.testing.assert_allclose(_apply(remat, x, t, y), out, atol=1e-5)
  assert np.abs(out).max() > 0.01


def test_bfloat16_compute_stays_close_to_float32():
  """compute_dtype=bfloat16 (matmul inputs; residual stream, LayerNorm, softmax float32): same
  parameters, float32 output, within bf16 rounding of the float32 network."""
  model = _torch_model(**CASES["sit_2d"], seed=5)
  cfg = _cfg(CASES["sit_2d"])
  ours = _ours_from_torch(model, cfg)
  x, t, y = _inputs(cfg, seed=4)
  ref = _apply(ours, x, t, y)
  graphdef, state = nnx.split(ours)
  bf16 = nnx.merge(nnx.graphdef(sit_lib.abstract_sit(ours.cfg.replace(compute_dtype="bfloat16"))),
                   state)
  out = _apply(bf16, x, t, y)
  assert out.dtype == np.float32
  rel = np.abs(out - ref).max() / np.abs(ref).max()
  assert 0 < rel < 3e-2, rel
