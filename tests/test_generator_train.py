"""Generator (SiT) training in the tokenizer's loop (softvq_jax/generator_task.py, issue 19):
kill -9 + rerun == uninterrupted (data path a, through the CLI), crash + rerun == uninterrupted
(data path b, online encoding, in-process), FSDP (1, 8, 1) == one device, the demo_sit loss
falls, the latent-statistics guard, the ADM centre crop + flip transform.

Micro sizes throughout (a 1-block SiT of width 32 on 8 tokens x 16 channels of a micro
tokenizer, batch 8): these tests check the plumbing and its exactness, not learning quality.
"""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from softvq_jax import api, config_lib, data, generator_task, latents, sharding, train
from softvq_jax.models.tokenizer import TokenizerConfig, build_tokenizer
from conftest import config_file, tiny_config

ROOT = os.path.join(os.path.dirname(__file__), "..")

# The micro generator: what --config.generator.* sets in the CLI test, and the in-process runs.
MICRO = {"hidden_size": 32, "depth": 1, "num_heads": 2}


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
  """A micro tokenizer (official format, measured-looking latent statistics) and
  `--mode=extract`'s tokens (+ flips) of 64 demo crops: (tokenizer dir, tokens dir)."""
  root = tmp_path_factory.mktemp("gen_train")
  config = tiny_config()
  config.model.vq_mean, config.model.vq_std = 0.01, 0.5
  cfg = TokenizerConfig.from_config(config)
  tok_dir = str(root / "tok")
  api.Tokenizer(cfg, build_tokenizer(cfg, seed=1)).save(tok_dir)
  config.latents.flip, config.latents.batch_size, config.latents.chunk_batches = True, 8, 4
  config.data.demo_train_size = 64
  manifest = latents.extract_tokens(config, str(root / "tokwd"), checkpoint=tok_dir)
  assert manifest["num_examples"] == 64 and manifest["flip"]
  return tok_dir, str(root / "tokwd" / "tokens")


def _overrides(tok_dir, tokens_dir, steps):
  """--config.* of the CLI run == the fields `_config` sets in-process."""
  return {"generator_data.tokens_dir": tokens_dir, "generator.hidden_size": MICRO["hidden_size"],
          "generator.depth": MICRO["depth"], "generator.num_heads": MICRO["num_heads"],
          "batch_size": 8, "num_train_steps": steps, "log_every_steps": 4,
          "checkpoint_every_steps": 4, "image_every_steps": steps, "num_grid_images": 0,
          "optim.warmup_steps": 0, "data.num_threads": 2}


def _config(tok_dir, tokens_dir, steps, **extra):
  config = config_file("demo_sit")
  config.generator_data.tokenizer = tok_dir
  for key, value in dict(_overrides(tok_dir, tokens_dir, steps), **extra).items():
    section, _, field = key.rpartition(".")
    (config[section] if section else config)[field] = value
  return config


def _saved_state(workdir, step):
  with ocp.StandardCheckpointer() as c:
    return c.restore(os.path.join(workdir, "checkpoints", str(step), "state"))


def _assert_same_tree(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb) and la
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# Data path (b): the demo images (32 px, the tokenizer's size), encoded inside the step.
_IMAGES = {"generator_data.source": "images", "data.demo_train_size": 64}


