"""One optax optimizer per parameter collection, from `config.optim.<collection>`.

Settings of a collection (configs/alpro_pretrain.py has the defaults):
  lr, warmup_frac, end_lr_frac   linear warm-up from 0, then linear decay to lr * end_lr_frac
  b1, b2, eps, weight_decay      AdamW; biases, LayerNorm parameters and scalars are not decayed
  no_decay                       regex (re.fullmatch on the parameter path) of further leaves
                                 without weight decay ("" = none), e.g. position embeddings
  clip_norm                      global-norm clipping over the collection's trained leaves
                                 (0 = off)
  frozen                         regex (re.fullmatch on the "/"-joined parameter path, e.g.
                                 "video_encoder/.*"): matching leaves get exactly zero updates
                                 and carry no optimizer state; ".*" freezes the collection
  lr_mult                        ((regex, multiplier), ...): the first matching rule scales
                                 that leaf's update (its learning rate, decay included)
A `no_decay`, `frozen` or `lr_mult` regex that matches no leaf of the collection logs a warning
when the optimizer state is created (a misspelt path changes nothing).
"""
from __future__ import annotations

import functools
import re
from typing import Any
from collections.abc import Mapping

from absl import logging
import jax
import optax

from vlp_jax.convert import stacked

FROZEN, TRAINED = "frozen", "trained"


def schedule(optim_cfg: Mapping[str, Any], num_steps: int) -> optax.Schedule:
  """Linear warm-up from 0 over `warmup_frac * num_steps`, then linear decay to `end_lr_frac`."""
  lr = float(optim_cfg["lr"])
  warmup = int(round(float(optim_cfg["warmup_frac"]) * num_steps))
  end = lr * float(optim_cfg.get("end_lr_frac", 0.0))
  decay_steps = max(num_steps - warmup, 1)
  return optax.join_schedules(
      [optax.linear_schedule(0.0, lr, max(warmup, 1)),
       optax.linear_schedule(lr, end, decay_steps)], [warmup])


def decay_mask(params: Any, no_decay: str = "") -> Any:
  """True for weights that get weight decay: matrices and embeddings.

  Biases, LayerNorm scales/offsets (1-d) and scalars such as the contrastive temperature
  (0-d) are not decayed, nor are leaves whose path fully matches the regex `no_decay`.
  Scanned layers (`model.scan_layers`, under `layers_from_*`) carry one more leading axis,
  which does not count.
  """
  rx = _compile(no_decay, "optim no_decay") if no_decay else None
  if rx is not None:
    warn_unmatched(params, rx, "optim no_decay")

  def decayed(path, p):
    name = path_name(path)
    if rx is not None and rx.fullmatch(name):
      return False
    return p.ndim - int(stacked.is_stacked_path(name)) >= 2
  return jax.tree_util.tree_map_with_path(decayed, params)


def path_name(path) -> str:
  """"a/b/c" of a pytree key path; keys that are not dict keys (logical boxes) are skipped."""
  return "/".join(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def _compile(pattern: str, what: str) -> re.Pattern:
  try:
    return re.compile(pattern)
  except re.error as e:
    raise ValueError(f"{what}: {pattern!r} is not a regular expression ({e})") from None


_WARNED: set[tuple[str, str]] = set()


def warn_unmatched(params: Any, rx: re.Pattern, what: str) -> None:
  """Logs a warning (once per regex) when `rx` fully matches no leaf path of `params`: a
  misspelt regex would otherwise freeze, scale or exempt nothing without a word. Not an error:
  a preset's rule may name a module that an override removed (e.g. `temporal=none`, or MAMA's
  ALPRO-only parts with the CLIP backbone)."""
  names = [path_name(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
  if any(rx.fullmatch(n) for n in names) or (what, rx.pattern) in _WARNED:
    return
  _WARNED.add((what, rx.pattern))
  logging.warning("%s %r matches no parameter, so it does nothing (re.fullmatch on the "
                  "'/'-joined path; %d leaves, e.g. %s)", what, rx.pattern, len(names),
                  names[:3])


def freeze_labels(params: Any, pattern: str) -> Any:
  """FROZEN / TRAINED per leaf of `params` by `re.fullmatch(pattern, path)` (a warning when
  `pattern` matches no leaf)."""
  rx = _compile(pattern, "optim frozen")
  warn_unmatched(params, rx, "optim frozen")
  return jax.tree_util.tree_map_with_path(
      lambda p, _: FROZEN if rx.fullmatch(path_name(p)) else TRAINED, params)


def _scale_by_path(rules: tuple[tuple[re.Pattern, float], ...]) -> optax.GradientTransformation:
  """Multiplies each leaf's update by the multiplier of the first rule matching its path."""
  def mult(path) -> float:
    name = path_name(path)
    return next((m for rx, m in rules if rx.fullmatch(name)), 1.0)

  def init(params):
    for rx, _ in rules:
      warn_unmatched(params, rx, "optim lr_mult")
    return optax.EmptyState()

  def update(updates, state, params=None):
    del params
    return jax.tree_util.tree_map_with_path(lambda p, u: u * mult(p), updates), state
  return optax.GradientTransformation(init, update)


def _lr_mult_rules(value, collection: str) -> tuple[tuple[re.Pattern, float], ...]:
  rules = []
  for rule in value or ():
    if len(rule) != 2:
      raise ValueError(f"optim.{collection}.lr_mult entry {rule!r} must be (regex, multiplier)")
    rules.append((_compile(str(rule[0]), f"optim.{collection}.lr_mult"), float(rule[1])))
  return tuple(rules)


def make_optimizer(optim_cfg: Mapping[str, Any], num_steps: int, collection: str = "model"
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Returns (transformation, learning-rate schedule) of one collection."""
  sched = schedule(optim_cfg, num_steps)
  parts = []
  if optim_cfg.get("clip_norm") and float(optim_cfg["clip_norm"]) > 0:
    parts.append(optax.clip_by_global_norm(float(optim_cfg["clip_norm"])))
  parts.append(optax.adamw(sched, b1=float(optim_cfg["b1"]), b2=float(optim_cfg["b2"]),
                           eps=float(optim_cfg["eps"]),
                           weight_decay=float(optim_cfg["weight_decay"]),
                           mask=functools.partial(decay_mask,
                                                  no_decay=str(optim_cfg.get("no_decay", "")))))
  rules = _lr_mult_rules(optim_cfg.get("lr_mult", ()), collection)
  if rules:
    parts.append(_scale_by_path(rules))
  tx = optax.chain(*parts)
  pattern = str(optim_cfg.get("frozen", "") or "")
  if pattern:
    tx = optax.multi_transform({TRAINED: tx, FROZEN: optax.set_to_zero()},
                               lambda params: freeze_labels(params, pattern))
  return tx, sched


def make_optimizers(config, collections) -> dict[str, tuple[optax.GradientTransformation,
                                                            optax.Schedule]]:
  """{collection: (transformation, schedule)} for every collection a task declares.

  Raises:
    ValueError: a collection without `config.optim.<collection>` settings.
  """
  out = {}
  for name in collections:
    if name not in config.optim:
      raise ValueError(f"parameter collection {name!r} has no optimizer settings: add "
                       f"config.optim.{name} (lr, b1, b2, eps, weight_decay, ...)")
    out[name] = make_optimizer(config.optim[name], int(config.num_steps), name)
  return out
