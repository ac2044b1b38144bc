"""Every config file builds and validates; bad values fail naming the field."""
import glob
import importlib.util
import os

import pytest

from softvq_jax import config_lib

ROOT = os.path.join(os.path.dirname(__file__), "..")


def _load(path):
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "*.py"))))
def test_config_files_validate(path):
  config_lib.validate(_load(path).get_config())


@pytest.mark.parametrize("field,value", [
    ("image_size", 250), ("model.encoder_size", "XL"), ("model.num_codebooks", 3),
    ("model.tau", 0.0), ("model.compute_dtype", "int8"), ("model.attention_backend", "flash"),
    ("model.vq_std", 0.0), ("data.source", "s3"), ("batch_size", 0), ("mesh_shape", (1, 1)),
    ("grad_accum_steps", 3), ("optim.name", "sgd"), ("optim.lr", 0.0), ("optim.b2", 1.0),
    ("optim.weight_decay", -1.0), ("optim.warmup_steps", 10**9), ("optim.min_lr_ratio", 2.0),
    ("optim.ema_decay", 1.0), ("loss.reconstruction", "l3"), ("num_train_steps", 0),
    ("log_every_steps", 0), ("checkpoint_every_steps", -1), ("keep_every_steps", -5),
])
def test_bad_values_name_the_field(field, value):
  config = _load(os.path.join(ROOT, "configs", "sq64_256.py")).get_config("B")
  *parents, leaf = field.split(".")
  node = config
  for p in parents:
    node = node[p]
  node[leaf] = value
  with pytest.raises(ValueError, match=f"config.{field}"):
    config_lib.validate(config)
