"""--mode=sample (softvq_jax/generate.py): chunks, resume, class balance, determinism, the CLI.

Small sizes throughout: the tests' tiny tokenizer (conftest.tiny_config: 32 px, 8 tokens x 16
channels) saved in the official format, a 'micro' SiT, 3 sampler steps, 8 fake CPU devices.
"""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from conftest import ONE_DEVICE_XLA_FLAGS, config_file, tiny_config
import softvq_jax
from softvq_jax import api, config_lib, generate
from softvq_jax.models.tokenizer import TokenizerConfig, build_tokenizer

ROOT = os.path.join(os.path.dirname(__file__), "..")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
  config = tiny_config()
  cfg = TokenizerConfig.from_config(config)
  d = tmp_path_factory.mktemp("tok")
  api.Tokenizer(cfg, build_tokenizer(cfg, seed=1)).save(str(d))
  return str(d)


def _config(**sample):
  config = tiny_config()
  config.generator = config_lib.generator_config(size="micro")
  config.sample = config_lib.sample_config()
  s = config.sample
  s.steps, s.batch_size, s.chunk_size, s.grid_images = 3, 8, 8, 8
  s.mode, s.cfg_scale, s.guidance_interval, s.path = "sde", 1.5, (0.0, 0.7), "cosine"
  for k, v in sample.items():
    s[k] = v
  return config


