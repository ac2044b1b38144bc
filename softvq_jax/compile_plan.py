"""Memory planning: compile the train step ahead of time for a target topology, hardware-free.

`python -m softvq_jax.main --mode=compile --config=configs/sq64_256.py:L --workdir=DIR
--target=v5e-64` answers "does this config fit there, and how fast can it be?" before a pod is
rented. It writes `<workdir>/compile_<target>.json`, prints a table, and exits non-zero (naming
what to change) when the step does not fit the device's memory.

What is compiled is exactly what training runs: `train.build_trainer(config, mesh).p_step`
lowered with the trainer's abstract (sharded) state and batch, so every term the trainer's
objective grows (GAN, LPIPS, REPA) is counted without this module knowing about it.

Three ways to get the numbers, best first (the report's `method` says which one was used):

* `tpu-aot`: TPU slices (v4, v5e, v5p, v6e) are compiled by the real TPU compiler on this (CPU)
  machine: `jax.experimental.topologies.get_topology_desc` with `libtpu` describes the slice's
  devices; the mesh is built on them; XLA:TPU compiles and reports per-device memory (and itself
  rejects a program larger than HBM). Needs `pip install libtpu` (the version that `jax[tpu]`
  pins for the installed jax) or `TPU_LIBRARY_PATH=/path/to/libtpu.so`; no TPU is touched.
* `attached`: the local devices are the target kind and count (e.g. `--target=8xH100` on an
  8-GPU node): compiled for them.
* `cpu-aot`: GPU targets elsewhere (jaxlib cannot compile CUDA without a GPU) and the fallback
  of everything: compiled on N fake CPU devices (`--xla_force_host_platform_device_count`, set by
  `ensure_cpu_devices`, which re-executes the command when JAX already started with fewer). The
  sharding, the per-device state and the FLOPs are the target's; XLA:CPU's buffer assignment is
  not the GPU's, so temporaries are indicative only, and attention is the einsum form
  (the GPU would run cuDNN flash attention, which saves less: see `analytic_estimate`).

Every report also carries the analytic estimate (softvq_jax/cost_model.py): per-device state
bytes exact from the sharding plan, activations and FLOPs from the ViT shapes. It is what
`--target` falls back to when nothing can be compiled (`method: analytic`), and what
docs/memory_planning.md's table (benchmarks/memory_table.py) uses for cells that were not
compiled. Targets (`v5e-64`, `8xH100`, ...) and their chips are softvq_jax/hardware.py.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
import time
from typing import Any

from softvq_jax import cost_model, paths
from softvq_jax.hardware import GiB, Target, parse_target  # noqa: F401  (parse_target: callers)


# ------------------------------------------------------------------------------------------------
# Devices to compile for.
# ------------------------------------------------------------------------------------------------

def tpu_devices(target: Target):
  """Compile-only devices of a TPU slice from libtpu's topology description (no TPU needed).

  Raises RuntimeError saying what is missing when libtpu cannot be loaded.
  """
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  # libtpu takes a machine-wide lock (/tmp/libtpu_lockfile) against two processes driving one
  # TPU; compiling touches no TPU, so two plans (or a plan beside training) may run at once.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  chips_per_host = (2, 4, 1) if target.devices_per_host == 8 else (
      (2, 2, 1) if target.num_devices >= 4 else (1, 1, 1))
  try:
    desc = topologies.get_topology_desc(target.topology, "tpu", chip_config_name=target.chip_config,
                                        chips_per_host_bounds=chips_per_host, num_slices=1)
  except Exception as e:  # pylint: disable=broad-except  # no libtpu / incompatible libtpu
    raise RuntimeError(
        f"cannot describe TPU topology {target.topology} ({type(e).__name__}: {e}). Install the "
        "libtpu that jax[tpu] pins for this jax (`pip install 'jax[tpu]==<jax version>'`, or "
        "`pip install libtpu==<pinned>`), or point TPU_LIBRARY_PATH at a libtpu.so") from e
  devices = list(desc.devices)
  if len(devices) != target.num_devices:
    raise RuntimeError(f"libtpu described {len(devices)} devices for {target.topology}, expected "
                       f"{target.num_devices}")
  return devices


def ensure_cpu_devices(n: int, *, reexec: bool = True) -> None:
  """Makes `n` CPU devices available to this process (fake ones, for compiling only).

  XLA fixes the CPU device count when the backend starts, so: before that, set it; after it (with
  fewer devices), re-execute the same command with `--xla_force_host_platform_device_count=n`
  (reexec=True, the CLI) or raise naming the variable to set (reexec=False, library callers).
  """
  import jax  # pylint: disable=import-outside-toplevel
  from jax._src import xla_bridge  # pylint: disable=import-outside-toplevel
  if not xla_bridge.backends_are_initialized():
    jax.config.update("jax_num_cpu_devices", max(n, 1))
    if len(jax.devices("cpu")) >= n:
      return
  elif len(jax.devices("cpu")) >= n:
    return
  flag = f"--xla_force_host_platform_device_count={n}"
  if reexec and os.environ.get("_SOFTVQ_COMPILE_REEXEC") != "1":
    env = dict(os.environ, _SOFTVQ_COMPILE_REEXEC="1")
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
    env["XLA_FLAGS"] = f"{flags} {flag}".strip()
    print(f"compile_plan: restarting with XLA_FLAGS={env['XLA_FLAGS']!r} for {n} CPU devices",
          file=sys.stderr, flush=True)
    os.execve(sys.executable, [sys.executable] + _original_argv(), env)
  raise RuntimeError(f"{n} CPU devices are needed, this process has {len(jax.devices('cpu'))}: "
                     f"run with XLA_FLAGS={flag} (set before jax is imported)")


def _original_argv() -> list[str]:
  """`python -m softvq_jax.main ...` or `python path/script.py ...` as this process was started."""
  orig = getattr(sys, "orig_argv", None)
  if orig and len(orig) > 1:
    return list(orig[1:])
  return list(sys.argv)


# ------------------------------------------------------------------------------------------------
# Compilation.
# ------------------------------------------------------------------------------------------------

def _memory(compiled, platform: str) -> dict[str, int]:
  mem = compiled.memory_analysis()
  if isinstance(mem, (list, tuple)):
    mem = mem[0]
  g = lambda k: int(getattr(mem, k, 0) or 0)  # noqa: E731
  out = {"argument_bytes": g("argument_size_in_bytes"), "output_bytes": g("output_size_in_bytes"),
         "alias_bytes": g("alias_size_in_bytes"), "temp_bytes": g("temp_size_in_bytes"),
         "generated_code_bytes": g("generated_code_size_in_bytes")}
  # Live at the peak: inputs + outputs not written in place of a (donated) input + temporaries;
  # on accelerators the program itself sits in device memory too.
  total = out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"] + out["temp_bytes"]
  if platform != "cpu":
    total += out["generated_code_bytes"]
  peak = g("peak_memory_in_bytes")
  if peak:
    out["peak_bytes"] = peak
  out["total_bytes"] = total
  return out


def _flops(compiled) -> float | None:
  try:
    cost = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except  # backend-dependent
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  return float(cost.get("flops", 0.0)) if cost else None


def _out_of_memory(e: Exception) -> bool:
  msg = str(e)
  return "RESOURCE_EXHAUSTED" in msg or "Ran out of memory" in msg


def choose_method(target: Target) -> str:
  """tpu-aot for TPU slices when libtpu is usable, attached for matching local devices, else
  cpu-aot (see the module docstring)."""
  import jax  # pylint: disable=import-outside-toplevel
  if target.platform == "tpu":
    return "tpu-aot"
  try:
    local = jax.devices(target.platform) if target.platform != "cpu" else []
  except RuntimeError:
    local = []
  kind = local[0].device_kind.upper() if local else ""
  if len(local) == target.num_devices and target.kind.upper() in kind:
    return "attached"
  return "cpu-aot"


def make_mesh(config, target: Target, method: str):
  """The config's (data, fsdp, tensor) mesh over the target's devices (abstract for analytic)."""
  import jax  # pylint: disable=import-outside-toplevel
  from softvq_jax import sharding  # pylint: disable=import-outside-toplevel
  shape = sharding.resolve_mesh_shape(config.mesh_shape, target.num_devices)
  if method == "analytic":
    return jax.sharding.AbstractMesh(shape, sharding.MESH_AXES)
  if method == "tpu-aot":
    devices = tpu_devices(target)
  elif method == "attached":
    devices = jax.devices(target.platform)
  else:
    devices = jax.devices("cpu")[:target.num_devices]
    if len(devices) < target.num_devices:
      raise RuntimeError(f"{target.num_devices} CPU devices needed for {target.name}, found "
                         f"{len(devices)}: call ensure_cpu_devices({target.num_devices}) first")
  return sharding.create_mesh(shape, devices=devices)


def plan(config, target: Target | str, *, method: str | None = None) -> dict[str, Any]:
  """Compiles (or estimates) `config`'s train step on `target`; returns the report (a dict).

  method: None = `choose_method(target)`, falling back to "cpu-aot" (then "analytic") with the
  reason recorded in `fallback_reason` when the preferred one cannot run here. "analytic"
  skips compilation.
  """
  import jax  # pylint: disable=import-outside-toplevel
  from softvq_jax import config_lib, train  # pylint: disable=import-outside-toplevel
  config_lib.validate(config)
  target = parse_target(target) if isinstance(target, str) else target
  method = method or choose_method(target)
  notes = []
  t0 = time.time()
  try:
    mesh = make_mesh(config, target, method)
  except RuntimeError as e:
    if method == "analytic":
      raise
    notes.append(f"{method} unavailable: {e}")
    method = "cpu-aot" if method == "tpu-aot" and len(jax.devices("cpu")) >= target.num_devices \
        else "analytic"
    mesh = make_mesh(config, target, method)
  per_dev = cost_model.per_device_batch(config, mesh)
  config = for_platform(config, target.platform if method != "cpu-aot" else "cpu")
  trainer = train.build_trainer(config, mesh)
  analytic = cost_model.analytic_estimate(config, target, trainer)
  report = base_report(config, target, mesh, per_dev, trainer, analytic)
  report["method"] = method
  if notes:
    report["fallback_reason"] = "; ".join(notes)
  if method != "analytic":
    t1 = time.time()
    lowered = trainer.p_step.lower(*trainer.abstract_args(config))
    try:
      compiled = lowered.compile()
    except Exception as e:  # pylint: disable=broad-except
      if not _out_of_memory(e):
        raise
      report["compiled"] = None
      report["compile_error"] = str(e)[:4000]
      report["fits"] = False
      report["total_bytes"] = None
    else:
      report["compile_seconds"] = round(time.time() - t1, 1)
      mem = _memory(compiled, "cpu" if method == "cpu-aot" else target.platform)
      report["compiled"] = mem
      flops = _flops(compiled)
      report["flops"]["compiled_per_device"] = flops
      report["total_bytes"] = mem["total_bytes"]
      report["fits"] = mem["total_bytes"] <= target.usable_bytes
  else:
    report["compiled"] = None
    report["total_bytes"] = analytic["total_bytes"]
    report["fits"] = analytic["total_bytes"] <= target.usable_bytes
  report["seconds"] = round(time.time() - t0, 1)
  return report


def for_platform(config, platform: str):
  """`config` with the models built for `platform` (config.model.platform, models/vit.py) when it
  is "auto": a TPU program compiled on this CPU host must not carry the XLA:CPU-specific graph
  changes. GPU programs compiled on CPU devices keep the CPU graph (cuDNN attention cannot be
  lowered for the CPU)."""
  if config.model.platform != "auto" or platform != "tpu":
    return config
  config = config.copy_and_resolve_references()
  config.model.platform = platform
  return config


def base_report(config, target: Target, mesh, per_dev: int, trainer, analytic) -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  from softvq_jax.models.tokenizer import TokenizerConfig  # pylint: disable=import-outside-toplevel
  cfg = TokenizerConfig.from_config(config)
  n_params = sum(int(math.prod(x.shape)) for x in jax.tree.leaves(trainer.abstract_state.params))
  flops_step = analytic["train_flops_per_step"]
  devices = target.num_devices
  step_at_peak = (flops_step / (target.peak_flops * devices)) if target.peak_flops else None
  return {
      "target": dataclasses.asdict(target) | {"usable_bytes": target.usable_bytes},
      "model": {"encoder": cfg.encoder_size, "decoder": cfg.decoder_size,
                "image_size": cfg.image_size, "num_latent_tokens": cfg.num_latent_tokens,
                "codebook_embed_dim": cfg.codebook_embed_dim, "compute_dtype": cfg.compute_dtype,
                "remat": cfg.remat, "params": n_params},
      "mesh_shape": {k: int(v) for k, v in mesh.shape.items()},
      "global_batch": int(config.batch_size),
      "per_device_batch": per_dev,
      "grad_accum_steps": int(config.grad_accum_steps),
      "state_bytes": analytic["state_bytes"],
      "analytic": analytic,
      "flops": {"per_step_analytic": flops_step,
                "per_device_analytic": flops_step / devices,
                "step_seconds_at_peak": step_at_peak,
                "images_per_second_at_50pct_mfu": (config.batch_size / step_at_peak * 0.5
                                                   if step_at_peak else None)},
  }


# ------------------------------------------------------------------------------------------------
# Output.
# ------------------------------------------------------------------------------------------------

def _in(unit: float):
  """A formatter of byte counts in `unit` (GiB or MiB), 8 wide; None -> "-"."""
  return lambda b: "-" if b is None else f"{b / unit:8.3f}"


def _temporaries(a: dict) -> float:
  """The analytic counterpart of the compiled temporaries."""
  return a["gradient_bytes"] + a.get("gathered_frozen_bytes", 0) + a["activation_bytes"]


def format_report(r: dict) -> str:
  """The printed table: per-device memory by part, vs the device's memory; FLOPs per step."""
  t, m = r["target"], r["model"]
  c, a = r.get("compiled"), r["analytic"]
  unit, unit_name = (GiB, "GiB") if a["total_bytes"] >= GiB / 4 else (2 ** 20, "MiB")
  _gib = _in(unit)
  lines = [
      f"SoftVQ {m['encoder']}/{m['decoder']}-{m['num_latent_tokens']} (token dim "
      f"{m['codebook_embed_dim']}) at {m['image_size']} px "
      f"({m['params'] / 1e6:.1f}M params, {m['compute_dtype']}) on {t['name']}: "
      f"{t['num_devices']} x {t['kind']} (mesh {r['mesh_shape']}), method {r['method']}",
      f"global batch {r['global_batch']} = {r['per_device_batch']} per device"
      + (f" ({r['grad_accum_steps']} micro-batches)" if r["grad_accum_steps"] > 1 else ""),
      f"{'per device (' + unit_name + ')':34s} {'compiled':>8s} {'analytic':>8s}",
  ]
  sb = r["state_bytes"]
  for k, v in sb.items():
    if k != "total":
      lines.append(f"  state.{k:26s} {'':>8s} {_gib(v)}")
  lines.append(f"  {'state total':32s} {'':>8s} {_gib(sb['total'])}")
  if c:
    lines.append(f"  {'arguments (state + batch)':32s} {_gib(c['argument_bytes'])} "
                 f"{_gib(sb['total'] + a['batch_bytes'])}")
    lines.append(f"  {'outputs not aliased':32s} {_gib(c['output_bytes'] - c['alias_bytes'])}")
    lines.append(f"  {'temporaries (grads + activations)':32s} {_gib(c['temp_bytes'])} "
                 f"{_gib(_temporaries(a))}")
    lines.append(f"  {'program':32s} {_gib(c['generated_code_bytes'])}")
  else:
    lines.append(f"  {'gradients':32s} {'':>8s} {_gib(a['gradient_bytes'])}")
    if a.get("gathered_frozen_bytes"):
      lines.append(f"  {'frozen weights all-gathered':32s} {'':>8s} "
                   f"{_gib(a['gathered_frozen_bytes'])}")
    lines.append(f"  {'activations':32s} {'':>8s} {_gib(a['activation_bytes'])}")
    for k, v in a.get("activation_bytes_by_part", {}).items():
      lines.append(f"    {'per image: ' + k:30s} {'':>8s} {_gib(v)}")
  lines.append(f"  {'TOTAL':32s} {_gib(c['total_bytes'] if c else None)} {_gib(a['total_bytes'])}")
  usable = t["usable_bytes"]
  lines.append(f"  {'device memory usable':32s} {'':>8s} {_gib(usable)}  (HBM "
               f"{t['hbm_bytes'] / GiB:.1f} GiB x {t['usable_fraction']:.2f})")
  if r.get("compile_error"):
    lines.append("  compile failed for lack of memory: " + r["compile_error"].splitlines()[0][:300])
  f = r["flops"]
  lines.append(f"FLOPs per step {f['per_step_analytic']:.3e} (analytic), per device "
               f"{f['per_device_analytic']:.3e}"
               + (f", compiled {f['compiled_per_device']:.3e}" if f.get("compiled_per_device")
                  else ""))
  if f["step_seconds_at_peak"]:
    lines.append(f"step time at 100% MFU {f['step_seconds_at_peak'] * 1e3:.1f} ms; "
                 f"{f['images_per_second_at_50pct_mfu']:.0f} images/s at 50% MFU")
  lines.append("FITS" if r["fits"] else "DOES NOT FIT")
  if r.get("fallback_reason"):
    lines.append("note: " + r["fallback_reason"])
  return "\n".join(lines)


