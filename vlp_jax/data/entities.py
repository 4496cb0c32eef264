"""The entity vocabulary of PEM: frequent nouns of a caption corpus, and the prompt templates.

ALPRO's entities are the top-K (1000) nouns of the pre-training captions. Nouns are found by,
in order of preference (`method="auto"`):
  1. spaCy with `en_core_web_sm` (noun lemmas), when both are installed;
  2. NLTK's `pos_tag` (tags NN / NNS), when NLTK and its tagger data are installed;
  3. the fallback, `frequency`: every word of two or more letters that is not in a built-in
     list of function words (articles, pronouns, prepositions, conjunctions, auxiliaries,
     numbers, common adverbs and directions), common adjectives (colours, sizes, ...), common
     verbs with their inflections, and not a word ending in -ing / -ly / -ed (verb and adverb
     forms) unless it is a known noun of that shape ("ring", "building", "family").
     It is a filter, not a tagger: a word used mostly as a noun but listed as a verb ("walk",
     "drink") is dropped, and colour nouns ("orange" the fruit) too.
A user list (`candidates`) restricts the count to the given nouns.
In every method plural forms are merged into the singular when both occur ("shapes" ->
"shape"), and media words that name the recording rather than its content ("video",
"footage", "photo", ...) are dropped.

No TensorFlow at module level; reading TFRecord captions imports it.
"""
from __future__ import annotations

import collections
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence

# ALPRO's prompt templates (official code): entity features are the mean of the normalised
# text features of all 12 prompts, one set for video batches and one for image batches.
VIDEO_TEMPLATES = (
    "A footage of a {}.", "A footage of the {}.", "A footage of one {}.",
    "A video of a {}.", "A video of the {}.", "A video of one {}.",
    "A portrait of a {}.", "A portrait of the {}.", "A portrait of one {}.",
    "A video footage of a {}.", "A video footage of the {}.", "A video footage of one {}.",
)
IMAGE_TEMPLATES = (
    "A photo of a {}.", "A photo of the {}.", "A photo of one {}.",
    "A picture of a {}.", "A picture of the {}.", "A picture of one {}.",
    "A good photo of the {}.", "A good photo of a {}.", "A good photo of one {}.",
    "A good picture of the {}.", "A good picture of a {}.", "A good picture of one {}.",
)

METHODS = ("auto", "spacy", "nltk", "frequency")

MEDIA_WORDS = frozenset("""
video footage clip image photo photograph picture shot stock view frame screen timelapse
closeup hd 4k slow motion camera
""".split())

_FUNCTION_WORDS = frozenset("""
a an the this that these those some any each every all both either neither no not nor
i me my mine we us our ours you your yours he him his she her hers it its they them their theirs
myself yourself himself herself itself ourselves themselves one ones someone something anyone
anything everyone everything nobody nothing somebody everybody other others another such
what which who whom whose where when why how whether
and or but so yet if then than because while although though as
of in on at by for with without within into onto upon from to toward towards through across
over under above below between among around about against along beside besides behind
beyond near off out up down inside outside during before after since until till via per
next past like unlike throughout underneath
is are was were be been being am do does did done doing have has had having will would shall
should can could may might must ought
there here very too also just only even still again already always never often sometimes
now then soon later once twice more most less least much many few several lot lots
quite rather really almost maybe perhaps together away back forward forwards backward
backwards left right upward upwards downward downwards leftward leftwards rightward
rightwards sideways ahead apart aside else ever instead yes okay
two three four five six seven eight nine ten hundred thousand first second third last
""".split())

_ADJECTIVES = frozenset("""
red green blue yellow purple orange pink cyan magenta black white grey gray brown golden
silver dark light bright pale colorful colourful
small large big little huge tiny giant long short tall wide narrow thick thin high low
good bad new old young beautiful pretty nice happy sad angry empty full hot cold warm cool
fresh clean dirty wet dry fast slow quick heavy soft hard round flat
open closed same different whole entire other real main great best better top bottom
middle front rear upper lower single double multiple various many close
bigger smaller larger taller longer shorter higher wider biggest smallest largest tallest
longest highest
""".split())

_VERB_BASES = """
move slide travel drift rise float fall sink go grow expand swell shrink contract rotate spin
turn stay remain get stand rest walk run sit play jump dance sing talk speak eat drink cook
ride drive fly swim hold look watch see make take give put cut wash pour fill throw catch
kick hit push pull carry climb wave smile laugh cry read write work use wear appear become
begin start stop keep come leave enter exit pass roll bounce flow shine blow burn sail surf
hug kiss shake stir mix chop slice peel type lie lay try want need seem let help show
""".split()

# Irregular forms the suffix rules below miss.
_IRREGULAR_VERBS = frozenset("""
is are was were been being am has had does did done goes went gone got gotten made took
taken came saw seen fell fallen rose risen sank sunk grew grown shrank shrunk spun stood
sat ran swam flew flown held put cut hit threw thrown caught carried drove driven rode
ridden ate eaten drank drunk sang sung spoke spoken wrote written wore worn began begun
kept left brought thought told said gave given lay lain shook shaken blew blown
""".split())

