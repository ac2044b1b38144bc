"""What a person watching a training run reads: a quiet start-up, one line per log window, and
where the outputs are at the end.

Why a module of its own: clu's default writer logs every scalar of every window as one
~1.5k-character line and its ReportProgress logs "Setting work unit notes" lines, which bury the
numbers a person wants (how far, how fast, how long still, is the loss going down). Everything is
still written in full to TensorBoard and `<workdir>/metrics.jsonl`; `--v=1` (absl verbosity)
brings clu's full metric lines back on stdout.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Mapping

from absl import logging
from etils import epath

# Native start-up chatter of libraries loaded for a side job: TensorFlow (imported only by clu's
# TensorBoard writer) prints a oneDNN notice (its oneDNN kernels are never used by us, so turning
# them off changes nothing we compute) and, because that notice comes before absl's C++ logging is
# initialised, "WARNING: All log messages before absl::InitializeLog() is called...". libtpu
# prints INFO lines at start-up. Level 1 keeps warnings and errors. A value the user has set wins.
QUIET_NATIVE_ENV = {
    "TF_ENABLE_ONEDNN_OPTS": "0",
    "TF_CPP_MIN_LOG_LEVEL": "1",
    "TPU_MIN_LOG_LEVEL": "1",
    "TPU_STDERR_LOG_LEVEL": "1",
}

# The losses shown in the progress line, in this order, when the run has them (short names).
_LINE_TERMS = (("loss/total", "loss"), ("loss/reconstruction", "rec"),
               ("loss/perceptual", "lpips"), ("loss/adversarial", "adv"),
               ("disc/loss", "disc"))


def quiet_native_logs() -> None:
  """Sets QUIET_NATIVE_ENV (unless already set). Must run before TensorFlow / libtpu load."""
  for key, value in QUIET_NATIVE_ENV.items():
    os.environ.setdefault(key, value)


def metric_writer(workdir: str, *, is_main: bool):
  """TensorBoard (process 0) through clu, without its per-window stdout dump (unless --v>=1)."""
  quiet_native_logs()
  from clu import metric_writers  # pylint: disable=import-outside-toplevel
  writers = []
  if is_main:
    writers.append(metric_writers.SummaryWriter(os.fspath(workdir)))
  if logging.vlog_is_on(1):
    writers.append(metric_writers.LoggingWriter())
  return metric_writers.AsyncMultiWriter(writers)


def write_hparams(workdir: str, config_json: Mapping[str, Any]) -> str:
  """`<workdir>/config.json`: the run's whole config, readable (instead of one long log line)."""
  path = epath.Path(workdir, "config.json")
  path.write_text(json.dumps(config_json, indent=2, sort_keys=True) + "\n")
  return os.fspath(path)


def _duration(seconds: float) -> str:
  seconds = max(0, int(round(seconds)))
  if seconds >= 3600:
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
  if seconds >= 60:
    return f"{seconds // 60}m{seconds % 60:02d}s"
  return f"{seconds}s"


def _number(x: float) -> str:
  return f"{x:.3g}" if abs(x) >= 1e-3 or x == 0 else f"{x:.1e}"


class ProgressLine:
  """`step 150/600 (25%) | 31.2 img/s | ETA 4m10s | loss 0.0421 rec 0.0312 ... | lr 1.9e-03`.

  The ETA extrapolates the mean step time since the first logged window (the first window
  includes warm-up effects such as the input pipeline filling; it is excluded once a second
  window exists).
  """

  def __init__(self, total_steps: int, batch_size: int):
    self.total_steps = int(total_steps)
    self.batch_size = int(batch_size)
    self._since: tuple[float, int] | None = None  # (time, step) at the end of the first window

  def __call__(self, step: int, summary: Mapping[str, float], window_steps: int,
               window_seconds: float) -> str:
    now = time.time()
    if self._since is None or self._since[1] >= step:
      step_time = window_seconds / max(window_steps, 1)
      self._since = (now, step)
    else:
      step_time = (now - self._since[0]) / (step - self._since[1])
    parts = [f"step {step}/{self.total_steps} ({100 * step / self.total_steps:.0f}%)",
             f"{self.batch_size * window_steps / max(window_seconds, 1e-9):.1f} img/s",
             f"ETA {_duration(step_time * (self.total_steps - step))}"]
    losses = " ".join(f"{short} {_number(summary[key])}" for key, short in _LINE_TERMS
                      if key in summary)
    if losses:
      parts.append(losses)
    if "lr" in summary:
      parts.append(f"lr {summary['lr']:.1e}")
    return " | ".join(parts)


