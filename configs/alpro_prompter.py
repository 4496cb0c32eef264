"""ALPRO's prompter: the pre-training model trained with VTC only, PEM's frozen teacher.

  python -m launch.train --config=configs/alpro_prompter.py:demo --workdir=runs/prompter
  python -m launch.train --config=configs/alpro_pretrain.py:demo --workdir=runs/demo \
      --config.pem.prompter=runs/prompter

Preset `X` is `alpro_pretrain.py:X` turned into its prompter stage
(`alpro_pretrain.prompter_stage`): the same model, data (with the same mixed image
batches) and optimiser, loss VTC only, `num_steps` = that preset's `pem.prompter_steps`.
A pre-training run with `pem.prompter=""` (the default) trains exactly this into
WORKDIR/prompter by itself, so this file is for training the prompter separately (e.g. once,
for several pre-training runs). Model overrides given here must be repeated for the
pre-training run, whose model has to match the prompter's encoders.

With `order.steps` > 0 the prompter starts from the label-free order stage, which
`launch.train` trains first into WORKDIR/order (`stages`), or from `order.dir`.

Presets: `tiny` (10 steps, unit tests), `demo` (a 300-step order stage, then 1000 steps on the
synthetic corpus, about 9 minutes on 2 CPU cores), `base` (paper sizes).
"""
from configs import alpro_pretrain
from vlp_jax import config as config_lib

PRESETS = alpro_pretrain.PRESETS
stages = alpro_pretrain.stages  # a prompter config has only the order stage


def get_config(arg=None):
  preset, overrides = config_lib.parse_arg(arg, "demo")
  config = alpro_pretrain.prompter_stage(alpro_pretrain.get_config(preset))
  for key, text in overrides:
    config_lib.apply_override(config, key, text)
  return config