def advice(r: dict) -> str:
  """What to change when it does not fit."""
  gib = _in(GiB)
  return (f"config does not fit {r['target']['name']}: {gib(r['total_bytes']).strip()} GiB per "
          f"device needed, {gib(r['target']['usable_bytes']).strip()} GiB usable. Lower "
          "config.batch_size, raise config.grad_accum_steps, set config.model.remat=True, or shard "
          "the state with config.mesh_shape=(1,-1,1) (FSDP)")


def run(config, workdir: str, target_name: str) -> dict:
  """The `--mode=compile` entry: plan, write `<workdir>/compile_<target>.json`, print the table.

  Raises SystemExit (non-zero) with advice when the step does not fit.
  """
  from jax._src import xla_bridge  # pylint: disable=import-outside-toplevel
  target = parse_target(target_name)
  # Fake CPU devices for cpu-aot (GPU targets, and the fallback of TPU ones): cheap to declare
  # before JAX starts; re-executing the command for them is only worth it for non-TPU targets.
  if target.platform == "tpu" and not xla_bridge.backends_are_initialized() and not \
      os.environ.get("JAX_PLATFORMS"):
    import jax  # pylint: disable=import-outside-toplevel
    jax.config.update("jax_platforms", "cpu")  # libtpu is used for its compiler only
  if target.platform != "tpu" or not xla_bridge.backends_are_initialized():
    ensure_cpu_devices(target.num_devices, reexec=True)
  report = plan(config, target)
  path = paths.resolve(workdir) / f"compile_{re.sub(r'[^A-Za-z0-9_.-]', '_', target.name)}.json"
  paths.write_json(path, report, default=float)  # float: the report's numpy scalars
  print(format_report(report), flush=True)
  print(f"wrote {path}", flush=True)
  if not report["fits"]:
    raise SystemExit(advice(report))
  return report
