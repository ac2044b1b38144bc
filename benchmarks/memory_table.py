"""docs/memory_planning.md's table: the largest per-device batch that fits, per released model
size and hardware target, from the analytic cost model (softvq_jax/cost_model.py; no compilation).

  python benchmarks/memory_table.py                              # full objective, remat off
  python benchmarks/memory_table.py --remat --variants=bl-64-512,l-32-512
  python benchmarks/memory_table.py --pixel_only                 # pixel + entropy loss only
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from softvq_jax import compile_plan, config_lib, cost_model, train, variants  # noqa: E402
from softvq_jax.hardware import GiB, parse_target  # noqa: E402


def main(argv: list[str]) -> None:
  """python benchmarks/memory_table.py [--targets=...] [--remat] [--pixel_only]: the markdown
  table (analytic) of the largest per-device batch; the config's full objective by default.

  All targets must have the same number of devices (the state plan is built once per model).
  """
  parser = argparse.ArgumentParser(description=main.__doc__)
  parser.add_argument("--targets", default="v5e-8,v4-16,v6e-8,v5p-16,8xH100")
  parser.add_argument("--variants", default="",
                      help="comma-separated softvq_jax/variants.py names (default: every released "
                           "variant)")
  parser.add_argument("--remat", action="store_true")
  parser.add_argument("--pixel_only", action="store_true",
                      help="pixel + entropy loss only (perceptual, GAN and REPA weights 0)")
  args = parser.parse_args(argv)
  targets = [parse_target(t) for t in args.targets.split(",")]
  n = targets[0].num_devices
  if any(t.num_devices != n for t in targets):
    raise SystemExit("--targets must all have the same number of devices")
  chosen = ([variants.by_name(v) for v in args.variants.split(",")] if args.variants
            else [v for v in variants.VARIANTS if v.released])
  print("| model (config) | enc/dec | px | tokens x e | params | " + " | ".join(
      f"{t.name} ({t.usable_bytes / GiB:.0f} GiB)" for t in targets) + " |")
  print("|---|---|---|---|---|" + "---|" * len(targets))
  for v in chosen:
    config = config_lib.base_config(v)
    config.model.remat = args.remat
    if args.pixel_only:
      config.loss.perceptual_weight = config.loss.gan_weight = config.loss.repa_weight = 0.0
    config.batch_size = n  # 1 per device; the state does not depend on it
    mesh = compile_plan.make_mesh(config, targets[0], "analytic")
    trainer = train.build_trainer(compile_plan.for_platform(config, "tpu"), mesh)
    cells, params = [], 0
    for t in targets:
      r = compile_plan.base_report(config, t, mesh, 1, trainer,
                                   cost_model.analytic_estimate(config, t, trainer))
      params = r["model"]["params"]
      cells.append(str(cost_model.max_batch_per_device(r)))
    print(f"| {v.name} (`{v.config_file}.py:{v.config_arg}`) | {v.architecture} | "
          f"{v.image_size} | {v.num_latent_tokens} x {v.codebook_embed_dim} | "
          f"{params / 1e6:.0f}M | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
  main(sys.argv[1:])
