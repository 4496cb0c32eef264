"""MAMA's synthetic lab: where do the angular margin, the meta-learned weights and caption
augmentation help? Every number is a mean +- std over seeds, all arms in the same conditions.

  python -m launch.mama_lab --workdir=runs/mama_lab [--seeds=3 --noise=0,0.5]

For each caption-noise level and seed: a long-tailed moving-shapes corpus
(`configs/mama_retrieval.py:lab`: Zipf over (shape, colour) topics in `train`; `noise` of the
training clips carry another clip's captions), a dual encoder pre-trained with InfoNCE
(`--pretrain_steps`), then fine-tuned from it (`--steps`) by each arm:
  infonce           margin 0, no weights
  angular_<mu>      the angular-margin loss, for each --margins value
  meta              angular (--meta_margin) + meta-learned weights (meta set: the clean `val`)
  meta_aug          meta + a generated caption per training clip from a simulated LVLM that
                    describes the clip's true attributes with one wrong at --error_rate
Measured on `test` (uniform over topics): text->video R@1, R@1 per topic-frequency bucket
(rare / medium / common in training), and for the weighted arms the mean learned weight of the
noisy and of the clean training pairs and the curve w(l). Writes WORKDIR/lab.json (runs already
there are skipped: the lab resumes), WORKDIR/lab.md (the table) and WORKDIR/lab_*.png.
"""
import functools
import json
import os
import sys

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Output directory (corpora, runs, results).")
flags.DEFINE_integer("seeds", 3, "Seeds per arm (corpus and training seed).")
flags.DEFINE_list("noise", ["0", "0.5"], "Caption-noise levels of the training split.")
flags.DEFINE_list("margins", ["0.05", "0.1"], "Margins mu of the angular arms (radians).")
flags.DEFINE_float("meta_margin", 0.1, "Margin of the weighted arms.")
flags.DEFINE_float("zipf", 1.0, "Zipf exponent of the training topics (0 = uniform).")
flags.DEFINE_integer("pretrain_steps", 400, "InfoNCE pre-training steps (shared by the arms).")
flags.DEFINE_integer("steps", 300, "Fine-tuning steps of every arm.")
flags.DEFINE_float("error_rate", 0.2, "Share of the simulated LVLM's captions with an error.")
flags.mark_flags_as_required(["workdir"])

BUCKETS = ("rare", "medium", "common")
_FLAG_NAMES = ("seeds", "noise", "margins", "meta_margin", "zipf", "pretrain_steps", "steps",
               "error_rate")


def _config(seed, data_dir, noise=0.0, **overrides):
  """The lab preset on corpus (seed, noise); the corpus settings match what `_corpus` wrote,
  so the trainer finds it complete instead of regenerating it."""
  from configs import mama_retrieval
  c = mama_retrieval.get_config("lab")
  c.seed = seed
  c.data.dir = data_dir
  c.data.synthetic.update(seed=seed, caption_noise=noise, topic_zipf=FLAGS.zipf)
  c.update_from_flattened_dict(overrides)
  return c


def _arms():
  arms = {"infonce": {"mama.margin": 0.0, "meta.enabled": False}}
  for m in FLAGS.margins:
    arms[f"angular_{float(m):g}"] = {"mama.margin": float(m), "meta.enabled": False}
  arms["meta"] = {"mama.margin": FLAGS.meta_margin, "meta.enabled": True}
  arms["meta_aug"] = dict(arms["meta"], extra=True)
  return arms


def _corpus(root, seed, noise):
  from vlp_jax.data import synthetic
  from vlp_jax.methods.mama import lab
  d = os.path.join(root, "data", f"noise{noise:g}_seed{seed}")
  synthetic.ensure(d, _config(seed, d, noise).data.synthetic)
  side = os.path.join(d, "train.standin.jsonl")
  if not os.path.exists(side):
    lab.standin_captions(d, "train", side, error_rate=FLAGS.error_rate, seed=seed)
  return d, side


