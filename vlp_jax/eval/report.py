"""A run's report as PNG figures (matplotlib, no display): what `python -m launch.report` writes.

  train.png              every `loss*` term, `lr` and `grad_norm` over steps
  eval_<split>.png       every evaluation metric of a split over steps
  <eval>_similarity.png  retrieval: VTC similarities of the first test pairs (the latest eval)
  <eval>_ranks.png       retrieval: histogram of the text->video and video->text ranks
  <eval>_confusion.png   classification / QA: the confusion matrix of the latest eval
  <eval>_weight_curve.png  MAMA: the learned sample weight w(l) against the loss l

The curves come from WORKDIR/metrics.jsonl, the rest from the arrays evaluators save under
WORKDIR/eval/<eval name>/step_<step>.npz.
"""
from __future__ import annotations

import glob
import math
import os
import re
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from vlp_jax.core import metrics as metrics_lib  # noqa: E402

_SKIP = ("steps_per_sec", "eval_seconds")


def _grid(n: int) -> tuple[plt.Figure, list]:
  cols = min(n, 4)
  rows = math.ceil(n / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
  flat = list(axes.flat)
  for ax in flat[n:]:
    ax.axis("off")
  return fig, flat[:n]


def _curves(rows: list[dict], keys: list[str], title: str, path: str) -> str:
  fig, axes = _grid(len(keys))
  for ax, key in zip(axes, keys):
    points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
    steps, values = zip(*points) if points else ((), ())
    ax.plot(steps, values, marker="o" if len(points) < 20 else None, markersize=3)
    ax.set_title(key, fontsize=9)
    ax.set_xlabel("step", fontsize=8)
    ax.grid(alpha=0.3)
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def _save(fig, ax, title: str, xlabel: str, ylabel: str, path: str) -> str:
  """Labels a one-panel figure, writes it to `path` and frees it."""
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def _latest_arrays(workdir: str) -> dict[str, tuple[int, dict]]:
  """{eval name: (step, arrays)} of each evaluator's newest saved arrays."""
  out = {}
  for directory in sorted(glob.glob(os.path.join(workdir, "eval", "*"))):
    steps = [(int(m.group(1)), p) for p in glob.glob(os.path.join(directory, "step_*.npz"))
             if (m := re.search(r"step_(\d+)\.npz$", p))]
    if steps:
      step, path = max(steps)
      with np.load(path) as data:
        out[os.path.basename(directory)] = (step, {k: data[k] for k in data.files})
  return out


def _similarity(name, step, sim, path):
  fig, ax = plt.subplots(figsize=(5, 4.5))
  im = ax.imshow(sim, cmap="viridis")
  fig.colorbar(im, ax=ax)
  return _save(fig, ax, f"{name}: similarity of the first {sim.shape[0]} pairs (step {step})",
               "video", "text", path)


def _ranks(name, step, arrays, path):
  fig, ax = plt.subplots(figsize=(5, 3.5))
  for key, label in (("t2v_rank", "text -> video"), ("v2t_rank", "video -> text")):
    if key in arrays and arrays[key].size:
      r = arrays[key]
      bins = np.unique(np.round(np.geomspace(1, max(int(r.max()), 2) + 1, 30)))
      ax.hist(r, bins=bins, alpha=0.6, label=f"{label} (median {np.median(r):g})")
  ax.set_xscale("log")
  ax.legend(fontsize=8)
  return _save(fig, ax, f"{name}: ranks (step {step})", "rank of the ground truth", "queries",
               path)


def _confusion(name, step, arrays, path):
  m = arrays["confusion"]
  labels = [str(x) for x in arrays.get("labels", np.arange(m.shape[0]))]
  size = max(4.0, 0.3 * len(labels) + 2)
  fig, ax = plt.subplots(figsize=(size, size))
  ax.imshow(m, cmap="Blues")
  ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
  ax.set_yticks(range(len(labels)), labels, fontsize=7)
  return _save(fig, ax, f"{name}: confusion (step {step})", "predicted", "true", path)


def _weight_curve(name, step, arrays, path):
  fig, ax = plt.subplots(figsize=(5, 3.5))
  ax.plot(arrays["weight_curve_loss"], arrays["weight_curve"])
  ax.grid(alpha=0.3)
  return _save(fig, ax, f"{name}: learned weight curve (step {step})", "per-sample loss",
               "weight", path)


def write_report(workdir: str, out_dir: str | None = None) -> list[str]:
  """Writes the run's figures into `out_dir` (default WORKDIR/report); returns their paths.

  Raises:
    FileNotFoundError: WORKDIR has no metrics.jsonl.
  """
  rows = metrics_lib.read_metrics(workdir)
  if not rows:
    raise FileNotFoundError(f"{os.path.join(workdir, 'metrics.jsonl')} is missing or empty: "
                            "launch.report needs a run written by launch.train / evaluate")
  out_dir = out_dir or os.path.join(workdir, "report")
  os.makedirs(out_dir, exist_ok=True)
  by_split = defaultdict(list)
  for r in rows:
    by_split[r["split"]].append(r)
  paths = []
  for split, split_rows in sorted(by_split.items()):
    keys = sorted({k for r in split_rows for k in r if k not in ("step", "split")}
                  - set(_SKIP))
    if split == "train":
      keys = [k for k in keys if k.startswith("loss") or k in ("lr", "grad_norm")]
      name = "train.png"
    else:
      name = f"eval_{split}.png"
    if keys:
      paths.append(_curves(split_rows, keys, f"{split} ({os.path.basename(workdir)})",
                           os.path.join(out_dir, name)))
  for name, (step, arrays) in _latest_arrays(workdir).items():
    if "similarity" in arrays:
      paths.append(_similarity(name, step, arrays["similarity"],
                               os.path.join(out_dir, f"{name}_similarity.png")))
    if "t2v_rank" in arrays or "v2t_rank" in arrays:
      paths.append(_ranks(name, step, arrays, os.path.join(out_dir, f"{name}_ranks.png")))
    if "weight_curve" in arrays:
      paths.append(_weight_curve(name, step, arrays,
                                 os.path.join(out_dir, f"{name}_weight_curve.png")))
    if "confusion" in arrays:
      paths.append(_confusion(name, step, arrays, os.path.join(out_dir, f"{name}_confusion.png")))
  return paths
