"""Import/export of the released SiT / DiT generators: `config.json` + `model.safetensors`.

The hub repos (`SoftVQVAE/sit-xl_softvq-b-64`, `SoftVQVAE/dit-xl_softvq-l-64`, ...) are written by
huggingface_hub's PyTorchModelHubMixin from the official `SiT` / `DiT` constructors (spec.md §8.1,
8.4): a flat JSON of the constructor's arguments (defaults included) and the state dict. Same rules
as the tokenizer importer (convert/official.py, whose file names, safetensors IO and strict
state-dict matching this module reuses): every architecture field is read from config.json, a
field we cannot honour is refused by name, fields that change nothing (tags, repo_url, license,
use_cfg, path_type, the attention-kernel switches) are ignored, and the weights load strictly (a
missing, unexpected or mis-shaped key fails, listing the keys).

Which of the two a file is: the official SiT constructor has `path_type` (an unused default, always
written) and no `learn_sigma`; DiT has `learn_sigma` and no `path_type`.

`pos_embed` (a fixed sin-cos table, stored in the files) is loaded as it is, after checking that it
is the table the config describes (a file whose config and weights disagree fails here, instead
of generating garbage).
"""
from __future__ import annotations

import json
import numbers

import numpy as np
from flax import nnx

from softvq_jax import paths
from softvq_jax.convert.official import CONFIG_NAME, WEIGHTS_NAME, is_official_dir
from softvq_jax.convert.safetensors_io import CheckpointError, read_safetensors, write_safetensors
from softvq_jax.convert.state_dict import match_state_dict, to_ours, to_torch, torch_key
from softvq_jax.models import sit as sit_lib

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "is_official_dir", "config_from_official",
           "config_to_official", "read_generator_config", "load_generator_weights",
           "load_generator_state_dict", "export_generator", "generator_state_dict"]

# Official constructor defaults of the fields a config.json may leave out.
_DEFAULTS = {"mlp_ratio": 4.0, "class_dropout_prob": 0.1, "num_classes": 1000}
_SIT_ONLY_DEFAULTS = {"path_type": "edm", "decoder_hidden_size": 768}
_TAGS = ["arxiv:2412.10958", "image-generation", "32 tokens"]
_REPO_URL = "https://github.com/Hhhhhhao/continuous_tokenizer"
# pos_embed in a file vs the formula: the reference computes it in float32 (1-D, torch) or float64
# (2-D, NumPy); any real disagreement (another length, width or layout) is O(1).
_POS_EMBED_ATOL = 1e-4


def _kind(cfg: dict, source: str) -> str:
  has_path, has_sigma = "path_type" in cfg, "learn_sigma" in cfg
  if has_path and not has_sigma:
    return "sit"
  if has_sigma and not has_path:
    return "dit"
  raise CheckpointError(
      f"{source}: cannot tell a SiT from a DiT config (a SiT config.json has `path_type` and no "
      f"`learn_sigma`, a DiT one the reverse; this one has "
      f"{'both' if has_path else 'neither'}); is this a generator's config.json?")


def config_from_official(cfg: dict, *, source: str = CONFIG_NAME) -> sit_lib.SiTConfig:
  """Official SiT/DiT constructor arguments (config.json) -> SiTConfig; unsupported values fail
  naming the field."""
  kind = _kind(cfg, source)
  required = ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads",
              "vae_1d")
  missing = [f for f in required if f not in cfg]
  if missing:
    raise CheckpointError(f"{source}: missing field(s) {missing}; is this a {kind.upper()} "
                          "config.json written by save_pretrained?")

  def get(field, default=None, types=numbers.Integral):
    value = cfg.get(field, default)
    if isinstance(value, bool) and types is not bool or not isinstance(value, types):
      raise CheckpointError(f"{source}: {field}={value!r} has the wrong type "
                            f"(expected {getattr(types, '__name__', types)})")
    return value

  vae_1d = get("vae_1d", types=bool)
  hidden = get("hidden_size")
  if kind == "sit":
    if get("qk_norm", False, bool):
      raise CheckpointError(f"{source}: qk_norm=true is not supported by softvq_jax (the released "
                            "generators have qk_norm=false)")
    dec_hidden = get("decoder_hidden_size", _SIT_ONLY_DEFAULTS["decoder_hidden_size"])
    if dec_hidden != hidden:
      raise CheckpointError(f"{source}: decoder_hidden_size={dec_hidden} != hidden_size={hidden} "
                            "is not supported (the official final layer would not fit either)")
    learn_sigma = False
  else:
    learn_sigma = get("learn_sigma", types=bool)
  dropout = float(get("class_dropout_prob", _DEFAULTS["class_dropout_prob"], numbers.Real))
  if not 0.0 <= dropout < 1.0:
    raise CheckpointError(f"{source}: class_dropout_prob={dropout} must be in [0, 1)")
  try:
    return sit_lib.SiTConfig(
        input_size=get("input_size"), in_channels=get("in_channels"),
        # The official 1-D form forces patch size 1 whatever the field says.
        patch_size=1 if vae_1d else get("patch_size"), vae_1d=vae_1d, hidden_size=hidden,
        depth=get("depth"), num_heads=get("num_heads"),
        mlp_ratio=float(get("mlp_ratio", _DEFAULTS["mlp_ratio"], numbers.Real)),
        num_classes=get("num_classes", _DEFAULTS["num_classes"]), class_dropout_prob=dropout,
        learn_sigma=learn_sigma, kind=kind)
  except ValueError as e:
    raise CheckpointError(f"{source}: {e}") from None