@pytest.mark.slow
@pytest.mark.parametrize("source", ["tokens", "images"])
def test_kill_9_then_rerun_equals_uninterrupted(tokens, tmp_path, source):
  """Both data paths through the CLI: `main --config=configs/demo_sit.py` killed with SIGKILL
  after its step-4 checkpoint, then the same command again, ends with the parameters, EMA,
  optimizer state and logged losses of an uninterrupted run (here in-process on the same 8 fake
  devices and flags: the same compiled program). (a) extracted tokens; (b) images encoded by the
  frozen tokenizer inside the step (the image pipeline's position is in the checkpoint)."""
  tok_dir, tokens_dir = tokens
  steps = 40
  extra = _IMAGES if source == "images" else {}
  ref_dir, dir_ = str(tmp_path / "ref"), tmp_path / "killed"
  ref = jax.device_get(train.train_and_evaluate(_config(tok_dir, tokens_dir, steps, **extra),
                                                ref_dir))
  assert int(ref.step) == steps
  cmd = [sys.executable, "-m", "softvq_jax.main", "--config=configs/demo_sit.py",
         f"--workdir={dir_}", f"--tokenizer={tok_dir}"] + [
             f"--config.{k}={v}" for k, v in dict(_overrides(tok_dir, tokens_dir, steps),
                                                  **extra).items()]
  proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True)
  start = time.time()
  while not (dir_ / "checkpoints" / "4").exists():
    assert proc.poll() is None, "the run ended before it could be killed: " + proc.stderr.read()[-3000:]
    assert time.time() - start < 300
    time.sleep(0.01)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  proc.stderr.close()
  killed_at = max(int(d) for d in os.listdir(dir_ / "checkpoints") if d.isdigit())
  assert killed_at < steps, "not interrupted"
  rerun = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert "resuming from step" in rerun.stderr
  assert "finished at step" in rerun.stderr and "--checkpoint=" in rerun.stderr
  saved = _saved_state(str(dir_), steps)
  assert sorted(saved) == ["ema_params", "opt_state", "params", "rng", "step"]
  _assert_same_tree(saved, _saved_state(ref_dir, steps))
  _assert_same_tree(saved["params"], ref.params)
  logged = lambda d: {json.loads(l)["step"]: {k: v for k, v in json.loads(l).items()  # noqa: E731
                                               if not k.startswith("perf/")}
                      for l in open(os.path.join(d, "metrics.jsonl"))}
  assert logged(str(dir_)) == logged(ref_dir)  # the losses, per time bucket too
  assert {"loss/total", "loss/t0.00-0.25", "frac/t0.75-1.00"} <= set(logged(ref_dir)[steps])
  # the exported EMA generator is what load_generator reads
  import softvq_jax  # pylint: disable=import-outside-toplevel
  gen = softvq_jax.load_generator(str(dir_ / "generator"))
  assert (gen.config.input_size, gen.config.in_channels, gen.config.hidden_size) == (8, 16, 32)
  np.testing.assert_array_equal(
      np.asarray(gen.model.final_layer.linear.kernel[...]),
      np.asarray(saved["ema_params"]["final_layer"]["linear"]["kernel"]["value"]))


class _CrashAfter:
  """The image pipeline, raising at its `n`-th batch (a crash between two checkpoints);
  checkpointable like the Grain iterator it wraps."""

  def __init__(self, it, n):
    self.it, self.n, self.i = it, n, 0

  def __iter__(self):
    return self

  def __next__(self):
    self.i += 1
    if self.i == self.n:
      raise RuntimeError("simulated crash")
    return next(self.it)

  def get_state(self):  # the same JSON the Grain iterator's checkpoint holds
    return json.dumps(self.it.get_state(), indent=4).encode()

  def set_state(self, state):
    self.it.set_state(json.loads(state))


def test_crash_then_rerun_equals_uninterrupted_online_encoding(tokens, tmp_path):
  """Data path (b), in-process (a second CLI test would double this file's cost): images of the
  demo pipeline (ADM centre crop + flip) encoded inside the step by the frozen tokenizer; a run
  that dies at step 7 and is rerun from its step-4 checkpoint (model, EMA, optimizer, step, RNG
  and the image pipeline's position) ends bitwise where an uninterrupted run ends."""
  tok_dir, tokens_dir = tokens
  steps = 8

  def config():
    c = _config(tok_dir, tokens_dir, steps)
    c.generator_data.source = "images"  # 32 px images: the tokenizer's size
    c.data.demo_train_size = 64
    return c

  ref = jax.device_get(train.train_and_evaluate(config(), str(tmp_path / "ref")))
  task = generator_task.GeneratorTask(config())
  assert task.batch_keys == ("image", "label")
  crashing = _CrashAfter(task.train_iterator(), 7)
  with pytest.raises(RuntimeError, match="simulated crash"):
    train.train_and_evaluate(config(), str(tmp_path / "crashed"), train_iter=crashing)
  assert os.listdir(tmp_path / "crashed" / "checkpoints") == ["4"]
  state = jax.device_get(train.train_and_evaluate(config(), str(tmp_path / "crashed")))
  assert int(state.step) == steps
  _assert_same_tree(state, ref)
  # load_generator of the workdir: the newest checkpoint's EMA weights, the fixed position table
  # recomputed from the config; the same network as the run's final export <workdir>/generator.
  import softvq_jax  # pylint: disable=import-outside-toplevel
  from_ckpt = softvq_jax.load_generator(str(tmp_path / "crashed"))
  exported = softvq_jax.load_generator(str(tmp_path / "crashed" / "generator"))
  shape = lambda c: (c.input_size, c.in_channels, c.hidden_size, c.depth, c.kind)  # noqa: E731
  assert shape(from_ckpt.config) == shape(exported.config)
  _assert_same_tree(nnx.state(from_ckpt.model), nnx.state(exported.model))
  _assert_same_tree(nnx.state(from_ckpt.model, nnx.Param), ref.ema_params)
  assert not np.array_equal(np.asarray(jax.tree.leaves(ref.params)[0]),
                            np.asarray(jax.tree.leaves(ref.ema_params)[0]))  # it trained


