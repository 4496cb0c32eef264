"""Step-time benchmark of any config's update: compile time, step time, FLOPs, MFU, memory.

The run uses `data.source = "random"` (device batches of the right shapes, no TensorFlow) and
times the compiled update on one batch per stream, so it measures the device step alone.
FLOPs per step come from XLA's cost analysis of the compiled step (the partitioned program of
one device, times the number of devices), cross-checked by the task's analytic count; MFU
divides the achieved FLOP/s by the peak of the devices (a table of accelerators; on CPU a
measured float32 GEMM).
"""
from __future__ import annotations

import copy
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from vlp_jax.core import trainer as trainer_lib

# Dense bf16 peak FLOP/s per device (vendor figures).
PEAK_FLOPS = {
    "h200": 989e12, "h100": 989e12, "a100": 312e12,
    "tpu v4": 275e12, "tpu v5 lite": 197e12, "tpu v5e": 197e12, "tpu v5p": 459e12,
}


def peak_flops(device) -> tuple[float | None, str]:
  """(peak FLOP/s of one device, where the figure comes from); None when unknown."""
  kind = device.device_kind.lower()
  for name, flops in PEAK_FLOPS.items():
    if name in kind:
      return flops, f"table ({name})"
  if device.platform == "cpu":
    return measured_gemm_flops(), "measured float32 GEMM"
  return None, f"unknown device kind {device.device_kind!r}"


def measured_gemm_flops(n: int = 1024, repeats: int = 5) -> float:
  """Best FLOP/s of an n x n float32 matmul on the default device (a CPU peak estimate)."""
  return gemm_flops((n, n, n), repeats=repeats)["forward"]


def gemm_flops(shape: tuple[int, int, int], repeats: int = 5) -> dict[str, float]:
  """Best FLOP/s of float32 matmuls of `shape` = (m, k, n) on the default device:
  "forward" `x[m, k] @ w[k, n]`, "weight_grad" `x[m, k].T @ dy[m, n]` (a dense layer's two
  GEMM kinds)."""
  m, k, n = shape
  x, w, dy = jnp.ones((m, k), jnp.float32), jnp.ones((k, n), jnp.float32), \
      jnp.ones((m, n), jnp.float32)
  fns = {"forward": (jax.jit(lambda a, b: a @ b), x, w),
         "weight_grad": (jax.jit(lambda a, b: a.T @ b), x, dy)}
  out = {}
  for name, (f, a, b) in fns.items():
    f(a, b).block_until_ready()
    best = min(_timed(lambda: f(a, b).block_until_ready()) for _ in range(repeats))
    out[name] = 2.0 * m * k * n / best
  return out


def mlp_gemm_shape(config) -> tuple[int, int, int]:
  """(tokens, hidden, mlp_dim) of the video encoder's MLP GEMM in `config`'s ALPRO step: the
  step's largest GEMMs (tokens = batch x (1 + frames x patches))."""
  v = config.model.video
  patches = (int(v.image_size) // int(v.patch_size)) ** 2
  tokens = int(config.batch_size) * (1 + int(config.data.num_frames) * patches)
  return tokens, int(v.hidden), int(v.mlp_dim)


def _timed(fn) -> float:
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


def _cost(compiled) -> float | None:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  return float(cost["flops"]) if cost and "flops" in cost else None


def _compiled_memory(compiled) -> int | None:
  try:
    m = compiled.memory_analysis()
  except Exception:  # not every backend implements it
    return None
  if m is None:
    return None
  return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
             - m.alias_size_in_bytes)


def vtc_only(config):
  """A copy of an ALPRO config whose loss is VTC alone on video-only batches (the step of
  the PyTorch reference, vlp_jax/core/torch_reference.py)."""
  if config.task != "alpro":
    raise ValueError(f"--compare=torch times ALPRO's VTC step; config.task is {config.task!r}")
  config = copy.deepcopy(config)
  with config.unlocked():
    for k in config.loss:
      config.loss[k] = 1.0 if k == "vtc" else 0.0
    config.data.image_ratio = 0.0
  return config


