"""Caption tokenisation and BERT masked-language-model masking, in numpy.

No tensorflow here: the random (device benchmark) data source uses `mlm_mask` too.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

IGNORE_LABEL = -100  # label of positions the MLM loss ignores


def tokenize(tokenizer, captions: Sequence[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
  """Tokenises a batch of captions as `[CLS] tokens [SEP] [PAD]...` (BERT; other tokenizers
  add their own start / end tokens, e.g. CLIP's).

  Args:
    tokenizer: a (fast) `transformers` tokenizer.
    captions: B strings.
    max_len: L; longer captions are truncated (keeping [SEP] last), shorter ones padded.

  Returns:
    (ids, mask): int32 [B, L] token ids and int32 [B, L] attention mask (1 = real token).
  """
  enc = tokenizer(list(captions), padding="max_length", truncation=True, max_length=max_len,
                  return_attention_mask=True, return_token_type_ids=False)
  ids = np.asarray(enc["input_ids"], np.int32).reshape(len(captions), max_len)
  mask = np.asarray(enc["attention_mask"], np.int32).reshape(len(captions), max_len)
  return ids, mask


def mlm_mask(ids: np.ndarray, mask: np.ndarray, rng: np.random.Generator, *, vocab_size: int,
             mask_id: int | None, special_ids: Sequence[int],
             prob: float = 0.15) -> tuple[np.ndarray, np.ndarray]:
  """BERT masking: choose tokens with `prob`; of those 80 % [MASK], 10 % random, 10 % kept.

  Special tokens ([CLS], [SEP], [PAD], ...) and padding positions are never chosen; random
  replacements are never special tokens. The rng draws a fixed amount per call, so the
  result depends only on the rng state and the input shapes.

  Args:
    ids: int [B, L] token ids.
    mask: int/bool [B, L] attention mask (0 = padding).
    rng: numpy Generator.
    vocab_size: size of the vocabulary.
    mask_id: id of [MASK]; None (a tokenizer without one, e.g. CLIP's): no masking, every
      label -100.
    special_ids: ids that are never chosen nor used as random replacements.
    prob: probability of choosing each eligible token.

  Returns:
    (mlm_ids, labels): int32 [B, L] ids with the replacements, and int32 [B, L] labels =
    the original id at chosen positions, -100 elsewhere.
  """
  ids = np.asarray(ids, np.int32)
  if mask_id is None:
    return ids.copy(), np.full(ids.shape, IGNORE_LABEL, np.int32)
  special = np.asarray(sorted(set(int(s) for s in special_ids)), np.int32)
  eligible = (np.asarray(mask) != 0) & ~np.isin(ids, special)
  choose = eligible & (rng.random(ids.shape) < prob)
  kind = rng.random(ids.shape)
  candidates = np.setdiff1d(np.arange(vocab_size, dtype=np.int32), special)
  random_ids = candidates[rng.integers(0, len(candidates), size=ids.shape)]
  mlm_ids = np.where(choose & (kind < 0.8), np.int32(mask_id), ids)
  mlm_ids = np.where(choose & (kind >= 0.8) & (kind < 0.9), random_ids, mlm_ids)
  labels = np.where(choose, ids, np.int32(IGNORE_LABEL))
  return mlm_ids.astype(np.int32), labels.astype(np.int32)