def _mesh_run(config, mesh, batches, gen_cfg):
  trainer = generator_task.build_generator_trainer(config, mesh, gen_cfg)
  state, frozen = trainer.init_state(), trainer.frozen()
  losses = []
  for b in batches:
    b = {k: jax.device_put(v, trainer.batch_sharding) for k, v in b.items()}
    state, m = trainer.p_step(state, frozen, b)
    losses.append(float(m["loss/total"]))
  return np.array(losses), jax.device_get(state), trainer


def test_fsdp_on_8_devices_matches_one_device(tokens):
  """(1, 8, 1): parameters, EMA and Adam moments split over 8 devices (pos_embed too); the same
  losses and parameters as one device within test_train's fp32 tolerances."""
  tok_dir, tokens_dir = tokens
  config = _config(tok_dir, tokens_dir, 3)
  config.optim.lr = 1e-3
  task = generator_task.GeneratorTask(config)
  rng = np.random.RandomState(0)
  batches = [{"latents": rng.normal(size=(8, 8, 16)).astype(np.float32),
              "label": rng.randint(0, 9, (8,)).astype(np.int32)} for _ in range(3)]
  with jax.default_matmul_precision("highest"):
    one = _mesh_run(config, sharding.create_mesh((1, 1, 1), jax.devices()[:1]), batches,
                    task.gen_cfg)
    fsdp = _mesh_run(config, sharding.create_mesh((1, 8, 1)), batches, task.gen_cfg)
  kernel = jax.tree.leaves(fsdp[2].state_sharding.params["blocks"][0]["mlp"]["fc1"]["kernel"])[0]
  assert "fsdp" in kernel.spec
  np.testing.assert_allclose(fsdp[0], one[0], rtol=1e-5, atol=1e-6)
  assert not np.allclose(one[0][0], one[0][-1])
  for tree in ("params", "ema_params"):
    for a, b in zip(jax.tree.leaves(getattr(fsdp[1], tree)), jax.tree.leaves(getattr(one[1], tree))):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=tree)


def test_demo_sit_loss_falls_and_grids_are_written(tokens, tmp_path):
  """configs/demo_sit.py as configured (width 128, 4 blocks, lr 1e-3, lognormal t) on the micro
  tokenizer's tokens of the demo crops, 40 steps: the windowed loss falls; the EMA sample grids
  of steps 0 and 40 are written."""
  tok_dir, tokens_dir = tokens
  config = config_file("demo_sit")
  config.generator_data.tokenizer, config.generator_data.tokens_dir = tok_dir, tokens_dir
  config.batch_size, config.num_train_steps, config.log_every_steps = 16, 40, 20
  config.optim.warmup_steps = 10
  config.checkpoint_every_steps = config.image_every_steps = 40
  config.num_grid_images, config.sample.steps = 8, 2
  train.train_and_evaluate(config, str(tmp_path))
  lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  losses = [l["loss/total"] for l in lines]
  assert [l["step"] for l in lines] == [20, 40]
  assert losses[-1] < 0.9 * losses[0], losses
  assert sorted(os.listdir(tmp_path / "images")) == ["samples_00000000.png",
                                                     "samples_00000040.png"]


