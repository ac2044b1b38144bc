"""The public generator API (softvq_jax/generator.py): load_generator from a directory written by
the official constructor's save_pretrained, velocity vs PyTorch, save round trip, sampling wired to
the network (checked against hand-rolled Euler / CFG steps through `velocity`), determinism and
batch independence per seed, DiT sampling, generate() through a tokenizer, and the errors."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import softvq_jax
from conftest import require
from softvq_jax.api import Tokenizer
from softvq_jax.convert.safetensors_io import CheckpointError
from softvq_jax.generator import Generator, to_uint8
from softvq_jax.models import sit as sit_lib
from softvq_jax.models.tokenizer import TokenizerConfig, build_tokenizer
from test_sit import CASES, _inputs, _torch_forward, _torch_model

SMALL = dict(hidden_size=64, depth=2, num_heads=4)


def _perturbed(cfg, seed=0, scale=0.05):
  """A random network whose adaLN / final layers are not zero (the init's output is all 0)."""
  model = sit_lib.build_sit(cfg, seed=seed)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed + 100), len(leaves))
  leaves = [a + scale * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys)]
  return nnx.merge(graphdef, jax.tree.unflatten(tree, leaves), rest)


@pytest.fixture(scope="module")
def sit_gen():
  cfg = sit_lib.SiTConfig(input_size=8, in_channels=4, attention_backend="xla", **SMALL)
  return Generator(cfg, _perturbed(cfg))


def test_load_save_pretrained_directory_and_velocity(tmp_path):
  require("huggingface_hub")
  model = _torch_model(**CASES["sit_1d"], seed=7)
  model.save_pretrained(str(tmp_path / "hub"))
  gen = softvq_jax.load_generator(str(tmp_path / "hub"), attention_backend="xla")
  assert gen.config.kind == "sit" and gen.config.input_shape == (8, 4)
  x, t, y = _inputs(gen.config, seed=3)
  with jax.default_matmul_precision("highest"):
    v = np.asarray(gen.velocity(x, t, y))
  np.testing.assert_allclose(v, _torch_forward(model, gen.config, x, t, y), atol=1e-4, rtol=0)
  # save -> load gives the same network and the same config.json field set as save_pretrained
  gen.save(str(tmp_path / "ours"))
  again = softvq_jax.load_generator(str(tmp_path / "ours"), attention_backend="xla")
  with jax.default_matmul_precision("highest"):
    np.testing.assert_array_equal(np.asarray(again.velocity(x, t, y)), v)
  ours = json.loads((tmp_path / "ours" / "config.json").read_text())
  theirs = json.loads((tmp_path / "hub" / "config.json").read_text())
  assert set(theirs) <= set(ours)
  assert {k: ours[k] for k in theirs if k != "use_cfg"} == {
      k: v for k, v in theirs.items() if k != "use_cfg"}


def test_sample_is_the_sampler_over_this_network(sit_gen):
  """ODE Euler, 2 steps, CFG 2 on [0, 1], from given noise == the same steps by hand through
  velocity() (doubled batch: conditional minus null class)."""
  gen = sit_gen
  rng = np.random.RandomState(0)
  noise = rng.randn(3, 8, 4).astype(np.float32)
  labels = np.array([1, 5, 9], np.int32)
  null = np.full(3, 1000, np.int32)
  with jax.default_matmul_precision("highest"):
    got = np.asarray(gen.sample(labels, noise=noise, mode="ode", steps=2, cfg_scale=2.0))

    def v(x, t):
      tt = np.full(3, t, np.float32)
      vc, vu = gen.velocity(x, tt, labels), gen.velocity(x, tt, null)
      return np.asarray(vu + 2.0 * (vc - vu))

    x = noise + (0.5 - 1.0) * v(noise, 1.0)
    want = x + (0.0 - 0.5) * v(x, 0.5)
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)
  assert np.abs(got - noise).max() > 0.1


def test_sample_deterministic_per_seed_and_independent_of_the_batch(sit_gen):
  gen = sit_gen
  a = np.asarray(gen.sample([3, 5, 7], seed=1, steps=4))
  b = np.asarray(gen.sample([3, 5, 7], seed=1, steps=4))
  c = np.asarray(gen.sample([3], seed=1, steps=4))
  d = np.asarray(gen.sample([3, 5, 7], seed=2, steps=4))
  assert a.shape == (3, 8, 4) and np.all(np.isfinite(a))
  np.testing.assert_array_equal(a, b)
  np.testing.assert_allclose(c[0], a[0], atol=1e-6)  # sample 0 does not depend on the others
  assert np.abs(a - d).max() > 0.1


def test_sample_matches_mode_sample_images():
  """gen.sample(labels, seed=s) draws image b exactly as --mode=sample draws image index b."""
  generate = pytest.importorskip("softvq_jax.generate")
  if not hasattr(generate, "sample_latents"):
    pytest.skip("softvq_jax.generate has no sample_latents")
  cfg = sit_lib.SiTConfig(input_size=8, in_channels=4, attention_backend="xla", **SMALL)
  gen = Generator(cfg, _perturbed(cfg, seed=4))
  labels = np.array([2, 4], np.int32)
  ours = np.asarray(gen.sample(labels, seed=3, steps=3, cfg_scale=1.5))
  graphdef, state = nnx.split(gen.model)
  theirs = generate.sample_latents(
      lambda x, t, y: sit_lib.sit_apply(graphdef, state, x, t, y), cfg, jnp.asarray(labels),
      generate.image_keys(3, np.arange(2)),
      dict(mode="sde", steps=3, heun=False, cfg_scale=1.5, guidance_interval=(0.0, 1.0),
           path="linear"))
  np.testing.assert_allclose(ours, np.asarray(theirs), atol=1e-5)