# Nouns that end like a verb or adverb form.
_NOUN_EXCEPTIONS = frozenset("""
ring rings thing things king kings string strings building buildings ceiling ceilings
morning mornings evening evenings wedding weddings painting paintings clothing swing swings
wing wings spring springs sibling siblings pudding puddings earring earrings railing
railings awning awnings lightning icing frosting dumpling dumplings duckling ducklings
seedling seedlings stocking stockings viking vikings herring
family lily jelly belly rally bully ally holly butterfly dragonfly firefly assembly
seabed riverbed watershed bobsled
""".split())

_WORD_RE = re.compile(r"[a-z]+(?:'[a-z]+)?")


def _inflections(base: str) -> set[str]:
  """base, -s/-es/-ies, -ed/-d/-ied and -ing forms of a regular verb (with e-drop and the
  final-consonant doubling of short verbs)."""
  out = {base}
  if base.endswith("y") and base[-2:-1] not in "aeiou":
    out |= {base[:-1] + "ies", base[:-1] + "ied", base + "ing"}
  elif base.endswith(("s", "sh", "ch", "x", "z", "o")):
    out |= {base + "es", base + "ed", base + "ing"}
  else:
    out |= {base + "s", base + "ed", base + "ing"}
  if base.endswith("e"):
    out |= {base + "d", base[:-1] + "ing"}
  if (len(base) <= 4 and len(base) >= 3 and base[-1] not in "aeiouwxy"
      and base[-2] in "aeiou" and base[-3] not in "aeiou"):
    out |= {base + base[-1] + "ed", base + base[-1] + "ing"}
  return out


_VERB_FORMS = frozenset(set().union(*(_inflections(v) for v in _VERB_BASES)) | _IRREGULAR_VERBS)
STOP_WORDS = frozenset(_FUNCTION_WORDS | _ADJECTIVES | _VERB_FORMS | MEDIA_WORDS)


def words(caption: str) -> list[str]:
  """Lowercase words of a caption (letters and inner apostrophes)."""
  return _WORD_RE.findall(caption.lower())


def is_fallback_noun(word: str) -> bool:
  """The `frequency` fallback's test: could `word` (lowercase) be a content noun?"""
  if len(word) < 2 or "'" in word or word in STOP_WORDS:
    return False
  if word in _NOUN_EXCEPTIONS:
    return True
  if word.endswith(("ing", "ly")):
    return False
  return not (word.endswith("ed") and len(word) > 4 and not word.endswith("eed"))


def _frequency_nouns(captions: Iterable[str]) -> Iterator[list[str]]:
  for c in captions:
    yield [w for w in words(c) if is_fallback_noun(w)]


def _spacy_nouns(captions: Iterable[str]) -> Iterator[list[str]]:
  import spacy  # noqa: PLC0415  (optional)
  nlp = spacy.load("en_core_web_sm", disable=["parser", "ner"])
  for doc in nlp.pipe((c.lower() for c in captions), batch_size=256):
    yield [t.lemma_ for t in doc if t.pos_ == "NOUN" and t.lemma_.isalpha()]


def _nltk_nouns(captions: Iterable[str]) -> Iterator[list[str]]:
  import nltk  # noqa: PLC0415  (optional)
  for c in captions:
    yield [w for w, tag in nltk.pos_tag(words(c)) if tag in ("NN", "NNS") and w.isalpha()]


def _available(method: str) -> bool:
  try:
    if method == "spacy":
      import spacy  # noqa: PLC0415  (optional)
      spacy.load("en_core_web_sm", disable=["parser", "ner"])
    elif method == "nltk":
      import nltk  # noqa: PLC0415  (optional)
      nltk.pos_tag(["test"])  # LookupError without the tagger data
    return True
  except (ImportError, OSError, LookupError):
    return False


def resolve_method(method: str = "auto") -> str:
  """The noun finder to use: `method` itself, or for "auto" the first available of spacy,
  nltk, frequency.

  Raises:
    ValueError: unknown method, or "spacy" / "nltk" asked for but not installed with its data.
  """
  if method not in METHODS:
    raise ValueError(f"entity method {method!r} not in {METHODS}")
  if method == "auto":
    return next(m for m in ("spacy", "nltk", "frequency") if m == "frequency" or _available(m))
  if method != "frequency" and not _available(method):
    need = "spacy and its en_core_web_sm model" if method == "spacy" else (
        "nltk and its averaged_perceptron_tagger data")
    raise ValueError(f"entity method {method!r} needs {need}; use method='frequency'")
  return method


def _singular_of(word: str, known) -> str:
  """The singular of a plural `word` when that singular is in `known`, else `word`."""
  for suffix, add in (("ies", "y"), ("es", ""), ("s", "")):
    if word.endswith(suffix) and len(word) > len(suffix) + 1:
      base = word[:-len(suffix)] + add
      if base in known:
        return base
  return word