def test_default_latent_statistics_are_refused(tmp_path):
  """A tokenizer whose vq_mean / vq_std are the defaults (0, 1: never measured) stops the run at
  start-up, naming the fix, unless allow_unnormalised_latents=True."""
  cfg = TokenizerConfig.from_config(tiny_config())
  assert (cfg.vq_mean, cfg.vq_std) == (0.0, 1.0)
  tok_dir = str(tmp_path / "tok")
  api.Tokenizer(cfg, build_tokenizer(cfg, seed=1)).save(tok_dir)
  config = _config(tok_dir, str(tmp_path / "none"), 4)
  config.generator_data.source = "images"
  with pytest.raises(generator_task.GeneratorTrainError, match="allow_unnormalised_latents"):
    generator_task.GeneratorTask(config)
  config.generator_data.allow_unnormalised_latents = True
  assert generator_task.GeneratorTask(config).batch_keys == ("image", "label")
  config.generator_data.source = "tokens"  # and no extraction there: named
  with pytest.raises(generator_task.GeneratorTrainError, match="tokens_dir"):
    generator_task.GeneratorTask(config)


def test_center_crop_flip_transform():
  """data.train_transform="center_crop_flip": each training image is the eval centre crop or its
  mirror image, the coin drawn per (seed, epoch, record)."""
  config = tiny_config()
  config.data.demo_train_size = config.data.demo_eval_size = 16
  config.data.train_transform = "center_crop_flip"
  config_lib.validate(config)
  it = data.build_train_pipeline(config.data, image_size=32, global_batch_size=16, seed=0)
  batch = next(it)
  source = data.make_source(config.data, config.data.train_split)
  flips = []
  for img, idx in zip(batch["image"], batch["index"]):
    crop = data.center_crop_arr(data.decode_image(source[int(idx)]["image"]), 32)
    flips.append(np.array_equal(img, crop[:, ::-1]))
    assert flips[-1] or np.array_equal(img, crop)
  assert 0 < sum(flips) < 16
  config.data.train_transform = "random_crop_flip"
  with pytest.raises(ValueError, match="config.data.train_transform"):
    config_lib.validate(config)


def test_generator_configs():
  """configs/{sit,dit}_xl_sq64_256.py:<tokenizer>[,<size>]: the tokenizer's token shape, the
  published recipe (spec.md §8.2 / 8.4), the released tokenizer's hub id; bad arguments named."""
  sit = config_file("sit_xl_sq64_256")
  config_lib.validate(sit)
  config_lib.validate_generator_training(sit)
  assert (sit.generator.kind, sit.generator.size, sit.generator_data.tokenizer) == (
      "sit", "XL", "SoftVQVAE/softvq-b-64")
  assert (sit.model.num_latent_tokens, sit.model.codebook_embed_dim, sit.image_size) == (64, 32, 256)
  o = sit.optim
  assert (o.lr, o.b2, o.weight_decay, o.grad_clip_norm, o.ema_decay, o.warmup_steps,
          o.min_lr_ratio, sit.batch_size) == (1e-4, 0.999, 0.0, 1.0, 0.9999, 0, 1.0, 256)
  assert sit.generator_objective.time_sampling == "lognormal"
  assert sit.generator.class_dropout_prob == 0.1
  small = config_file("sit_xl_sq64_256", "l-32-512,B")
  assert (small.generator.size, small.model.num_latent_tokens, small.image_size) == ("B", 32, 512)
  dit = config_file("dit_xl_sq64_256", "l-64")
  config_lib.validate_generator_training(dit)
  assert (dit.generator.kind, dit.optim.grad_clip_norm,
          dit.generator_objective.noise_schedule) == ("dit", 5.0, "cosine")
  with pytest.raises(ValueError, match="is not one of"):
    config_file("sit_xl_sq64_256", "q-64")
  sit.generator_data.source = "npz"
  with pytest.raises(ValueError, match="config.generator_data.source"):
    config_lib.validate_generator_training(sit)


def test_compile_mode_refuses_a_generator_config(tmp_path):
  """--mode=compile plans the tokenizer's step only: a generator config is a one-line user error
  (exit 2) instead of a plan of the wrong network."""
  proc = subprocess.run(
      [sys.executable, "-m", "softvq_jax.main", "--mode=compile", "--target=v5e-8",
       "--config=configs/demo_sit.py", f"--workdir={tmp_path}"],
      cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "a generator config" in proc.stderr and "not supported yet" in proc.stderr
