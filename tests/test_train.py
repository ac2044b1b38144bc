"""The sharded training system on 8 fake CPU devices: mesh equivalence, FSDP memory, schedule,
gradient accumulation, checkpoint restore onto another mesh, interrupted saves, NaN stop."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from softvq_jax import checkpoint, optim, sharding, train
from conftest import tiny_config

STEPS = 3


def _batches(config, n, seed=0):
  rng = np.random.RandomState(seed)
  s = config.image_size
  return [rng.randint(0, 256, (config.batch_size, s, s, 3)).astype(np.uint8) for _ in range(n)]


def _run(config, mesh, batches):
  """Losses of each step and the final state (gathered to host), on `mesh`."""
  trainer = train.build_trainer(config, mesh)
  state, frozen = trainer.init_state(), trainer.frozen()
  losses = []
  for b in batches:
    state, m = trainer.p_step(state, frozen, {"image": jax.device_put(b, trainer.batch_sharding)})
    losses.append(float(m["loss/total"]))
  return np.array(losses), jax.device_get(state)


def _objectives():
  """The full objective, and the pixel loss alone (entropy weight 0)."""
  full, pixel = tiny_config(), tiny_config()
  pixel.loss.entropy_weight = 0.0
  pixel.loss.perceptual_weight = pixel.loss.repa_weight = pixel.loss.gan_weight = 0.0
  return {"full": full, "pixel": pixel}


@pytest.fixture(scope="module")
def single_device_runs():
  mesh = sharding.create_mesh((1, 1, 1), devices=jax.devices()[:1])
  with jax.default_matmul_precision("highest"):
    return {k: _run(c, mesh, _batches(c, STEPS)) for k, c in _objectives().items()}


@pytest.mark.slow
@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (1, 8, 1), (2, 4, 1)])
def test_meshes_match_one_device(single_device_runs, mesh_shape):
  """Same losses and parameters as one device.

  The entropy term sharpens logits by 1/0.01 and Adam divides by sqrt(v), so with it on, fp32
  summation-order differences of sharded reductions move near-zero-gradient parameters (the
  encoder's latent tokens, behind LayerScale 1e-5) by up to ~20% of one update: the full
  objective is compared at half an update, the pixel objective at fp32 precision.
  """
  mesh = sharding.create_mesh(mesh_shape)
  for name, config in _objectives().items():
    ref_losses, ref_state = single_device_runs[name]
    with jax.default_matmul_precision("highest"):
      losses, state = _run(config, mesh, _batches(config, STEPS))
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, atol=1e-6)
    assert int(state.step) == STEPS
    assert not np.allclose(ref_losses[0], ref_losses[-1])  # the steps did train
    # Full objective: Adam moves a parameter by at most ~lr per step whatever its gradient, so
    # reduction-order noise in near-zero gradients (entropy 1/0.01 sharpening, the GAN's batch
    # norm) can flip single elements by up to one update; nearly all must agree far tighter.
    atol = 1.5 * config.optim.lr if name == "full" else 1e-6
    trees = ("params", "ema_params") + (
        ("proj_params", "disc_params", "disc_state", "lecam") if name == "full" else ())
    for tree in trees:
      for a, b in zip(jax.tree.leaves(getattr(state, tree)), jax.tree.leaves(getattr(ref_state, tree))):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=atol, err_msg=f"{name} {tree}")
        if name == "full" and np.size(a) > 100:
          close = np.abs(np.asarray(a) - np.asarray(b)) <= 0.1 * config.optim.lr + 1e-4 * np.abs(b)
          assert close.mean() > 0.95, f"{name} {tree}: only {close.mean():.4f} of elements agree"


@pytest.mark.slow
def test_fsdp_per_device_state_bytes_are_an_eighth():
  """Compiled memory analysis: the step's state arguments per device under (1,8,1) FSDP are at
  most 1/8 of the replicated (8,1,1) layout + 5% — frozen networks included when
  `frozen_sharding="fsdp"` (by default they are replicated: fast, and small next to the model)."""
  config = tiny_config()
  config.frozen_sharding = "fsdp"

  def state_bytes(mesh_shape):
    trainer = train.build_trainer(config, sharding.create_mesh(mesh_shape))
    compiled = trainer.p_step.lower(*trainer.abstract_args(config)).compile()
    batch = trainer.abstract_batch(config)["image"]
    batch_bytes = np.prod(batch.sharding.shard_shape(batch.shape)) * batch.dtype.itemsize
    analysed = compiled.memory_analysis().argument_size_in_bytes - batch_bytes
    planned = (sharding.per_device_bytes(trainer.abstract_state, trainer.state_sharding)
               + sharding.per_device_bytes(trainer.abstract_frozen, trainer.frozen_sharding))
    assert abs(analysed - planned) <= 0.01 * planned, (analysed, planned)
    return analysed

  replicated, fsdp = state_bytes((8, 1, 1)), state_bytes((1, 8, 1))
  assert fsdp <= replicated / 8 * 1.05, (fsdp, replicated)


def test_learning_rate_schedule_is_the_reference_formula():
  lr, total, warm = 4e-4, 1000, 100
  sched = optim.learning_rate_schedule(lr=lr, total_steps=total, warmup_steps=warm)
  assert float(sched(0)) == pytest.approx(1e-5)
  assert float(sched(50)) == pytest.approx(1e-5 + 50 * (lr - 1e-5) / warm)
  lo = 0.1 * lr
  for t in (100, 400, 999):
    assert float(sched(t)) == pytest.approx(lo + 0.5 * (lr - lo) * (1 + np.cos(np.pi * t / total)),
                                            rel=1e-6)
  # the cosine is measured from step 0: just after warm-up the rate is already below the peak
  assert float(sched(warm)) < lr
  config = tiny_config()
  config.batch_size, config.optim.lr_batch_scaling = 512, True
  assert optim.peak_lr(config.optim, config.batch_size) == pytest.approx(2 * config.optim.lr)


def test_weight_decay_skips_vectors():
  params = {"kernel": jnp.ones((3, 4)), "bias": jnp.ones((4,)), "scale": jnp.ones((4,)),
            "tokens": jnp.ones((1, 2, 4))}
  assert optim.decay_mask(params) == {"kernel": True, "bias": False, "scale": False,
                                      "tokens": True}


@pytest.mark.parametrize("perceptual", [
    False, pytest.param(True, marks=pytest.mark.slow)])  # LPIPS-VGG: ~200 more CPU-s to compile
def test_gradient_accumulation_matches_one_big_batch(perceptual):
  """Pixel + REPA terms, and the perceptual one in the slow tier (per-example means); the
  entropy term depends on the batch composition by design and the GAN refuses accumulation
  (batch-norm statistics per batch); LPIPS dropout draws other masks for other batch shapes, so it
  is off here."""
  config = tiny_config()
  config.loss.entropy_weight = 0.0
  config.loss.perceptual_dropout = 0.0
  config.loss.gan_weight = 0.0
  if not perceptual:
    config.loss.perceptual_weight = 0.0
  mesh = sharding.create_mesh((-1, 1, 1))
  batches = _batches(config, 2)
  with jax.default_matmul_precision("highest"):
    ref_losses, ref = _run(config, mesh, batches)
    config.grad_accum_steps = 4
    losses, got = _run(config, mesh, batches)
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  for a, b in zip(jax.tree.leaves((got.params, got.proj_params)),
                  jax.tree.leaves((ref.params, ref.proj_params))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-2 * config.optim.lr)


def _short_run_config(*, full_objective=False, **kw):
  """8 steps, checkpoints at 4 and 8. Pixel + entropy objective unless `full_objective` (the
  loop's checkpoint/NaN/data behaviour does not depend on the objective; the full objective's
  state is covered by the mesh, restore-onto-another-mesh and kill -9 tests)."""
  config = tiny_config()
  if not full_objective:
    config.loss.perceptual_weight = config.loss.repa_weight = config.loss.gan_weight = 0.0
  config.num_train_steps = 8
  config.checkpoint_every_steps = 4
  config.log_every_steps = 2
  config.image_every_steps = 8
  for k, v in kw.items():
    config[k] = v
  return config


@pytest.mark.slow
def test_restore_onto_a_different_mesh(tmp_path):
  config = _short_run_config(mesh_shape=(8, 1, 1), full_objective=True)
  state = jax.device_get(train.train_and_evaluate(config, str(tmp_path)))
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  assert ckpt.all_steps() == [4, 8]
  # 8 devices data-parallel -> 4 devices FSDP
  mesh = sharding.create_mesh((1, 4, 1), devices=jax.devices()[:4])
  trainer = train.build_trainer(config, mesh)
  restored = ckpt.restore(8, trainer.abstract_state)
  ckpt.close()
  leaf = restored.params["encoder"]["model"]["blocks"][0]["mlp"]["fc1"]["kernel"][...]
  assert leaf.sharding.mesh.devices.size == 4 and "fsdp" in leaf.sharding.spec
  for a, b in zip(jax.tree.leaves(jax.device_get(restored)), jax.tree.leaves(state)):
    np.testing.assert_array_equal(a, b)
  # and training continues there
  batch = jax.device_put(_batches(config, 1)[0], trainer.batch_sharding)
  restored, m = trainer.p_step(restored, trainer.frozen(), {"image": batch})
  assert int(restored.step) == 9 and np.isfinite(float(m["loss/total"]))


def test_interrupted_save_is_ignored(tmp_path):
  config = _short_run_config()
  train.train_and_evaluate(config, str(tmp_path))
  root = tmp_path / "checkpoints"
  # what a crash in the middle of an async save leaves behind: a temporary directory
  tmp = root / "100.orbax-checkpoint-tmp"
  (tmp / "state").mkdir(parents=True)
  (tmp / "state" / "partial").write_bytes(b"\0" * 100)
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  assert ckpt.latest_step() == 8
  ckpt.close()
  assert checkpoint.resolve_step_dir(str(tmp_path)).endswith(os.path.join("checkpoints", "8"))
  config.num_train_steps = 12
  state = train.train_and_evaluate(config, str(tmp_path))
  assert int(state.step) == 12
  assert not tmp.exists()  # deleted by the resumed run (Orbax cleans up before its first save)
  lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [l["step"] for l in lines] == [2, 4, 6, 8, 10, 12]  # resumed at 8, not from scratch


class _FloatBatches:
  """A checkpointable iterator of float batches with a NaN image at one step (1-based)."""

  def __init__(self, config, nan_step):
    self.config, self.nan_step, self.i = config, nan_step, 0

  def __iter__(self):
    return self

  def __next__(self):
    self.i += 1
    x = _batches(self.config, 1, seed=self.i)[0].astype(np.float32) / 127.5 - 1.0
    if self.i == self.nan_step:
      x[0, 0, 0, 0] = np.nan
    return {"image": x}

  def get_state(self):
    return json.dumps({"i": self.i}).encode()

  def set_state(self, state):
    self.i = json.loads(state)["i"]


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  config = _short_run_config()
  config.data.output_dtype = "float32"
  with pytest.raises(FloatingPointError, match=r"non-finite .* at step 7.*last good checkpoint is "
                                               r"step 4"):
    train.train_and_evaluate(config, str(tmp_path), train_iter=_FloatBatches(config, 7))
  assert checkpoint.Checkpointer(str(tmp_path)).all_steps() == [4]
  with ocp.StandardCheckpointer() as c:
    saved = c.restore(tmp_path / "checkpoints" / "4" / "state")
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(saved["params"]))


def test_bad_files_are_skipped_and_reported_in_the_training_log(tmp_path, caplog):
  from PIL import Image  # pylint: disable=import-outside-toplevel
  root = tmp_path / "images" / "class0"
  root.mkdir(parents=True)
  rng = np.random.RandomState(0)
  for i in range(15):
    Image.fromarray(rng.randint(0, 256, (40, 48, 3)).astype(np.uint8)).save(root / f"{i}.jpg")
  (root / "broken.jpg").write_bytes(b"not a jpeg at all")
  config = _short_run_config(num_train_steps=4, checkpoint_every_steps=4, image_every_steps=4)
  config.data.source, config.data.path = "folder", str(tmp_path / "images")
  config.data.eval_split = "train"  # the grid images come from the same folder
  workdir = tmp_path / "run"
  with caplog.at_level("WARNING"):
    train.train_and_evaluate(config, str(workdir))
  assert "skipped 1 bad image files" in caplog.text and "broken.jpg" in caplog.text
  last = json.loads((workdir / "metrics.jsonl").read_text().splitlines()[-1])
  assert last["data/skipped"] == 2  # 4 steps x 8 images = 2 epochs of the 16 files
