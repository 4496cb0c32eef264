"""A CLIP tokenizer trained on a corpus's own captions: no model hub.

`build_clip_tokenizer` learns byte-level BPE merges with the `tokenizers` library under CLIP's
text rules (NFC, whitespace collapsed, lowercased; CLIP's word regex, then bytes as unicode
characters; `</w>` ends every word) and lays the vocabulary out as openai's CLIP does:

  ids 0..255     the 256 byte characters (GPT-2's byte -> unicode order)
  ids 256..511   the same characters + `</w>`
  then           one token per merge, in merge order
  last two       `<|startoftext|>` (SOT), `<|endoftext|>` (EOT; also padding and unknown)

The directory holds openai's vocab.json and merges.txt and what
`transformers.CLIPTokenizerFast(...).save_pretrained` writes (tokenizer.json,
tokenizer_config.json), so `AutoTokenizer.from_pretrained(dir, local_files_only=True)` and
`vlp_jax.data.tokenizer.load_tokenizer(dir)` load it as they load openai's CLIP tokenizer:
`[SOT] tokens [EOT] [EOT]...`, at most `model_max_length` (77) ids.

`ensure_clip_tokenizer` builds DATA_DIR/clip_tokenizer/ from a corpus's training splits when it
is missing (called by `vlp_jax.data.setup.resolve_dir` for configs with `data.clip_tokenizer`).
"""
from __future__ import annotations

import inspect
import json
import os
import shutil
from collections.abc import Iterable, Sequence

TOKENIZER_DIR = "clip_tokenizer"  # under the data directory
SOT, EOT = "<|startoftext|>", "<|endoftext|>"
END_OF_WORD = "</w>"
CONTEXT_LENGTH = 77  # CLIP's text context (model_max_length)
OPENAI_VOCAB_SIZE = 49408
# The byte characters, their `</w>` forms, SOT and EOT: the vocabulary before any merge.
MIN_VOCAB_SIZE = 2 * 256 + 2
BUILD_FILE = "clip_tokenizer.json"  # how the directory was built (sizes, splits)


def bytes_to_unicode() -> dict[int, str]:
  """GPT-2's (and CLIP's) reversible byte -> printable unicode character map, in vocab order:
  the printable Latin-1 bytes keep their character, the other 68 map to U+0100 onwards."""
  keep = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
  chars = list(keep)
  extra = 0
  for b in range(256):
    if b not in keep:
      keep.append(b)
      chars.append(256 + extra)
      extra += 1
  return dict(zip(keep, (chr(c) for c in chars)))


def _learn_merges(texts: Iterable[str], vocab_size: int, min_frequency: int
                  ) -> list[tuple[str, str]]:
  """BPE merges (in order) of `texts` under CLIP's normalizer and pre-tokenizer."""
  from tokenizers import Tokenizer, models, pre_tokenizers, trainers  # noqa: PLC0415
  from transformers import CLIPTokenizerFast  # noqa: PLC0415  (slow import)
  # CLIP's text rules, taken from transformers' own CLIP tokenizer so both always agree.
  rules = CLIPTokenizerFast().backend_tokenizer
  tok = Tokenizer(models.BPE(continuing_subword_prefix="", end_of_word_suffix=END_OF_WORD))
  tok.normalizer = rules.normalizer
  tok.pre_tokenizer = rules.pre_tokenizer
  # Its vocabulary counts the byte characters and their `</w>` forms (<= 512) too, so it
  # learns at least vocab_size - 514 merges unless the corpus runs out of pairs.
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), end_of_word_suffix=END_OF_WORD,
      special_tokens=[])
  tok.train_from_iterator(texts, trainer)
  merges = json.loads(tok.to_str())["model"]["merges"]
  # tokenizers < 0.20 serialises a merge as "a b", later versions as ["a", "b"].
  return [tuple(m.split(" ", 1)) if isinstance(m, str) else (m[0], m[1]) for m in merges]


def _vocab(merges: Sequence[tuple[str, str]], vocab_size: int
           ) -> tuple[dict[str, int], list[tuple[str, str]]]:
  """openai's layout (module docstring) with at most `vocab_size` tokens, and the merges kept."""
  chars = list(bytes_to_unicode().values())
  tokens = chars + [c + END_OF_WORD for c in chars]
  seen = set(tokens)
  kept = []
  for a, b in merges:
    if len(tokens) + 2 >= vocab_size:
      break
    if a not in seen or b not in seen:  # cannot happen for BPE; kept out to stay loadable
      continue
    kept.append((a, b))
    if a + b not in seen:  # two merges can yield the same string: one id
      seen.add(a + b)
      tokens.append(a + b)
  tokens += [SOT, EOT]
  return {t: i for i, t in enumerate(tokens)}, kept