def run(config, steps: int = 10, warmup: int = 2, devices=None) -> dict:
  """Benchmarks `config`'s update step; returns the figures (see `launch.benchmark`)."""
  config = copy.deepcopy(config)
  with config.unlocked():
    config.data.source = "random"
    if int(config.model.text.get("vocab_size", 0)) <= 0:
      config.model.text.vocab_size = 30522  # bert-base's: a realistic embedding size
  with tempfile.TemporaryDirectory() as workdir:
    trainer = trainer_lib.Trainer(config, workdir, devices).build()
    loaders = {k: iter(v) for k, v in trainer.loaders().items()}
    batches = trainer.device_batches({k: next(it) for k, it in loaders.items()})
    step = trainer.update_fn(trainer.load_frozen())
    t0 = time.perf_counter()
    compiled = step.lower(trainer.state, batches).compile()
    compile_s = time.perf_counter() - t0
    # The cost analysis is of the SPMD-partitioned program, i.e. of one device.
    device_flops = _cost(compiled)
    compiled_bytes = _compiled_memory(compiled)
    state = trainer.state
    times = []
    for i in range(warmup + steps if steps else 0):  # steps=0: compile only
      t0 = time.perf_counter()
      state, metrics = step(state, batches)
      jax.block_until_ready((state, metrics))
      if i >= warmup:
        times.append(time.perf_counter() - t0)
    trainer.checkpointer.close()
  mesh_devices = list(trainer.mesh.devices.flat)
  batch = int(config.batch_size)
  analytic = trainer.task.analytic_flops(batch)
  flops = device_flops * len(mesh_devices) if device_flops else None
  flops_source = "xla cost analysis"
  if config.model.get("scan_layers", False) and analytic:
    # XLA's cost analysis counts a while loop's body once, i.e. one layer of each scan.
    flops, flops_source = analytic, "analytic (scan_layers: XLA counts one loop iteration)"
  stats = [d.memory_stats() or {} for d in mesh_devices if hasattr(d, "memory_stats")]
  peaks = [s.get("peak_bytes_in_use") for s in stats if s.get("peak_bytes_in_use")]
  median = statistics.median(times) if times else None
  peak, peak_source = peak_flops(mesh_devices[0])
  achieved = flops / median if flops and median else None
  total_peak = peak * len(mesh_devices) if peak else None
  return {
      "config_task": config.task,
      "step_time_s": median, "step_time_min_s": min(times, default=None),
      "step_time_max_s": max(times, default=None),
      "examples_per_s": batch / median if median else None, "batch_size": batch,
      "compile_s": compile_s,
      "flops_per_step": flops, "flops_source": flops_source,
      "flops_per_step_analytic": analytic,
      "flops_analytic_over_xla": (analytic / flops if analytic and flops
                                  and flops_source == "xla cost analysis" else None),
      "tflops_per_s": achieved / 1e12 if achieved else None,
      "mfu": achieved / total_peak if achieved and total_peak else None,
      "peak_flops_per_device": peak, "peak_flops_source": peak_source,
      "peak_memory_bytes": max(peaks) if peaks else compiled_bytes,
      "compiled_memory_bytes": compiled_bytes,
      "devices": len(mesh_devices), "platform": mesh_devices[0].platform,
      "device_kind": mesh_devices[0].device_kind, "steps": steps,
      "loss_finite": (bool(np.isfinite(float(jax.device_get(metrics["loss"])))) if times
                      else None),
  }


def table(figures: dict) -> str:
  """The figures as aligned `key  value` lines."""
  def fmt(v):
    if isinstance(v, float):
      return f"{v:.4g}"
    return str(v)
  width = max(len(k) for k in figures)
  return "\n".join(f"{k:<{width}}  {fmt(v)}" for k, v in figures.items())
