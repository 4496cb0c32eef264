"""BERT WordPiece vocabulary for the synthetic corpus, and the tokenizer loader.

Everything is local: the tokenizer is built from a `vocab.txt`, never from the hub.
"""
from __future__ import annotations

import collections
import os
import string
from collections.abc import Iterable

from tokenizers import normalizers, pre_tokenizers

from vlp_jax.data import synthetic

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # ids 0..4 in our vocabs

# Words prompt templates and evaluation code use on top of the captions.
_EXTRA_WORDS = ("a", "an", "the", "one", "of", "video", "footage", "photo", "picture", "image",
                "clip", "shape", "shapes", "object", "what", "which", "is", "does", "do",
                "how", "many", "color", "colour", "size", "motion", "yes", "no",
                "portrait", "good")  # + PEM's prompt templates (data/entities.py)


def synthetic_vocab_words() -> list[str]:
  """Every word the synthetic "moving shapes" captions, labels and prompts can contain."""
  words = list(synthetic.caption_words()) + list(_EXTRA_WORDS)
  return list(dict.fromkeys(w.lower() for w in words))


def write_vocab(path: str, words: Iterable[str]) -> int:
  """Writes a BERT WordPiece `vocab.txt`.

  Order: [PAD] (id 0), [UNK], [CLS], [SEP], [MASK], then the given words (lowercased,
  deduplicated), then every printable ASCII letter/digit/punctuation character and its
  `##` continuation, so any lowercase ASCII text tokenises without [UNK].

  Returns:
    The vocabulary size.
  """
  chars = string.ascii_lowercase + string.digits + string.punctuation
  tokens = list(SPECIAL_TOKENS)
  tokens += [w.strip().lower() for w in words if w.strip()]
  tokens += list(chars) + ["##" + c for c in string.ascii_lowercase + string.digits]
  tokens = list(dict.fromkeys(tokens))
  for t in tokens:
    if any(ch.isspace() for ch in t):
      raise ValueError(f"vocab token {t!r} contains whitespace")
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write("\n".join(tokens) + "\n")
  os.replace(tmp, path)
  return len(tokens)


def vocab_words(texts: Iterable[str], max_words: int | None = None,
                min_count: int = 1) -> list[str]:
  """The words of `texts` as the BERT tokenizer splits them before WordPiece, for `write_vocab`.

  Splitting: lowercased, accents stripped, split at whitespace and punctuation (each
  punctuation character is a word). Words longer than 100 characters are dropped (BERT turns
  them into [UNK] anyway).

  Returns:
    Distinct words seen at least `min_count` times, most frequent first (ties alphabetical),
    at most `max_words` of them.
  """
  norm = normalizers.BertNormalizer(lowercase=True, strip_accents=True, clean_text=True,
                                    handle_chinese_chars=True)
  pre = pre_tokenizers.BertPreTokenizer()
  counts = collections.Counter()
  for t in texts:
    counts.update(w for w, _ in pre.pre_tokenize_str(norm.normalize_str(t)) if len(w) <= 100)
  words = sorted((w for w, c in counts.items() if c >= min_count),
                 key=lambda w: (-counts[w], w))
  return words if max_words is None else words[:max_words]


def load_tokenizer(vocab_path: str):
  """Loads a lowercasing BERT WordPiece tokenizer from a local `vocab.txt`, or any
  `transformers` tokenizer from a local directory (`save_pretrained`, e.g. CLIP's BPE for
  MAMA's CLIP backbone), offline.

  Returns:
    `transformers.BertTokenizerFast` (in transformers 5 an alias of the tokenizers-backed
    `BertTokenizer`), or the directory's tokenizer; `len(tok)` is the vocabulary size.

  Raises:
    FileNotFoundError: `vocab_path` does not exist.
    ValueError: a tokenizer directory without a padding token.
  """
  if os.path.isdir(vocab_path):
    from transformers import AutoTokenizer  # noqa: PLC0415  (slow import)
    tok = AutoTokenizer.from_pretrained(vocab_path, local_files_only=True)
    if tok.pad_token_id is None:
      raise ValueError(f"tokenizer {vocab_path!r} has no padding token; captions are padded "
                       "to data.max_text_len")
    return tok
  if not os.path.isfile(vocab_path):
    raise FileNotFoundError(f"tokenizer vocabulary {vocab_path!r} not found (set data.vocab to "
                            "a vocab.txt or a tokenizer directory, or generate the synthetic "
                            "corpus which writes DIR/vocab.txt)")
  from transformers import BertTokenizerFast  # noqa: PLC0415  (slow import)
  with open(vocab_path, encoding="utf-8") as f:
    vocab = {}
    for i, line in enumerate(f):  # BERT: the id is the line number
      vocab.setdefault(line.rstrip("\n"), i)
  # transformers 5 takes the vocabulary as `vocab` and silently ignores `vocab_file`;
  # transformers 4 only knows `vocab_file`. Check which one took effect.
  tok = BertTokenizerFast(vocab=vocab, do_lower_case=True)
  if len(tok) != len(vocab):
    tok = BertTokenizerFast(vocab_file=vocab_path, do_lower_case=True)
  if len(tok) != len(vocab) or tok.pad_token_id is None or tok.mask_token_id is None:
    raise ValueError(f"could not build a BERT tokenizer from {vocab_path!r} "
                     f"({len(vocab)} tokens, tokenizer has {len(tok)})")
  return tok