@pytest.fixture(scope="module")
def first_run(tokenizer_dir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("sample")
  summary = generate.run(_config(num_images=20), str(workdir), tokenizer=tokenizer_dir)
  return workdir, summary


def test_class_balanced_labels():
  labels = generate.class_labels(np.arange(50_000), 1000)
  assert np.bincount(labels, minlength=1000).tolist() == [50] * 1000
  assert generate.class_labels(np.arange(5), 1000, "207, 360").tolist() == [207, 360] * 2 + [207]
  with pytest.raises(ValueError, match="sample.labels"):
    config_lib.validate_generation(_config(labels="3,1001"))


def test_chunks_are_shared_out_over_processes():
  """Every chunk is drawn by exactly one process, for any process count (a resumed job may run
  on another number of hosts: chunks are found in every p<k>/ folder)."""
  for total, size, nproc in [(50_000, 1000, 8), (20, 8, 3), (5, 8, 2), (16, 8, 4)]:
    drawn = sorted(k for p in range(nproc) for k in generate.process_chunks(total, size, p, nproc))
    assert drawn == list(range(-(-total // size)))


def test_sample_writes_chunks_and_grid(first_run):
  workdir, summary = first_run
  assert summary["random_generator"] and not summary["random_tokenizer"]
  assert summary["chunks_written"] == 3 and summary["chunks_skipped"] == 0
  names = sorted(os.listdir(workdir / "samples" / "p0"))
  assert names == ["chunk_000000.npz", "chunk_000001.npz", "chunk_000002.npz"]
  out = generate.load_samples(workdir / "samples")
  assert out["images"].shape == (20, 32, 32, 3) and out["images"].dtype == np.uint8
  assert out["indices"].tolist() == list(range(20))
  assert out["labels"].tolist() == list(range(20))  # i % 1000
  assert out["images"].std() > 1  # not a constant canvas
  grid = np.asarray(Image.open(workdir / "samples.png"))
  assert grid.shape == (32 + 4, 8 * 34 + 2, 3)
  np.testing.assert_array_equal(grid[2:34, 2:34], out["images"][0])  # the grid shows image 0
  meta = json.loads((workdir / "samples" / generate.META_NAME).read_text())
  assert meta["options"]["guidance_interval"] == [0.0, 0.7] and meta["num_images"] == 20
  assert json.loads((workdir / "sample.json").read_text())["images_drawn"] == 20


def test_resume_skips_finished_chunks_and_redraws_identically(first_run, tokenizer_dir):
  workdir, _ = first_run
  before = generate.load_samples(workdir / "samples")
  os.remove(workdir / "samples" / "p0" / "chunk_000001.npz")
  summary = generate.run(_config(num_images=20), str(workdir), tokenizer=tokenizer_dir)
  assert summary["chunks_written"] == 1 and summary["chunks_skipped"] == 2
  after = generate.load_samples(workdir / "samples")
  np.testing.assert_array_equal(after["images"], before["images"])
  # other settings into the same folder: refused, naming what changed
  with pytest.raises(generate.SampleError, match="seed"):
    generate.run(_config(num_images=20, seed=1), str(workdir), tokenizer=tokenizer_dir)


def _perturbed(model, seed=0, std=0.05):
  """Every parameter moved off its initialisation: a random SiT's zero final layer and adaLN
  would otherwise make its velocity exactly 0 whatever the weights."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  leaves = [p + std * jax.random.normal(k, p.shape, p.dtype) for p, k in zip(leaves, keys)]
  return nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves), rest)


@pytest.fixture(scope="module")
def perturbed_sampler(tokenizer_dir):
  config = _config()
  tok = api.load_tokenizer(tokenizer_dir)
  gen_cfg = generate.generator_network_config(config, tok.config)
  model = _perturbed(generate.random_generator(gen_cfg, seed=0))
  options = generate.sampler_options(config.sample, "sit")
  return gen_cfg, model, tok, generate.ImageSampler(gen_cfg, model, tok, options)


def test_latents_depend_on_seed_and_index_only(perturbed_sampler):
  """Image i's latents are the same in a batch of 16 or of 8 (keys per image index), and another
  seed draws other latents."""
  _, _, _, sampler = perturbed_sampler
  idx = np.arange(16)
  labels = generate.class_labels(idx)
  full = sampler.latents(labels, generate.image_keys(0, idx))
  halves = np.concatenate([sampler.latents(labels[s], generate.image_keys(0, idx[s]))
                           for s in (slice(0, 8), slice(8, 16))])
  np.testing.assert_allclose(full, halves, atol=1e-5)
  assert full.shape == (16, 8, 16) and np.isfinite(full).all()
  other = sampler.latents(labels, generate.image_keys(1, idx))
  assert np.abs(other - full).mean() > 0.1
  again = sampler.latents(labels, generate.image_keys(0, idx))
  np.testing.assert_array_equal(again, full)


def test_dit_and_ode_grids(tokenizer_dir, tmp_path):
  config = _config(grid_images=8, mode="ode", heun=True)
  summary = generate.run(config, str(tmp_path / "sit"), tokenizer=tokenizer_dir)
  assert summary["images_drawn"] == 8 and os.path.exists(summary["grid"])
  config = _config(grid_images=8, steps=4, cfg_scale=2.0)
  config.generator.kind = "dit"
  summary = generate.run(config, str(tmp_path / "dit"), tokenizer=tokenizer_dir)
  assert summary["kind"] == "dit" and summary["options"]["noise_schedule"] == "cosine"
  grid = np.asarray(Image.open(summary["grid"]))
  assert grid.shape == (36, 8 * 34 + 2, 3) and grid.std() > 1


def test_loaded_generator_checkpoint_samples_what_was_saved(perturbed_sampler, tokenizer_dir,
                                                            tmp_path):
  """A saved official-format generator loads through --checkpoint and samples the same latents as
  the network it was saved from."""
  generator_official = pytest.importorskip("softvq_jax.convert.generator_official")
  gen_cfg, model, tok, sampler = perturbed_sampler
  generator_official.export_generator(model, str(tmp_path / "gen"))
  loaded_cfg, loaded = generate.load_generator_network(str(tmp_path / "gen"), "float32")
  assert (loaded_cfg.hidden_size, loaded_cfg.depth, loaded_cfg.kind) == (64, 2, "sit")
  idx = np.arange(8)
  keys, labels = generate.image_keys(0, idx), generate.class_labels(idx)
  again = generate.ImageSampler(loaded_cfg, loaded, tok, sampler.options)
  np.testing.assert_allclose(again.latents(labels, keys), sampler.latents(labels, keys),
                             atol=1e-5)
  # the public Generator.sample(seed=s) draws what --mode=sample draws for images 0..B-1
  gen = softvq_jax.load_generator(str(tmp_path / "gen"))
  np.testing.assert_allclose(np.asarray(gen.sample(labels, seed=0, **sampler.options)),
                             sampler.latents(labels, keys), atol=1e-5)
  summary = generate.run(_config(grid_images=8), str(tmp_path / "run"),
                         checkpoint=str(tmp_path / "gen"), tokenizer=tokenizer_dir)
  assert not summary["random_generator"] and os.path.exists(summary["grid"])


def test_user_errors(tokenizer_dir, tmp_path):
  with pytest.raises(generate.SampleError, match="sample.batch_size"):
    generate.run(_config(batch_size=12), str(tmp_path), tokenizer=tokenizer_dir)
  with pytest.raises(generate.SampleError, match="sample.heun"):
    generate.run(_config(heun=True), str(tmp_path), tokenizer=tokenizer_dir)
  config = _config()
  config.generator.in_channels = 8
  with pytest.raises(generate.SampleError, match="tokenizer"):
    generate.run(config, str(tmp_path), tokenizer=tokenizer_dir)
  dit = _config(mode="ode")
  dit.generator.kind = "dit"
  with pytest.raises(generate.SampleError, match="DDPM"):
    generate.run(dit, str(tmp_path), tokenizer=tokenizer_dir)
  config = _config(cfg_scale=2.0)
  config.generator.num_classes = 10
  with pytest.raises(generate.SampleError, match="null class"):
    generate.run(config, str(tmp_path), tokenizer=tokenizer_dir)
  with pytest.raises(generate.SampleError, match="no such directory"):
    generate.run(_config(), str(tmp_path), checkpoint=str(tmp_path / "missing"),
                 tokenizer=tokenizer_dir)
  with pytest.raises(generate.SampleError, match="no generator section"):
    generate.run(tiny_config(), str(tmp_path), tokenizer=tokenizer_dir)


def test_demo_sit_config():
  config = config_file("demo_sit")
  config_lib.validate(config)
  config_lib.validate_generation(config)
  assert (config.generator.hidden_size, config.generator.depth) == (128, 4)
  assert config.model.num_latent_tokens == 32


def test_cli_sample_mode(tokenizer_dir, tmp_path):
  """The command a user runs (one CPU device): a randomly initialised SiT says its images are
  noise, writes the grid and the summary."""
  env = dict(os.environ, XLA_FLAGS=ONE_DEVICE_XLA_FLAGS)
  proc = subprocess.run(
      [sys.executable, "-m", "softvq_jax.main", "--mode=sample", "--config=configs/demo_sit.py",
       f"--workdir={tmp_path}", f"--tokenizer={tokenizer_dir}", "--config.sample.steps=2",
       "--config.sample.grid_images=4", "--config.sample.batch_size=4"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "the images are noise" in proc.stderr
  summary = json.loads(proc.stdout.strip().splitlines()[-1])
  assert summary["images_drawn"] == 4 and summary["random_generator"]
  assert np.asarray(Image.open(tmp_path / "samples.png")).shape == (36, 4 * 34 + 2, 3)
  bad = subprocess.run(
      [sys.executable, "-m", "softvq_jax.main", "--mode=sample", "--config=configs/demo_sit.py",
       f"--workdir={tmp_path}", "--config.sample.mode=euler"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert bad.returncode == 2 and "config.sample.mode" in bad.stderr


def _free_port() -> int:
  import socket  # pylint: disable=import-outside-toplevel
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_draw_the_images_one_process_draws(tokenizer_dir, tmp_path):
  """launch/local_cpu.sh: 2 processes x 2 devices split the chunks (p0/ holds 0 and 2, p1/ 1 and
  3) and draw the images a single 8-device process draws (per-image keys), with no collective."""
  flags = ["--mode=sample", "--config=configs/demo_sit.py", f"--tokenizer={tokenizer_dir}",
           "--config.sample.num_images=20", "--config.sample.chunk_size=6",
           "--config.sample.steps=3", "--config.sample.grid_images=4"]
  proc = subprocess.run(
      ["bash", os.path.join(ROOT, "launch", "local_cpu.sh"), "--num-processes=2",
       "--devices-per-process=2", f"--port={_free_port()}", f"--log-dir={tmp_path / 'logs'}",
       f"--python={sys.executable}", "--", f"--workdir={tmp_path / 'mp'}"] + flags
      + ["--config.sample.batch_size=4"],
      cwd=ROOT, capture_output=True, text=True, timeout=900)
  logs = "".join(p.read_text() for p in sorted((tmp_path / "logs").glob("*.log")))
  assert proc.returncode == 0, (proc.stderr + logs)[-4000:]
  assert sorted(os.listdir(tmp_path / "mp" / "samples" / "p0")) == ["chunk_000000.npz",
                                                                     "chunk_000002.npz"]
  assert sorted(os.listdir(tmp_path / "mp" / "samples" / "p1")) == ["chunk_000001.npz",
                                                                     "chunk_000003.npz"]
  two = generate.load_samples(tmp_path / "mp" / "samples")
  config = config_file("demo_sit")
  s = config.sample
  s.num_images, s.chunk_size, s.steps, s.grid_images, s.batch_size = 20, 6, 3, 0, 8
  generate.run(config, str(tmp_path / "one"), tokenizer=tokenizer_dir)
  one = generate.load_samples(tmp_path / "one" / "samples")
  np.testing.assert_array_equal(two["labels"], one["labels"])
  assert np.abs(two["images"].astype(int) - one["images"].astype(int)).max() <= 1
