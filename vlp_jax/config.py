"""Config helpers shared by every `configs/*.py`.

A config file defines `get_config(arg)` where `arg` is `"<preset>[,key=value...]"`, e.g.
`--config=configs/alpro_pretrain.py:tiny,optim.model.lr=3e-4`. Later command-line flags
(`--config.optim.model.lr=...`) are applied by `ml_collections.config_flags` on top.
"""
from __future__ import annotations

import ast
from collections.abc import Callable, Mapping

import ml_collections


class ConfigError(ValueError):
  """A config preset, key or value that cannot be used."""


def parse_arg(arg: str | None, default: str) -> tuple[str, list[tuple[str, str]]]:
  """Splits `"preset,a.b=1,c=x"` into `("preset", [("a.b", "1"), ("c", "x")])`."""
  parts = [p.strip() for p in (arg or "").split(",") if p.strip()]
  preset = default
  if parts and "=" not in parts[0]:
    preset = parts.pop(0)
  overrides = []
  for p in parts:
    if "=" not in p:
      raise ConfigError(f"config override {p!r} is not of the form key=value")
    key, value = p.split("=", 1)
    overrides.append((key.strip(), value.strip()))
  return preset, overrides


def _coerce(key: str, old, text: str):
  """Parses `text` into the type of the existing value `old`."""
  if isinstance(old, bool):
    low = text.lower()
    if low in ("true", "1", "yes"):
      return True
    if low in ("false", "0", "no"):
      return False
    raise ConfigError(f"config key {key!r} expects a bool, got {text!r}")
  if isinstance(old, (int, float, tuple, list)) or old is None:
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      if old is None:
        return text
      raise ConfigError(f"config key {key!r} expects {type(old).__name__}, got {text!r}") from None
    if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
      value = float(value)
    if old is not None and not isinstance(value, type(old)):
      raise ConfigError(f"config key {key!r} expects {type(old).__name__}, got {text!r}")
    return value
  if isinstance(old, str):
    return text
  raise ConfigError(f"config key {key!r} of type {type(old).__name__} cannot be set inline")


def apply_override(config: ml_collections.ConfigDict, key: str, text: str) -> None:
  """Sets dotted `key` of `config` from string `text`, keeping the field's type."""
  node = config
  parts = key.split(".")
  for i, name in enumerate(parts[:-1]):
    if not isinstance(node, ml_collections.ConfigDict) or name not in node:
      raise ConfigError(f"unknown config key {'.'.join(parts[:i + 1])!r} "
                        f"(in override {key}={text})")
    node = node[name]
  leaf = parts[-1]
  if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
    raise ConfigError(f"unknown config key {key!r}")
  node[leaf] = _coerce(key, node[leaf], text)


def build(arg: str | None, presets: Mapping[str, Callable[[ml_collections.ConfigDict], None]],
          base: Callable[[], ml_collections.ConfigDict], default: str = "demo"
          ) -> ml_collections.ConfigDict:
  """Builds `base()`, applies the named preset, then inline overrides.

  Raises:
    ConfigError: unknown preset, unknown key or a value of the wrong type.
  """
  preset, overrides = parse_arg(arg, default)
  if preset not in presets:
    raise ConfigError(f"unknown preset {preset!r}; choose one of {sorted(presets)}")
  config = base()
  presets[preset](config)
  config.preset = preset
  for key, text in overrides:
    apply_override(config, key, text)
  return config