def _run(root, key, seed, noise, name, overrides, data_dir, side, pretrain):
  import numpy as np

  from vlp_jax.core import trainer
  from vlp_jax.data import setup
  from vlp_jax.data import synthetic
  from vlp_jax.methods.mama import lab
  overrides = dict(overrides)
  extra = overrides.pop("extra", False)
  workdir = os.path.join(root, "runs", key, name)
  c = _config(seed, data_dir, noise, **overrides, **{"init.checkpoint": pretrain,
                                              "num_steps": FLAGS.steps,
                                              "ckpt_every": FLAGS.steps})
  if extra:
    c.data.extra_captions = side
  results = trainer.train(c, workdir)
  test = results["test"]
  with np.load(os.path.join(workdir, "eval", "test", f"step_{FLAGS.steps}.npz")) as f:
    ranks = f["t2v_rank"]
    curve = f["weight_curve"].tolist() if "weight_curve" in f else None
  test_topics, buckets = _topics(data_dir)
  out = {"seed": seed, "noise": noise, "arm": name, "t2v_R@1": test["retrieval/t2v_R@1"],
         "t2v_R@5": test["retrieval/t2v_R@5"], "v2t_R@1": test["retrieval/v2t_R@1"],
         "bucket_R@1": lab.bucket_recall(ranks, test_topics, buckets),
         "weight_curve": curve}
  if c.meta.enabled:
    run = trainer.Trainer(c, workdir).build()
    run.restore()
    noisy_path = os.path.join(data_dir, synthetic.NOISY_IDS_FILE)
    noisy = set()
    if os.path.exists(noisy_path):
      with open(noisy_path) as f:
        noisy = {line.strip() for line in f if line.strip()}
    batches = setup.eval_loader(c, data_dir, "train", run.text, int(c.batch_size))
    out.update(lab.weights_by_noise(run.task, run.state.params, batches, noisy))
  return out


@functools.cache
def _topics(data_dir):
  """The test clips' topics (record order) and the topic -> frequency bucket map."""
  from vlp_jax.methods.mama import lab
  train = [lab.topic(o) for _, o in lab.clip_attributes(data_dir, "train")]
  test = [lab.topic(o) for _, o in lab.clip_attributes(data_dir, "test")]
  return test, lab.frequency_buckets(train, test)


def _pretrain(root, key, seed, noise, data_dir):
  import ml_collections

  from vlp_jax.core import trainer
  workdir = os.path.join(root, "runs", key, "pretrain")
  c = _config(seed, data_dir, noise, **{"mama.margin": 0.0, "meta.enabled": False,
                                 "mama.logit_scale_init": 2.659,  # CLIP's from-scratch 1/0.07
                                 "num_steps": FLAGS.pretrain_steps,
                                 "ckpt_every": FLAGS.pretrain_steps})
  c.evals = ml_collections.ConfigDict()
  trainer.train(c, workdir)
  return workdir


def _summary(rows, arms, noises):
  import numpy as np
  table = {}
  for noise in noises:
    for arm in arms:
      sel = [r for r in rows if r["arm"] == arm and r["noise"] == noise]
      if not sel:
        continue
      stat = lambda xs: (float(np.mean(xs)), float(np.std(xs)), len(xs))
      entry = {"t2v_R@1": stat([r["t2v_R@1"] for r in sel]),
               "buckets": [stat([r["bucket_R@1"][b] for r in sel]) for b in range(3)]}
      if "noisy_weight" in sel[0]:
        for k in ("noisy_weight", "clean_weight"):
          vals = [r[k] for r in sel if not np.isnan(r[k])]
          entry[k] = stat(vals) if vals else None
        entry["weight_curve"] = np.mean([r["weight_curve"] for r in sel], 0).tolist()
      table[f"{noise:g}/{arm}"] = entry
  return table


