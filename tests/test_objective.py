"""The full objective in the train step: weight schedules, discriminator gating before
disc_start, the adaptive weight, and start-up errors for missing pretrained files."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from conftest import tiny_config
from softvq_jax import config_lib, objective, sharding, train


def test_generator_weight_schedules_follow_spec():
  lc = config_lib.loss_config()  # the released recipe
  for step, perc, adv in ((1, 1e-4, 0.0), (5000, 0.5, 0.0), (10000, 1.0, 0.0), (19999, 1.0, 0.0),
                          (20000, 1.0, 0.2), (250000, 1.0, 0.2)):
    w = objective.generator_weights(lc, jnp.int32(step))
    assert set(w) == {"reconstruction", "entropy", "perceptual", "repa", "adversarial"}
    np.testing.assert_allclose(float(w["perceptual"]), perc, rtol=1e-6)
    np.testing.assert_allclose(float(w["adversarial"]), adv, rtol=1e-6)
    assert float(w["reconstruction"]) == 1.0 and float(w["repa"]) == pytest.approx(0.1)
    assert float(w["entropy"]) == pytest.approx(0.01)
  lc.gan_weight = lc.repa_weight = 0.0
  assert set(objective.generator_weights(lc, 1)) == {"reconstruction", "entropy", "perceptual"}


def _batch(config, trainer, seed=0):
  s = config.image_size
  x = np.random.RandomState(seed).randint(0, 256, (config.batch_size, s, s, 3)).astype(np.uint8)
  return {"image": jax.device_put(x, trainer.batch_sharding)}


@pytest.fixture(scope="module")
def full_objective():
  """tiny_config's full objective (GAN from step 2) on 8 devices: (config, trainer), built and
  compiled once for the tests below (~60 CPU-s each time on 2 cores)."""
  config = tiny_config()
  assert config.loss.disc_start == 2
  return config, train.build_trainer(config, sharding.create_mesh((-1, 1, 1)))


def test_discriminator_is_untouched_before_disc_start_then_trains(full_objective):
  config, trainer = full_objective
  state, frozen = trainer.init_state(), trainer.frozen()
  init = jax.device_get((state.disc_params, state.disc_state, state.disc_opt_state, state.lecam))
  state, m = trainer.p_step(state, frozen, _batch(config, trainer, 0))  # step 1: before disc_start
  assert float(m["disc/active"]) == 0.0 and float(m["loss/adversarial_weighted"]) == 0.0
  now = jax.device_get((state.disc_params, state.disc_state, state.disc_opt_state, state.lecam))
  for a, b in zip(jax.tree.leaves(now), jax.tree.leaves(init)):
    np.testing.assert_array_equal(a, b)
  state, m = trainer.p_step(state, frozen, _batch(config, trainer, 1))  # step 2: the GAN starts
  assert float(m["disc/active"]) == 1.0
  np.testing.assert_allclose(float(m["loss/adversarial_weighted"]),
                             0.2 * float(m["loss/adversarial"]), rtol=1e-6)
  moved = jax.device_get(state.disc_params)
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(moved),
                                                      jax.tree.leaves(init[0])))
  assert float(jax.device_get(state.lecam["real"])) != 0.0
  for k in ("loss/perceptual", "loss/repa", "loss/adversarial", "disc/loss", "disc/lecam",
            "disc/consistency", "disc/grad_norm"):
    assert np.isfinite(float(m[k])), k


@pytest.mark.slow
def test_adaptive_weight_is_the_ratio_of_pixel_head_gradient_norms():
  config = tiny_config()
  config.loss.adaptive_weight = True
  config.loss.disc_start = 1
  trainer = train.build_trainer(config, sharding.create_mesh((1, 1, 1), jax.devices()[:1]))
  state, frozen = trainer.init_state(), trainer.frozen()
  batch = _batch(config, trainer)
  with jax.default_matmul_precision("highest"):
    _, m = jax.jit(trainer.step_fn)(state, frozen, batch)
    # The same quantity from first principles: both gradients w.r.t. the whole parameter tree.
    from softvq_jax import pixels  # pylint: disable=import-outside-toplevel
    images = pixels.to_model_range(batch["image"])
    key = jax.random.split(jax.random.fold_in(jax.random.wrap_key_data(state.rng), 0))[0]
    disc = (state.disc_params, state.disc_state)

    def part(params, names):
      terms, _, _ = objective.generator_terms(trainer.objective, trainer.graphdef,
                                              (params, state.proj_params), frozen, disc, images,
                                              key)
      w = objective.generator_weights(config.loss, 1, terms)
      return sum(w[k] * terms[k] if k != "adversarial" else terms[k] for k in names)

    g_rec = jax.grad(part)(state.params, ("reconstruction", "perceptual"))
    g_adv = jax.grad(part)(state.params, ("adversarial",))
  head = lambda g: g["decoder"]["to_pixel"]["kernel"][...]  # noqa: E731
  expected = optax.tree.norm(head(g_rec)) / (optax.tree.norm(head(g_adv)) + 1e-4)
  expected = float(jnp.clip(expected, 0.0, 1e4))
  np.testing.assert_allclose(float(m["loss/adaptive_weight"]), expected, rtol=1e-4)
  np.testing.assert_allclose(float(m["loss/adversarial_weighted"]),
                             0.2 * expected * float(m["loss/adversarial"]), rtol=1e-4)


def test_missing_pretrained_files_fail_at_start_naming_the_field(tmp_path):
  config = tiny_config()
  config.pretrained.allow_random_init = False
  trainer = train.build_trainer(config, sharding.create_mesh((-1, 1, 1)))  # compiles nothing
  with pytest.raises(ValueError, match=r"config\.pretrained\.lpips is empty"):
    trainer.frozen()
  config.pretrained.lpips = str(tmp_path / "nope.safetensors")
  with pytest.raises(FileNotFoundError, match=r"config\.pretrained\.lpips=.*does not exist"):
    train.build_trainer(config, sharding.create_mesh((-1, 1, 1))).frozen()
  # a zero weight removes the term and its network: nothing to load
  config.loss.perceptual_weight = config.loss.gan_weight = config.loss.repa_weight = 0.0
  trainer = train.build_trainer(config, sharding.create_mesh((-1, 1, 1)))
  state = trainer.init_state()
  assert trainer.frozen() is None and state.disc_params is None and state.proj_params is None


def test_frozen_networks_are_not_in_the_optimizer_and_get_no_update(full_objective):
  config, trainer = full_objective
  state, frozen = trainer.init_state(), trainer.frozen()
  frozen0 = jax.device_get(frozen)
  n_opt = sum(x.size for x in jax.tree.leaves(state.opt_state))
  n_trainable = sum(x.size for x in jax.tree.leaves((state.params, state.proj_params)))
  assert n_opt < 2 * n_trainable + 100  # Adam's two moments of the generator, nothing frozen
  state, _ = trainer.p_step(state, frozen, _batch(config, trainer))
  for a, b in zip(jax.tree.leaves(jax.device_get(frozen)), jax.tree.leaves(frozen0)):
    np.testing.assert_array_equal(a, b)
  assert set(frozen) == {"lpips", "dino", "teacher"}
  assert isinstance(frozen["lpips"], nnx.State)