def config_to_official(cfg: sit_lib.SiTConfig) -> dict:
  """SiTConfig -> the config.json the official constructor's save_pretrained writes."""
  out = dict(input_size=cfg.input_size, patch_size=cfg.patch_size, in_channels=cfg.in_channels,
             hidden_size=cfg.hidden_size, depth=cfg.depth, num_heads=cfg.num_heads,
             mlp_ratio=cfg.mlp_ratio, class_dropout_prob=cfg.class_dropout_prob,
             num_classes=cfg.num_classes, vae_1d=cfg.vae_1d, repo_url=_REPO_URL,
             license="apache-2.0")
  if cfg.kind == "sit":
    if cfg.learn_sigma:
      raise CheckpointError("a SiT with learn_sigma=True has no official format (the official SiT "
                            "predicts in_channels outputs); use kind='dit'")
    # What the official training script passes (block kwargs included: the official SiTBlock
    # requires `qk_norm`, and from_pretrained feeds every field back into the constructor).
    out.update(path_type=_SIT_ONLY_DEFAULTS["path_type"], decoder_hidden_size=cfg.hidden_size,
               use_cfg=cfg.class_dropout_prob > 0, qk_norm=False, fused_attn=False,
               flash_attn=False, tags=_TAGS + ["SiT"])
  else:
    out.update(learn_sigma=cfg.learn_sigma, tags=_TAGS + ["DiT"])
  return dict(sorted(out.items()))


def read_generator_config(directory) -> sit_lib.SiTConfig:
  path = paths.resolve(directory) / CONFIG_NAME
  try:
    raw = json.loads(path.read_text())
  except (OSError, json.JSONDecodeError) as e:
    raise CheckpointError(f"{path}: cannot read the config ({e})") from None
  if not isinstance(raw, dict):
    raise CheckpointError(f"{path}: expected a JSON object")
  return config_from_official(raw, source=str(path))


def _key(path: tuple, shape: tuple) -> tuple[str, str]:
  key, kind = torch_key(path)
  if kind == "linear" and len(shape) == 4:  # x_embedder.proj: a Conv2d weight [D, C, p, p]
    kind = "conv"
  return key, kind


def _variables(model: sit_lib.SiT) -> list[tuple[tuple, nnx.Variable]]:
  """Every stored array of the network: parameters and the fixed pos_embed."""
  return list(nnx.to_flat_state(nnx.state(model, (nnx.Param, sit_lib.FixedPosEmbed))))


def _expected_pos_embed(cfg: sit_lib.SiTConfig) -> np.ndarray:
  if cfg.vae_1d:
    return sit_lib.sincos_1d_interleaved(cfg.input_size, cfg.hidden_size)[None]
  return sit_lib.sincos_2d(cfg.grid, cfg.hidden_size)[None]


def load_generator_state_dict(model: sit_lib.SiT, state_dict, *, source: str) -> None:
  """Loads an official SiT/DiT state dict into `model` in place, strictly (nothing is written
  when anything is wrong)."""
  flat = _variables(model)
  expected = {}
  for path, var in flat:
    key, kind = _key(path, tuple(var.shape))
    expected[key] = (path, kind, tuple(var.shape))
  updates, problems = match_state_dict(
      expected, state_dict,
      convert=to_ours, unconvert=to_torch)
  if problems:
    raise CheckpointError(
        f"{source} does not match the model: " + "; ".join(problems) + ". Check that the "
        "checkpoint and its config.json describe the same generator (size, tokens, channels, "
        "patch size, learn_sigma, class_dropout_prob).")
  for path, arr in updates:
    if path == ("pos_embed",):
      want = _expected_pos_embed(model.cfg)
      err = float(np.max(np.abs(arr - want)))
      if err > _POS_EMBED_ATOL:
        raise CheckpointError(
            f"{source}: pos_embed is not the fixed sin-cos embedding of this config (max abs "
            f"difference {err:.3g}); the weights and config.json describe different models")
  by_path = dict(flat)
  nnx.update(model, nnx.from_flat_state([(p, by_path[p].replace(v)) for p, v in updates]))


def load_generator_weights(model: sit_lib.SiT, directory) -> None:
  """Strictly loads `model.safetensors` of an official-format directory (local or URL)."""
  path = paths.resolve(directory) / WEIGHTS_NAME
  load_generator_state_dict(model, read_safetensors(path), source=str(path))


def generator_state_dict(model: sit_lib.SiT) -> dict[str, np.ndarray]:
  """{official key: float32 array in PyTorch layout} (inverse of load_generator_state_dict)."""
  out = {}
  for path, var in _variables(model):
    key, kind = _key(path, tuple(var.shape))
    out[key] = np.ascontiguousarray(to_torch(np.asarray(var[...], np.float32), kind))
  return out


def export_generator(model: sit_lib.SiT, directory) -> None:
  """Writes `config.json` + `model.safetensors` (local folder or URL) that the official
  `SiT.from_pretrained` / `DiT.from_pretrained` load, strict=True included. Weights first: a
  directory with a config.json is one whose weights are complete."""
  config = config_to_official(model.cfg)  # fails before anything is written
  directory = paths.resolve(directory)
  directory.mkdir(parents=True, exist_ok=True)
  write_safetensors(directory / WEIGHTS_NAME, generator_state_dict(model),
                    metadata={"format": "pt"})
  paths.write_json(directory / CONFIG_NAME, config)