def count_nouns(captions: Iterable[str], method: str = "auto",
                candidates: Sequence[str] | None = None) -> tuple[collections.Counter, str]:
  """Counts the nouns of `captions`.

  Args:
    captions: caption strings.
    method: one of METHODS (see the module docstring).
    candidates: if given, only these words (lowercased, and their plurals) are counted,
      found as plain words; `method` is then not used.

  Returns:
    (Counter noun -> occurrences, the method used: "list" with candidates).
  """
  if candidates is not None:
    wanted = {c.strip().lower() for c in candidates if c.strip()}
    counts = collections.Counter()
    for c in captions:
      counts.update(n for n in (_singular_of(w, wanted) for w in words(c)) if n in wanted)
    used = "list"
  else:
    used = resolve_method(method)
    finder: Callable[[Iterable[str]], Iterator[list[str]]] = {
        "spacy": _spacy_nouns, "nltk": _nltk_nouns, "frequency": _frequency_nouns}[used]
    counts = collections.Counter()
    for nouns in finder(captions):
      counts.update(w.lower() for w in nouns)
  for w in list(counts):
    if w in MEDIA_WORDS:
      del counts[w]
  merged = collections.Counter()
  present = {w for w, n in counts.items() if n}
  for w, n in counts.items():
    merged[_singular_of(w, present)] += n
  return merged, used


def top_entities(captions: Iterable[str], k: int, method: str = "auto",
                 candidates: Sequence[str] | None = None, min_count: int = 1
                 ) -> tuple[list[tuple[str, int]], str]:
  """The `k` most frequent nouns (ties broken alphabetically) with their counts.

  Returns:
    ([(noun, count), ...] of at most k entries with count >= min_count, method used).
  """
  if k < 1:
    raise ValueError(f"number of entities must be >= 1, got {k}")
  counts, used = count_nouns(captions, method, candidates)
  ranked = sorted(((w, n) for w, n in counts.items() if n >= min_count),
                  key=lambda wn: (-wn[1], wn[0]))
  return ranked[:k], used


# ------------------------------------------------------------------------------ captions
def read_captions(source: str, splits: Sequence[str] = ("train",)) -> Iterator[str]:
  """Captions of a corpus.

  Args:
    source: a data directory of TFRecord shards (captions in `caption/string`, every caption
      of every clip of `splits`), a `.jsonl` file (per line an object with `caption`,
      `captions` or `text`: a string or a list of strings), or a text file (one caption per
      line).
    splits: split names when `source` is a directory.

  Raises:
    FileNotFoundError: `source` does not exist or has no files for a split.
    ValueError: a jsonl line without a caption field.
  """
  if os.path.isdir(source):
    yield from _tfrecord_captions(source, splits)
    return
  if not os.path.isfile(source):
    raise FileNotFoundError(f"caption source {source!r} is neither a data directory nor a file")
  with open(source, encoding="utf-8") as f:
    if source.endswith(".jsonl"):
      for i, line in enumerate(f, 1):
        if not line.strip():
          continue
        obj = json.loads(line)
        value = next((obj[k] for k in ("caption", "captions", "text") if k in obj), None)
        if value is None:
          raise ValueError(f"{source}:{i}: no 'caption', 'captions' or 'text' field")
        yield from ([value] if isinstance(value, str) else value)
    else:
      for line in f:
        if line.strip():
          yield line.strip()


def _tfrecord_captions(data_dir: str, splits: Sequence[str]) -> Iterator[str]:
  import tensorflow as tf  # noqa: PLC0415  lazy: only this reader needs it
  from vlp_jax.data import records  # noqa: PLC0415  (imports tensorflow)
  files = [f for s in splits for f in records.split_files(data_dir, s)]
  spec = {records.CAPTIONS: tf.io.RaggedFeature(tf.string)}
  ds = tf.data.TFRecordDataset(files).map(
      lambda s: tf.io.parse_single_sequence_example(s, context_features=spec)[0][
          records.CAPTIONS], num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  for caps in ds.as_numpy_iterator():
    for c in caps:
      yield c.decode("utf-8", "replace")


# ------------------------------------------------------------------------------- files
def write_entities(path: str, entities: Sequence[str]) -> None:
  """Writes one entity per line (atomically)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write("".join(f"{e}\n" for e in entities))
  os.replace(tmp, path)


def load_entities(path: str, k: int) -> list[str]:
  """The first `k` entities of a file with one entity per line.

  A line may carry more after the entity ("dog 1234"); only its first word is used, so
  ALPRO-style "noun count" lists load too.

  Raises:
    FileNotFoundError: no such file. ValueError: fewer than `k` entities or a duplicate.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"entity file {path!r} not found (build one with "
                            "`python -m launch.entities`, or set pem.entities)")
  with open(path, encoding="utf-8") as f:
    names = [line.split()[0].lower() for line in f if line.strip()]
  if len(names) < k:
    raise ValueError(f"entity file {path!r} has {len(names)} entities, pem.num_entities asks "
                     f"for {k}")
  names = names[:k]
  dup = [n for n, c in collections.Counter(names).items() if c > 1]
  if dup:
    raise ValueError(f"entity file {path!r} lists {dup[:5]} more than once")
  return names


def prompts(entities: Sequence[str], templates: Sequence[str]) -> list[str]:
  """Template-major prompt texts: index `t * K + k` is template t filled with entity k."""
  return [t.format(e) for t in templates for e in entities]
