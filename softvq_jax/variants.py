"""The SoftVQ variants: one table that the configs, the README's model table and the tests read.

The released hub checkpoints (`SoftVQVAE/<hub_name>`) are not what their names suggest (their
`config.json` files and `model.safetensors` sizes are the authority, spec.md §2):
- every 32-token model has token dim e = 64, every 64-token model e = 32;
- both "L-32" models (256 and 512 px) are a **B encoder with an L decoder** — architecturally
  the same network as BL-32; only L-64 is L/L.
A config that builds "SoftVQ-L-32" therefore builds B/L with e = 64, so that a model trained here
is the network it is compared with. A true L/L 32-token network is not released; it has its own
explicit name (`ll-32`, config argument `:LL`) and never a released name.

`num_params` counts the parameters as released: without the decoder's unused `patch_embed` (the
current official code builds one, the released files lack it) and without the
`quantize.codebook_used` buffer; it equals `count_params` of our tokenizer exactly.
`vq_mean` / `vq_std` are the latent statistics stored in the released config.json where we know
them; the configs use them as defaults (a freshly trained checkpoint is then never silently
unnormalised), and `--mode=stats` replaces them with the measured ones. None = not known here
(the configs keep 0 / 1 and `--mode=stats` must be run).

To correct a variant, edit its row: configs, README and tests follow.
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Variant:
  name: str                  # hub name without the "SoftVQVAE/softvq-" prefix, e.g. "l-32"
  config_file: str           # configs/<config_file>.py
  config_arg: str            # --config=configs/<config_file>.py:<config_arg>
  encoder_size: str          # ViT size (models/vit.py VIT_SIZES key)
  decoder_size: str
  num_latent_tokens: int     # N
  codebook_embed_dim: int    # e
  image_size: int            # S
  num_params: int            # as released (see the module docstring)
  released: bool = True
  vq_mean: float | None = None
  vq_std: float | None = None
  rfid: float | None = None  # published rFID, ImageNet val 50k
  note: str = ""

  @property
  def hub_id(self) -> str | None:
    return f"SoftVQVAE/softvq-{self.name}" if self.released else None

  @property
  def architecture(self) -> str:
    return f"{self.encoder_size}/{self.decoder_size}"


# Shared by all of them (spec.md §2): 4 codebooks x 8192 codes, tau 0.07, l2-normalised, patch 16.
NUM_CODEBOOKS = 4
CODEBOOK_SIZE = 8192

VARIANTS: tuple[Variant, ...] = (
    Variant("b-32", "sq32_256", "B", "B", "B", 32, 64, 256, 173_997_120, rfid=0.89),
    Variant("b-64", "sq64_256", "B", "B", "B", 64, 32, 256, 172_973_088,
            vq_mean=-0.003192751, vq_std=0.07235257, rfid=0.88),
    Variant("bl-32", "sq32_256", "BL", "B", "L", 32, 64, 256, 391_571_008, rfid=0.68),
    Variant("bl-64", "sq64_256", "BL", "B", "L", 64, 32, 256, 390_546_976,
            vq_mean=-0.00077168207, vq_std=0.07157949, rfid=0.65),
    Variant("l-32", "sq32_256", "L", "B", "L", 32, 64, 256, 391_571_008,
            vq_mean=0.00060894643, vq_std=0.029030401, rfid=0.74,
            note="released as B encoder + L decoder (same network as BL-32)"),
    Variant("l-64", "sq64_256", "L", "L", "L", 64, 32, 256, 608_136_992,
            vq_mean=0.0009714666, vq_std=0.07259091, rfid=0.61),
    Variant("bl-64-512", "sq64_512", "BL", "B", "L", 64, 32, 512, 391_923_232, rfid=0.71),
    Variant("l-32-512", "sq32_512", "L", "B", "L", 32, 64, 512, 392_947_264, rfid=0.64,
            note="released as B encoder + L decoder"),
    # Not released: the L/L 32-token network the name "L-32" suggests, under its own name.
    Variant("ll-32", "sq32_256", "LL", "L", "L", 32, 64, 256, 609_152_832, released=False,
            note="not released: a true L/L 32-token network"),
    Variant("ll-32-512", "sq32_512", "LL", "L", "L", 32, 64, 512, 610_725_696, released=False,
            note="not released: a true L/L 32-token network"),
)


def find(config_file: str, config_arg: str) -> Variant:
  """The variant that `--config=configs/<config_file>.py:<config_arg>` builds."""
  for v in VARIANTS:
    if (v.config_file, v.config_arg) == (config_file, config_arg):
      return v
  args = [v.config_arg for v in VARIANTS if v.config_file == config_file]
  raise ValueError(f"configs/{config_file}.py:{config_arg} is not a SoftVQ variant; "
                   f"use one of {', '.join(f'configs/{config_file}.py:{a}' for a in args)}")


def by_name(name: str) -> Variant:
  for v in VARIANTS:
    if v.name == name:
      return v
  raise KeyError(f"no SoftVQ variant named {name!r}; known: {[v.name for v in VARIANTS]}")


def markdown_table() -> str:
  """The README's model table (tests/test_variants.py checks that README.md contains it)."""
  rows = ["| config | model (hub `SoftVQVAE/...`) | encoder / decoder | tokens x dim | image "
          "| parameters (as released) | default vq_mean / vq_std | rFID |",
          "|---|---|---|---|---|---|---|---|"]
  for v in VARIANTS:
    model = f"`softvq-{v.name}`" if v.released else f"{v.name} (not released)"
    if v.note and v.released:
      model += f": {v.note}"
    stats = "0 / 1 (run `--mode=stats`)" if v.vq_mean is None else f"{v.vq_mean:g} / {v.vq_std:g}"
    rfid = "" if v.rfid is None else f"{v.rfid:g}"
    rows.append(f"| `configs/{v.config_file}.py:{v.config_arg}` | {model} | "
                f"{v.architecture} | {v.num_latent_tokens} x {v.codebook_embed_dim} | "
                f"{v.image_size} | {v.num_params:,} | {stats} | {rfid} |")
  return "\n".join(rows) + "\n"
