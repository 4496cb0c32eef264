"""Can the config's video encoder learn the direction of motion? A supervised probe, or a
label-free time-reversal objective (`--tasks=order`) read by a linear probe.

  python -m launch.motion_probe --config=configs/alpro_pretrain.py:demo --steps=400 \
      --seeds=0,1,2 [--tasks=motion+appearance|appearance|order] [--save=DIR] \
      [--config.model.video.time_init_std=1.0 ...]

Trains a fresh TimeSformer of `model.video` (sizes and init stds) with linear heads on
synthetic clips labelled by their first shape's motion (left, right, up, down, grows,
shrinks; chance 16.7 %, and 50 % for a model that sees the axis of a motion but not its
direction), at `data.num_frames` x `data.image_size`, batch `batch_size`, peak learning rate
`optim.model.lr` (`vlp_jax/eval/motion_probe.py`). Prints one JSON line per seed, then a
summary line: final test accuracy mean ± std (sample std) over the seeds, on the clips and
on the same clips played backwards. `--save=DIR` writes each seed's trained encoder as a
`transformers` TimesformerModel checkpoint in DIR/seed_<seed>, for
`--config.init.video=hf:DIR/seed_<seed>` (a video tower pre-trained on labelled clips, or
with `--tasks=order` on unlabelled ones).
"""
import os

import json

import numpy as np
from absl import app, flags

from launch import common

FLAGS = flags.FLAGS
common.define_config_flag()
flags.DEFINE_integer("steps", 400, "Training steps per seed.")
flags.DEFINE_string("seeds", "0,1,2", "Comma-separated seeds (init and batch order).")
flags.DEFINE_string("tasks", "motion", "motion | motion+appearance (adds colour and shape "
                    "heads, as pre-training asks for more than motion) | appearance (colour "
                    "and shape heads only) | order (no label: time-reversal InfoNCE; the "
                    "motion accuracy is a linear probe's on the frozen features).")
flags.DEFINE_string("save", "", "Directory: write each seed's trained encoder to "
                    "DIR/seed_<seed> as a transformers TimesformerModel checkpoint.")
flags.DEFINE_integer("num_clips", 3072, "Clips rendered; the last quarter (at most 512) "
                     "are the test set.")


def main(argv):
  del argv
  from vlp_jax.eval import motion_probe  # noqa: PLC0415  (absl parses flags first)
  from vlp_jax.models.alpro import alpro_config  # noqa: PLC0415
  c = FLAGS.config
  try:
    seeds = [int(s) for s in FLAGS.seeds.split(",") if s.strip()]
  except ValueError:
    raise app.UsageError(
        f"--seeds must be comma-separated integers, got {FLAGS.seeds!r}") from None
  if not seeds or FLAGS.steps < 1:
    raise app.UsageError("--seeds must name at least one seed and --steps must be >= 1")
  video_cfg = alpro_config(c.model, 1).video
  if video_cfg.num_frames != c.data.num_frames or video_cfg.image_size != c.data.image_size:
    raise app.UsageError("model.video.num_frames / image_size must equal data.num_frames / "
                         "image_size")
  syn = c.data.synthetic
  try:
    data = motion_probe.render(FLAGS.num_clips, seed=int(syn.seed),
                               stored_frames=int(syn.num_frames), stored_size=int(syn.image_size),
                               num_frames=int(c.data.num_frames), image_size=int(c.data.image_size))
    finals = []
    for seed in seeds:
      res = motion_probe.run(video_cfg, data, steps=FLAGS.steps, batch_size=int(c.batch_size),
                             lr=float(c.optim.model.lr), seed=seed, tasks=FLAGS.tasks)
      encoder = res.pop("encoder")
      if FLAGS.save:
        motion_probe.save_encoder(encoder, video_cfg, os.path.join(FLAGS.save, f"seed_{seed}"))
      print(json.dumps(dict(seed=seed, **res)), flush=True)
      finals.append((res["motion_acc"][-1], res["reversed_acc"][-1]))
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  acc = np.asarray(finals)
  std = (lambda v: float(v.std(ddof=1))) if len(seeds) > 1 else (lambda v: 0.0)
  print(json.dumps(dict(steps=FLAGS.steps, tasks=FLAGS.tasks, seeds=seeds,
                        motion_acc_mean=round(float(acc[:, 0].mean()), 2),
                        motion_acc_std=round(std(acc[:, 0]), 2),
                        reversed_acc_mean=round(float(acc[:, 1].mean()), 2),
                        reversed_acc_std=round(std(acc[:, 1]), 2))))


if __name__ == "__main__":
  app.run(main)
