"""Learned prompt vectors around class names (or sentences) for a frozen CLIP text tower.

Each class's text is `[SOT] p_1 .. p_P <name tokens> q_1 .. q_Q [EOT] [pad ...]`: P learned
vectors before the name and Q after it, shared by every class, in place of token embeddings.
Everything that depends on the names (token ids, which position takes which vector, the EOT
position) is built once on the host (`build_prompt_tokens`); the module only gathers.

Two layouts of the learned table:
  "shared"   (default) P + Q vectors: prefix vector i at slot i, suffix vector j at slot j,
             whatever the name's length.
  "official" one table of `context_length` rows indexed by absolute position, as the official
             Efficient-Prompt code does: the suffix slots of a long name read other rows than
             those of a short name.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

LAYOUTS = ("shared", "official")


def check_template(template: str) -> str:
  """A hand-written template around the class name ("a video of a {}."), returned as is.

  The learned vectors go around the templated text; with P = Q = 0 the template alone is the
  zero-shot baseline of Radford et al.
  Raises:
    ValueError: the template does not hold exactly one "{}" (and no other braces).
  """
  if template.count("{}") != 1 or template.replace("{}", "").count("{") or \
      template.replace("{}", "").count("}"):
    raise ValueError(f"a prompt template holds the class name as exactly one '{{}}' and no "
                     f"other braces, got {template!r}")
  return template


@dataclasses.dataclass(frozen=True)
class PromptTokens:
  """Host-side arrays for C texts of length L (all numpy int32).

  Attributes:
    ids: [C, L] token ids; prompt slots hold the pad id (their embedding is replaced).
    slot: [C, L] -1 for a real token, else the row of the learned table for that position.
    eot_index: [C] the position of each text's EOT token (where CLIP pools).
    mask: [C, L] 1 up to and including EOT, 0 on padding.
    table_rows: rows of the learned table (P + Q, or L for "official").
  """
  ids: np.ndarray
  slot: np.ndarray
  eot_index: np.ndarray
  mask: np.ndarray
  table_rows: int


def build_prompt_tokens(tokenizer, names: Sequence[str], num_prefix: int, num_suffix: int,
                        context_length: int = 77, layout: str = "shared",
                        kind: str = "class") -> PromptTokens:
  """Token ids, prompt slots and EOT positions of `names` with P / Q prompt vectors.

  Args:
    tokenizer: a CLIP-style `transformers` tokenizer (start and end tokens: `bos_token_id`,
      `eos_token_id`; padding: `pad_token_id`, else the end token).
    names: C class names (or sentences).
    num_prefix, num_suffix: P, Q >= 0.
    context_length: L, the text tower's context (CLIP: 77).
    layout: "shared" or "official" (module docstring).
    kind: what a text is, for the error naming one that does not fit ("class", "caption").
  Raises:
    ValueError: a name whose tokens do not fit (naming it and its token count), a bad layout.
  """
  if layout not in LAYOUTS:
    raise ValueError(f"prompt layout must be one of {LAYOUTS}, got {layout!r}")
  if num_prefix < 0 or num_suffix < 0:
    raise ValueError(f"prompt lengths must be >= 0, got P={num_prefix}, Q={num_suffix}")
  sot, eot = tokenizer.bos_token_id, tokenizer.eos_token_id
  if sot is None or eot is None:
    raise ValueError("the tokenizer has no start / end token (bos_token_id / eos_token_id)")
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eot
  room = context_length - 2 - num_prefix - num_suffix
  c = len(names)
  ids = np.full((c, context_length), pad, np.int32)
  slot = np.full((c, context_length), -1, np.int32)
  eot_index = np.zeros((c,), np.int32)
  mask = np.zeros((c, context_length), np.int32)
  encoded = tokenizer(list(names), add_special_tokens=False)["input_ids"]
  for i, (name, tokens) in enumerate(zip(names, encoded)):
    if len(tokens) > room:
      raise ValueError(f"{kind} {name!r} has {len(tokens)} tokens; with {num_prefix} + "
                       f"{num_suffix} prompt vectors and the start / end tokens only {room} "
                       f"fit in the context of {context_length}")
    n = len(tokens)
    ids[i, 0] = sot
    ids[i, 1 + num_prefix:1 + num_prefix + n] = tokens
    end = 1 + num_prefix + n + num_suffix
    ids[i, end] = eot
    eot_index[i] = end
    mask[i, :end + 1] = 1
    prefix_pos = np.arange(1, 1 + num_prefix)
    suffix_pos = np.arange(1 + num_prefix + n, end)
    if layout == "shared":
      slot[i, prefix_pos] = np.arange(num_prefix)
      slot[i, suffix_pos] = num_prefix + np.arange(num_suffix)
    else:  # the row is the absolute position
      slot[i, prefix_pos] = prefix_pos
      slot[i, suffix_pos] = suffix_pos
  rows = num_prefix + num_suffix if layout == "shared" else context_length
  return PromptTokens(ids, slot, eot_index, mask, rows)


class PromptLearner(nn.Module):
  """The learned prompt table, inserted into token embeddings at the prompt slots.

  Attributes:
    table_rows: `PromptTokens.table_rows`.
    dim: the text tower's width.
    init_std: N(0, init_std) init of the vectors (Ju et al.: 0.01).
  """
  table_rows: int
  dim: int
  init_std: float = 0.01

  @nn.compact
  def __call__(self, token_embeds: jax.Array, slot: jax.Array) -> jax.Array:
    """token_embeds float `[C, L, D]` (of `PromptTokens.ids`), slot int `[C, L]` ->
    `[C, L, D]` with the learned vectors at the prompt slots (same dtype)."""
    table = self.param("prompts", nn.with_logical_partitioning(
        nn.initializers.normal(self.init_std), ("prompts", "embed")),
        (max(self.table_rows, 1), self.dim), jnp.float32)
    if not self.table_rows:
      return token_embeds
    learned = jnp.take(table, jnp.maximum(slot, 0), axis=0).astype(token_embeds.dtype)
    return jnp.where((slot >= 0)[..., None], learned, token_embeds)
