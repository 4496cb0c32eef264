"""Entity vocabulary: noun extraction (fallback, user list, tagger hook), files, templates."""
import json
import os
import subprocess
import sys
import types

import pytest

from configs import alpro_pretrain
from vlp_jax.data import entities, synthetic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CAPTIONS = [
    "a man is riding a horse on the beach",
    "two dogs are playing with a ball in the park",
    "a woman cooking pasta in a kitchen",
    "close up of a dog running on the beach",
    "aerial view of the city at night",
    "a man walks his dog in the park",
    "the horse eats grass quickly",
    "stock footage of a woman smiling",
    "a tall building in the city",
    "a ring on a table",
    "people dancing at a wedding",
    "the clouds moved slowly over the mountains",
]


def test_fallback_keeps_nouns_and_drops_verbs_adjectives_and_media_words():
  counts, method = entities.count_nouns(CAPTIONS, "frequency")
  assert method == "frequency"
  top, _ = entities.top_entities(CAPTIONS, 7, "frequency")
  assert top[0] == ("dog", 3)  # "dogs" merged into "dog"
  assert {w for w, _ in top} == {"dog", "beach", "horse", "man", "park", "city", "woman"}
  assert all(n == 2 for _, n in top[1:])
  # A plural stays plural when its singular never occurs.
  for noun in ("ring", "building", "wedding", "kitchen", "pasta", "grass", "mountains", "clouds"):
    assert counts[noun] == 1, noun
  for word in ("riding", "playing", "cooking", "running", "walks", "eats", "smiling",
               "dancing", "moved", "quickly", "slowly", "tall", "two", "footage", "stock",
               "view", "close", "the", "his", "on", "dogs"):
    assert word not in counts, word


def test_user_list_counts_only_its_nouns():
  top, method = entities.top_entities(CAPTIONS, 10, candidates=["Dog", "horse", "cat"])
  assert method == "list"
  assert top == [("dog", 3), ("horse", 2)]


def test_tagger_hook_uses_nltk_when_available(monkeypatch):
  tags = {"man": "NN", "dogs": "NNS", "dog": "NN", "horse": "NN", "riding": "VBG"}
  fake = types.SimpleNamespace(pos_tag=lambda ws: [(w, tags.get(w, "DT")) for w in ws])
  monkeypatch.setitem(sys.modules, "nltk", fake)
  monkeypatch.setitem(sys.modules, "spacy", None)  # import fails
  assert entities.resolve_method("auto") == "nltk"
  counts, method = entities.count_nouns(["a man riding a horse", "two dogs and a dog"])
  assert method == "nltk"
  assert counts == {"man": 1, "horse": 1, "dog": 2}
  with pytest.raises(ValueError, match="spacy"):
    entities.resolve_method("spacy")
  with pytest.raises(ValueError, match="not in"):
    entities.resolve_method("tagger")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("shapes"))
  synthetic.ensure(path, alpro_pretrain.get_config("tiny").data.synthetic)
  return path


def test_synthetic_entities_are_the_shape_nouns(corpus):
  with open(os.path.join(corpus, synthetic.ENTITIES_FILE)) as f:
    listed = f.read().split()
  assert listed == list(synthetic.SHAPES)
  assert entities.load_entities(os.path.join(corpus, "entities.txt"), 8) == listed
  # The fallback finds exactly these as the top-8 nouns of the video and image captions.
  captions = list(entities.read_captions(corpus, ["train", synthetic.IMAGE_SPLIT]))
  assert len(captions) == 3 * (64 + 32)
  top, _ = entities.top_entities(captions, 8, "frequency")
  assert {w for w, _ in top} == set(synthetic.SHAPES)


def test_cli_writes_one_entity_per_line(tmp_path):
  src = tmp_path / "caps.jsonl"
  with open(src, "w") as f:
    for i, c in enumerate(CAPTIONS):
      f.write(json.dumps({"caption": c} if i % 2 else {"captions": [c]}) + "\n")
  out = tmp_path / "ents.txt"
  r = subprocess.run([sys.executable, "-m", "launch.entities", f"--source={src}",
                      f"--out={out}", "--top_k=3", "--method=frequency"],
                     cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stderr[-2000:]
  assert out.read_text().split("\n") == ["dog", "beach", "city", ""]
  assert "3 entities (frequency)" in r.stdout and "dog (3)" in r.stdout


def test_caption_files_and_errors(tmp_path):
  txt = tmp_path / "caps.txt"
  txt.write_text("a dog\n\n  a cat  \n")
  assert list(entities.read_captions(str(txt))) == ["a dog", "a cat"]
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"caption": "a dog"}\n{"title": "x"}\n')
  with pytest.raises(ValueError, match="bad.jsonl:2"):
    list(entities.read_captions(str(bad)))
  with pytest.raises(FileNotFoundError, match="nowhere"):
    list(entities.read_captions(str(tmp_path / "nowhere")))
  with pytest.raises(ValueError, match=">= 1"):
    entities.top_entities(CAPTIONS, 0)


def test_entity_file_loading(tmp_path):
  path = tmp_path / "e.txt"
  path.write_text("Dog 120\ncat 80\n\nhorse\n")  # ALPRO-style "noun count" lines load too
  assert entities.load_entities(str(path), 2) == ["dog", "cat"]
  assert entities.load_entities(str(path), 3) == ["dog", "cat", "horse"]
  with pytest.raises(ValueError, match="has 3 entities"):
    entities.load_entities(str(path), 4)
  path.write_text("dog\ncat\ndog\n")
  with pytest.raises(ValueError, match="more than once"):
    entities.load_entities(str(path), 3)
  with pytest.raises(FileNotFoundError, match="launch.entities"):
    entities.load_entities(str(tmp_path / "none.txt"), 1)
  entities.write_entities(str(tmp_path / "w" / "x.txt"), ["a", "b"])
  assert (tmp_path / "w" / "x.txt").read_text() == "a\nb\n"


def test_prompt_templates():
  assert len(entities.VIDEO_TEMPLATES) == len(entities.IMAGE_TEMPLATES) == 12
  assert len(set(entities.VIDEO_TEMPLATES + entities.IMAGE_TEMPLATES)) == 24
  assert "A video footage of one {}." in entities.VIDEO_TEMPLATES
  assert "A good picture of a {}." in entities.IMAGE_TEMPLATES
  p = entities.prompts(["dog", "cat"], entities.VIDEO_TEMPLATES[:2])
  assert p == ["A footage of a dog.", "A footage of a cat.", "A footage of the dog.",
               "A footage of the cat."]
  # Every template word is in the synthetic vocabulary (no word-piece fallback).
  from vlp_jax.data import tokenizer
  vocab = set(tokenizer.synthetic_vocab_words())
  words = {w for t in entities.VIDEO_TEMPLATES + entities.IMAGE_TEMPLATES
           for w in t.lower().replace("{}.", "").split()}
  assert words <= vocab, words - vocab