class MetricsLog:
  """The training loop's metrics, one window at a time: its means (from
  `steps.summarize_window`) plus throughput (step time, images/s) and MFU, to TensorBoard,
  `<workdir>/metrics.jsonl` and one progress line on stdout (process 0 writes).

  MFU = FLOPs of one step x steps / seconds / (peak FLOP/s per device x devices), when both the
  step's FLOPs and the chip's peak are known (softvq_jax/hardware.py).
  """

  def __init__(self, workdir: str, *, is_main: bool, total_steps: int, batch_size: int,
               start_step: int, num_devices: int = 1, flops_per_step: float | None = None,
               peak_flops_per_device: float | None = None):
    self.writer = metric_writer(workdir, is_main=is_main)
    self._is_main = is_main
    self._path = epath.Path(workdir, "metrics.jsonl")
    self._batch_size = int(batch_size)
    self._line = ProgressLine(total_steps, batch_size)
    self._peak_total = (peak_flops_per_device * num_devices
                        if flops_per_step and peak_flops_per_device else None)
    self._flops = flops_per_step
    self._window = (time.time(), int(start_step))

  def write_window(self, step: int, summary: dict[str, float]) -> dict[str, float]:
    """Completes `summary` (the window's means) with perf/*, writes it, starts the next window."""
    start, start_step = self._window
    elapsed, n = time.time() - start, max(step - start_step, 1)
    summary["perf/step_time_s"] = elapsed / n
    summary["perf/images_per_s"] = self._batch_size * n / elapsed
    if self._peak_total:
      summary["perf/mfu"] = self._flops * n / elapsed / self._peak_total
    if self._is_main:
      self.writer.write_scalars(step, summary)
      with self._path.open("a") as f:
        f.write(json.dumps(dict(step=step, **summary)) + "\n")
      logging.info("%s", self._line(step, summary, n, elapsed))
    self._window = (time.time(), step)
    return summary

  def flush(self) -> None:
    self.writer.flush()


def outputs_message(workdir: str, *, step: int, minutes: float, config_path: str | None,
                    eval_result: Mapping[str, float] | None) -> str:
  """The closing lines: what was trained, where everything is, and the next commands."""
  config_arg = f"--config={config_path}" if config_path else "--config=<this run's config>"
  lines = [f"finished at step {step} in {minutes:.1f} min." + (
      "" if not eval_result else "  In-loop evaluation: " + ", ".join(
          f"{k} {v:.4g}" for k, v in sorted(eval_result.items())
          if k.split("/")[-1] in ("psnr", "ssim", "lpips") or k.startswith("rfid"))),
           f"  outputs in {workdir}:",
           "    checkpoints/                 Orbax checkpoints (rerun the same command to resume)",
           "    images/recon_*.png           input (top) | EMA reconstruction (bottom) grids",
           "    metrics.jsonl, config.json   per-window metrics; the run's whole config",
           f"  TensorBoard: tensorboard --logdir={workdir}",
           f"  evaluate:    python -m softvq_jax.main {config_arg} --workdir={workdir} --mode=eval",
           f"  load:        softvq_jax.load_tokenizer({workdir!r})  (EMA weights of the newest "
           "checkpoint)"]
  return "\n".join(lines)