def build_clip_tokenizer(texts: Iterable[str], out_dir: str, vocab_size: int = OPENAI_VOCAB_SIZE,
                         *, min_frequency: int = 2, model_max_length: int = CONTEXT_LENGTH):
  """Trains a CLIP byte-level BPE on `texts` and saves it as a transformers tokenizer directory.

  Args:
    texts: captions (any case: CLIP lowercases).
    out_dir: directory to write (created; existing tokenizer files are replaced).
    vocab_size: at most this many ids (openai's: 49408); a small corpus runs out of pairs
      to merge first and yields fewer. At least `MIN_VOCAB_SIZE` (514).
    min_frequency: a pair is merged only if it occurs at least this often.
    model_max_length: the tokenizer's context length (CLIP: 77).

  Returns:
    The `transformers.CLIPTokenizerFast` that was saved; `len(tok)` is its vocabulary size,
    `tok.eos_token_id == tok.pad_token_id == len(tok) - 1`, `tok.bos_token_id == len(tok) - 2`.

  Raises:
    ValueError: `vocab_size` below `MIN_VOCAB_SIZE`, or no text.
  """
  from transformers import CLIPTokenizerFast  # noqa: PLC0415  (slow import)
  if vocab_size < MIN_VOCAB_SIZE:
    raise ValueError(f"vocab_size={vocab_size} must be >= {MIN_VOCAB_SIZE} (256 byte "
                     "characters, their </w> forms, <|startoftext|> and <|endoftext|>)")
  texts = [t for t in texts if t and t.strip()]
  if not texts:
    raise ValueError("build_clip_tokenizer: no text to learn merges from")
  vocab, merges = _vocab(_learn_merges(texts, vocab_size, min_frequency), vocab_size)
  # openai's vocab.json and merges.txt, for tools (and transformers 4) that read them.
  os.makedirs(out_dir, exist_ok=True)
  vocab_file = os.path.join(out_dir, "vocab.json")
  merges_file = os.path.join(out_dir, "merges.txt")
  with open(vocab_file, "w", encoding="utf-8") as f:
    json.dump(vocab, f, ensure_ascii=False)
  with open(merges_file, "w", encoding="utf-8") as f:
    f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
  if "vocab" in inspect.signature(CLIPTokenizerFast.__init__).parameters:
    tok = CLIPTokenizerFast(vocab=vocab, merges=merges, model_max_length=model_max_length)
  else:  # transformers 4 takes the vocabulary as files only
    tok = CLIPTokenizerFast(vocab_file=vocab_file, merges_file=merges_file,
                            model_max_length=model_max_length)
  if len(tok) != len(vocab) or tok.eos_token_id != vocab[EOT] or tok.bos_token_id != vocab[SOT]:
    raise ValueError(f"transformers built a CLIP tokenizer of {len(tok)} tokens from a "
                     f"vocabulary of {len(vocab)}")
  tok.save_pretrained(out_dir)
  return tok


def ensure_clip_tokenizer(data_dir: str, splits: Sequence[str],
                          vocab_size: int = OPENAI_VOCAB_SIZE) -> bool:
  """Builds DATA_DIR/clip_tokenizer/ from the captions of `splits` unless it is there.

  A directory with a tokenizer_config.json is kept as it is (a run's token ids depend on it);
  delete it to rebuild. The build goes to a temporary directory renamed at the end, so an
  interrupted build is redone.

  Args:
    data_dir: a directory of TFRecord shards (`vlp_jax.data.records`).
    splits: the training splits whose captions the merges are learned from; splits the
      directory does not hold are skipped.
    vocab_size: as `build_clip_tokenizer`.

  Returns:
    Whether it built the tokenizer.

  Raises:
    FileNotFoundError: none of `splits` is in `data_dir`.
  """
  out = os.path.join(data_dir, TOKENIZER_DIR)
  if os.path.isfile(os.path.join(out, "tokenizer_config.json")):
    return False
  from vlp_jax.data import entities, records  # noqa: PLC0415  (imports tensorflow)
  present = set(records.list_splits(data_dir))
  use = [s for s in dict.fromkeys(splits) if s in present]
  if not use:
    raise FileNotFoundError(f"cannot build {out}: {data_dir!r} holds none of the caption "
                            f"splits {list(splits)} (it has {sorted(present)})")
  tmp = out + ".tmp"
  shutil.rmtree(tmp, ignore_errors=True)
  tok = build_clip_tokenizer(entities.read_captions(data_dir, use), tmp, vocab_size)
  with open(os.path.join(tmp, BUILD_FILE), "w", encoding="utf-8") as f:
    json.dump({"splits": use, "max_vocab_size": int(vocab_size), "vocab_size": len(tok)}, f,
              indent=1)
  shutil.rmtree(out, ignore_errors=True)
  os.replace(tmp, out)
  return True