def _markdown(table, noises, arms):
  fmt = lambda s: f"{s[0]:.1f} ± {s[1]:.1f}"
  lines = ["| caption noise | arm | test t2v R@1 | R@1 rare | R@1 medium | R@1 common | "
           "mean weight noisy / clean |", "| --- | --- | --- | --- | --- | --- | --- |"]
  for noise in noises:
    for arm in arms:
      e = table.get(f"{noise:g}/{arm}")
      if e is None:
        continue
      w = "–"
      if e.get("noisy_weight") and e.get("clean_weight"):
        w = (f"{e['noisy_weight'][0]:.3f} ± {e['noisy_weight'][1]:.3f} / "
             f"{e['clean_weight'][0]:.3f} ± {e['clean_weight'][1]:.3f}")
      elif e.get("clean_weight"):
        w = f"– / {e['clean_weight'][0]:.3f} ± {e['clean_weight'][1]:.3f}"
      lines.append(f"| {noise:.0%} | {arm} | {fmt(e['t2v_R@1'])} | "
                   + " | ".join(fmt(b) for b in e["buckets"]) + f" | {w} |")
  n = max(e["t2v_R@1"][2] for e in table.values())
  lines.append(f"\n{n} seeds per row (mean ± std).")
  return "\n".join(lines)


def _plots(root, table, noises, arms, curve_max):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np
  paths = []
  fig, axes = plt.subplots(1, len(noises), figsize=(5 * len(noises), 3.6), squeeze=False)
  for ax, noise in zip(axes[0], noises):
    present = [a for a in arms if f"{noise:g}/{a}" in table]
    width = 0.8 / max(len(present), 1)
    for i, arm in enumerate(present):
      b = table[f"{noise:g}/{arm}"]["buckets"]
      ax.bar(np.arange(3) + i * width, [x[0] for x in b], width, yerr=[x[1] for x in b],
             label=arm, capsize=2)
    ax.set_xticks(np.arange(3) + 0.4 - width / 2, BUCKETS)
    ax.set_title(f"caption noise {noise:.0%}: test t2v R@1 by topic frequency")
    ax.set_ylabel("R@1 (%)")
  axes[0][-1].legend(fontsize=7)
  fig.tight_layout()
  path = os.path.join(root, "lab_buckets.png")
  fig.savefig(path, dpi=110)
  plt.close(fig)
  paths.append(path)
  fig, ax = plt.subplots(figsize=(5, 3.6))
  for key, e in table.items():
    if e.get("weight_curve"):
      grid = np.linspace(0.0, curve_max, len(e["weight_curve"]))
      ax.plot(grid, e["weight_curve"], label=key)
  ax.set_xlabel("per-sample loss l")
  ax.set_ylabel("learned weight w(l)")
  ax.legend(fontsize=7)
  fig.tight_layout()
  path = os.path.join(root, "lab_weight_curve.png")
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return paths + [path]


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  root = os.path.abspath(FLAGS.workdir)
  os.makedirs(root, exist_ok=True)
  noises = [float(n) for n in FLAGS.noise]
  if any(not 0 <= n < 1 for n in noises):
    sys.exit(f"mama_lab: --noise values must be in [0, 1), got {noises}")
  arms = _arms()
  results_path = os.path.join(root, "lab.json")
  rows = []
  if os.path.exists(results_path):
    with open(results_path) as f:
      rows = json.load(f)["runs"]
  done = {(r["noise"], r["seed"], r["arm"]) for r in rows}
  for noise in noises:
    for seed in range(FLAGS.seeds):
      if all((noise, seed, a) in done for a in arms):
        continue
      key = f"noise{noise:g}_seed{seed}"
      data_dir, side = _corpus(root, seed, noise)
      pretrain = _pretrain(root, key, seed, noise, data_dir)
      for name, overrides in arms.items():
        if (noise, seed, name) in done:
          continue
        rows.append(_run(root, key, seed, noise, name, overrides, data_dir, side, pretrain))
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "weight_curve"}),
              flush=True)
        with open(results_path + ".tmp", "w") as f:
          json.dump({"flags": {k: FLAGS[k].value for k in _FLAG_NAMES}, "runs": rows}, f)
        os.replace(results_path + ".tmp", results_path)
  table = _summary(rows, arms, noises)
  md = _markdown(table, noises, arms)
  with open(os.path.join(root, "lab.md"), "w") as f:
    f.write(md + "\n")
  curve_max = _config(0, "").meta.curve_max_loss
  paths = _plots(root, table, noises, arms, curve_max)
  print(md)
  print(json.dumps({"table": table, "figures": paths}))


if __name__ == "__main__":
  app.run(main)