def test_dit_samples_with_ddpm(tmp_path):
  cfg = sit_lib.SiTConfig(input_size=8, in_channels=4, learn_sigma=True, kind="dit",
                          attention_backend="xla", **SMALL)
  gen = Generator(cfg, _perturbed(cfg, seed=2, scale=0.02))
  out = gen.velocity(np.zeros((2, 8, 4), np.float32), np.array([10, 999]), np.array([1, 1000]))
  assert out.shape == (2, 8, 8)
  z = np.asarray(gen.sample([1, 2], seed=0, steps=3, cfg_scale=1.5))
  assert z.shape == (2, 8, 4) and np.all(np.isfinite(z))
  np.testing.assert_array_equal(z, np.asarray(gen.sample([1, 2], seed=0, steps=3, cfg_scale=1.5)))
  lin = np.asarray(gen.sample([1, 2], seed=0, steps=3, cfg_scale=1.5, noise_schedule="linear"))
  assert np.abs(lin - z).max() > 1e-3  # the schedule option reaches the sampler
  with pytest.raises(ValueError, match="DDPM"):
    gen.sample([1], mode="ode")
  gen.save(str(tmp_path / "dit"))
  assert softvq_jax.load_generator(str(tmp_path / "dit")).config.replace(
      attention_backend="xla") == cfg


def test_generate_decodes_denormalised_latents(sit_gen):
  tcfg = TokenizerConfig(image_size=32, patch_size=16, encoder_size="micro", decoder_size="micro",
                         num_latent_tokens=8, codebook_size=16, codebook_embed_dim=4,
                         num_codebooks=2, attention_backend="xla", vq_mean=0.1, vq_std=0.5)
  tok = Tokenizer(tcfg, build_tokenizer(tcfg, seed=0))
  images = sit_gen.generate(tok, [1, 2], seed=5, steps=2)
  assert images.shape == (2, 32, 32, 3) and images.dtype == np.uint8
  z = sit_gen.sample([1, 2], seed=5, steps=2)
  want = np.asarray(to_uint8(tok.decode(z * 0.5 + 0.1)))
  np.testing.assert_array_equal(images, want)
  bad = Tokenizer(tcfg.replace(codebook_embed_dim=8, num_codebooks=2),
                  build_tokenizer(tcfg.replace(codebook_embed_dim=8), seed=0))
  with pytest.raises(ValueError, match="not trained together"):
    sit_gen.generate(bad, [1])


def test_to_uint8_rounds_and_clamps():
  x = jnp.array([-2.0, -1.0, 0.0, 0.999, 1.0, 3.0, 1.6 / 127.5 - 1, 1.4 / 127.5 - 1])
  np.testing.assert_array_equal(np.asarray(to_uint8(x)), [0, 0, 128, 255, 255, 255, 2, 1])


def test_bad_sources_and_options(tmp_path, sit_gen):
  with pytest.raises(CheckpointError, match="no such directory"):
    softvq_jax.load_generator(str(tmp_path / "nope"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(CheckpointError, match="neither an official-format generator directory"):
    softvq_jax.load_generator(str(tmp_path / "empty"))
  # A tokenizer's training workdir (its metadata has no generator task) is named as such.
  from softvq_jax import checkpoint  # pylint: disable=import-outside-toplevel
  work = tmp_path / "workdir" / "checkpoints" / "100"
  (work / "state").mkdir(parents=True)
  checkpoint.write_json_item(str(work), "metadata", {"model": {"image_size": 32}})
  with pytest.raises(CheckpointError, match="tokenizer's training checkpoint.*load_tokenizer"):
    softvq_jax.load_generator(str(tmp_path / "workdir"))
  with pytest.raises(ValueError, match=r"labels must lie in 0..1000"):
    sit_gen.sample([1001])
  with pytest.raises(ValueError, match="noise must have shape"):
    sit_gen.sample([1], noise=np.zeros((1, 8, 5)))
  with pytest.raises(ValueError, match="noise_schedule is a DiT option"):
    sit_gen.sample([1], noise_schedule="cosine")
  cfg10 = sit_gen.config.replace(num_classes=10)
  gen10 = Generator(cfg10, sit_lib.build_sit(cfg10))
  with pytest.raises(ValueError, match="null class, this generator's is 10"):
    gen10.sample([1], cfg_scale=1.5)


def test_hub_id_goes_through_the_tokenizer_download_helper(tmp_path, monkeypatch, sit_gen):
  """owner/name -> api._download (huggingface_hub snapshot of config.json + model.safetensors),
  then the same strict loader; stubbed here (no network)."""
  from softvq_jax import api  # pylint: disable=import-outside-toplevel
  sit_gen.save(str(tmp_path / "snapshot"))
  asked = []

  def fake_download(hub_id, revision):
    asked.append((hub_id, revision))
    return str(tmp_path / "snapshot")

  monkeypatch.setattr(api, "_download", fake_download)
  gen = softvq_jax.load_generator("SoftVQVAE/sit-xl_softvq-b-64", revision="main",
                                  attention_backend="xla")
  assert asked == [("SoftVQVAE/sit-xl_softvq-b-64", "main")]
  assert gen.config == sit_gen.config
  with pytest.raises(CheckpointError, match="not a hub id"):
    softvq_jax.load_generator("not/a/hub/id")
