"""Video QA: accuracy, answer vocabulary, QA head and loss, synthetic questions, QA batches."""
import io
import json
import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from PIL import Image

from configs import alpro_qa
from vlp_jax import losses
from vlp_jax.data import answers, pipeline, records, synthetic, text, tokenizer
from vlp_jax.eval.qa import qa_accuracy
from vlp_jax.models.alpro import ALPRO, alpro_config

# ------------------------------------------------------------------------------ accuracy


def test_accuracy_counts_oov_wrong_vs_numpy():
  rng = np.random.default_rng(0)
  n, k = 50, 7
  logits = rng.normal(size=(n, k)).astype(np.float32)
  pred = logits.argmax(1)
  answer = np.where(rng.random(n) < 0.5, pred, rng.integers(0, k, n))  # ~half right
  answer[rng.random(n) < 0.2] = -1                                      # out of vocabulary
  valid = rng.random(n) < 0.9
  want = 100.0 * np.sum((pred == answer) & (answer >= 0) & valid) / np.sum(valid)
  assert qa_accuracy(logits, answer, valid) == pytest.approx(want, abs=1e-9)
  assert qa_accuracy(jnp.asarray(logits), jnp.asarray(answer)) == pytest.approx(
      100.0 * np.mean((pred == answer) & (answer >= 0)))
  # Every answer OOV: nothing can be right, even though argmax "matches" index -1 never.
  assert qa_accuracy(logits, np.full(n, -1)) == 0.0
  assert qa_accuracy(logits, pred) == 100.0


def test_accuracy_errors():
  logits = np.zeros((4, 3), np.float32)
  with pytest.raises(ValueError, match=r"\[N, K\]"):
    qa_accuracy(np.zeros(4), np.zeros(4, int))
  with pytest.raises(ValueError, match="shape"):
    qa_accuracy(logits, np.zeros(3, int))
  with pytest.raises(ValueError, match="integer"):
    qa_accuracy(logits, np.zeros(4))
  with pytest.raises(ValueError, match="K=3"):
    qa_accuracy(logits, np.array([0, 1, 2, 3]))
  with pytest.raises(ValueError, match="no valid"):
    qa_accuracy(logits, np.zeros(4, int), np.zeros(4, bool))


# --------------------------------------------------------------------- answer vocabulary


def test_answer_vocab_top_k_ties_alphabetical():
  raw = ["red", "Blue", "blue ", "green", "red", b"cat", "dog", "  ", "bird", "green", "Red"]
  # red 3, blue 2, green 2, then bird/cat/dog 1 each; "" is not an answer.
  assert answers.top_k(raw, 3) == ["red", "blue", "green"]
  assert answers.top_k(raw, 5) == ["red", "blue", "green", "bird", "cat"]
  assert answers.top_k(raw, 100) == ["red", "blue", "green", "bird", "cat", "dog"]
  assert answers.top_k(list(reversed(raw)), 5) == answers.top_k(raw, 5)  # order-free
  index = {a: i for i, a in enumerate(answers.top_k(raw, 2))}
  np.testing.assert_array_equal(answers.indices(["RED", "blue", "green", ""], index),
                                [0, 1, -1, -1])
  assert answers.normalize("  Red   Circle ") == "red circle"
  with pytest.raises(ValueError, match=">= 1"):
    answers.top_k(raw, 0)


def _write_qa_corpus(d, clips):
  """Hand-made records: `clips` = list of (questions, answers); 2-frame 16 px clips."""
  buf = io.BytesIO()
  Image.fromarray(np.full((16, 16, 3), 120, np.uint8)).save(buf, format="JPEG")
  jpeg = buf.getvalue()
  for split in ("train", "test"):
    with records.ShardedWriter(d, split, 1) as w:
      for i, (qs, ans) in enumerate(clips):
        w.write(records.clip_example(f"{split}{i}", [jpeg, jpeg], ["a caption"], 4.0,
                                     questions=qs, answers=ans))
  tokenizer.write_vocab(os.path.join(d, "vocab.txt"), tokenizer.synthetic_vocab_words())


CLIPS = [
    (["what colour is the circle?", "what shape is red?"], ["red", "circle"]),
    ([], []),  # no questions: never a QA example
    (["how many shapes are there?", "what colour is the star?", "what size is the red star?"],
     ["one", "Red", "small"]),
    (["which way does the red star move?"], ["left"]),
    (["what object moves left?"], ["red star"]),
]


def test_answer_vocab_file_built_once_and_reused(tmp_path):
  data, work = str(tmp_path / "data"), str(tmp_path / "work")
  _write_qa_corpus(data, CLIPS)
  vocab = answers.load_or_build(work, data, "train", 2)
  assert vocab == ["red", "circle"]  # red x2; then circle/left/one/red star/small, alphabetical
  saved = json.load(open(os.path.join(work, answers.FILENAME)))
  assert saved["answers"] == vocab and saved["k"] == 2 and saved["num_questions"] == 7
  assert saved["train_coverage"] == pytest.approx(3 / 7)
  # Read back, not rebuilt: a changed file is what later runs use.
  json.dump(dict(saved, answers=["x", "y"]), open(os.path.join(work, answers.FILENAME), "w"))
  assert answers.load_or_build(work, data, "train", 2) == ["x", "y"]
  with pytest.raises(ValueError, match="num_answers=2"):
    answers.load_or_build(work, data, "train", 3)


# ------------------------------------------------------------------------- QA batches


def _loader(d, split, training, vocab, batch_size=3):
  cfg = alpro_qa.get_config("tiny").data
  cfg.update(shuffle_buffer=8, max_text_len=16)
  tok = tokenizer.load_tokenizer(os.path.join(d, "vocab.txt"))
  return tok, pipeline.Loader(cfg, split, batch_size=batch_size, training=training, seed=0,
                              tokenizer=tok, num_frames=2, image_size=16, data_dir=d,
                              answer_vocab=vocab)


def _question(tok, ids):
  return tok.decode([i for i in ids if i not in tok.all_special_ids]).replace(" ?", "?")


def test_eval_batches_one_example_per_question(tmp_path):
  d = str(tmp_path)
  _write_qa_corpus(d, CLIPS)
  vocab = ["red", "circle", "left"]
  tok, loader = _loader(d, "test", False, vocab)
  batches = list(loader)
  assert len(batches) == 3  # 7 questions in batches of 3, the last padded
  valid = np.concatenate([b["valid"] for b in batches])
  np.testing.assert_array_equal(valid, [True] * 7 + [False] * 2)
  idx = np.concatenate([b["answer_idx"] for b in batches])
  # red, circle | one (OOV), Red -> red, small (OOV) | left | red star (OOV) | padding
  np.testing.assert_array_equal(idx, [0, 1, -1, 0, -1, 2, -1, -1, -1])
  ids = np.concatenate([b["text_ids"] for b in batches])
  want = [q for qs, _ in CLIPS for q in qs]
  assert [_question(tok, r) for r in ids[:7]] == want
  vids = np.concatenate([b["video_id"] for b in batches])
  assert list(vids[:7]) == [b"test0", b"test0", b"test2", b"test2", b"test2", b"test3",
                            b"test4"]
  assert set(batches[0]) >= {"video", "text_ids", "text_mask", "answer_idx", "valid"}
  assert batches[0]["answer_idx"].dtype == np.int32


def test_train_batches_pair_each_question_with_its_answer(tmp_path):
  d = str(tmp_path)
  _write_qa_corpus(d, CLIPS)
  vocab = answers.top_k([a for _, ans in CLIPS for a in ans], 4)
  tok, loader = _loader(d, "train", True, vocab, batch_size=4)
  truth = {q: answers.normalize(a) for qs, ans in CLIPS for q, a in zip(qs, ans)}
  seen = set()
  for _ in range(6):
    b = next(loader)
    assert b["valid"].all()
    for ids, i in zip(b["text_ids"], b["answer_idx"]):
      q = _question(tok, ids)
      seen.add(q)
      a = truth[q]  # every text is one of the questions (never the caption)
      assert i == (vocab.index(a) if a in vocab else -1), (q, a, i)
  assert len(seen) >= 4  # random question per clip visit


# -------------------------------------------------------------------- QA head and loss


def test_qa_loss_vs_numpy_ignores_oov():
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(6, 5)).astype(np.float32)
  idx = np.array([2, -1, 0, 4, -1, 1])
  ce, weight, m = losses.qa_loss(jnp.asarray(logits), jnp.asarray(idx))
  logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
  want = np.where(idx >= 0, -logp[np.arange(6), np.maximum(idx, 0)], 0.0)
  np.testing.assert_allclose(np.asarray(ce), want, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(weight), idx >= 0)
  known = idx >= 0
  assert float(m["qa/train_acc"]) == pytest.approx(
      np.mean(logits.argmax(1)[known] == idx[known]))
  with pytest.raises(ValueError, match="answer_idx"):
    losses.qa_loss(jnp.asarray(logits), jnp.asarray(idx[:3]))


def test_qa_head_params_names_and_math():
  c = alpro_qa.get_config("tiny")
  c.model.num_answers = 5
  model = ALPRO(alpro_config(c.model, 40))
  video = jnp.zeros((2, 2, 32, 32, 3))
  ids = jnp.ones((2, 16), jnp.int32)
  mask = jnp.ones((2, 16), jnp.int32)
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), video, ids, mask)
  flat = traverse_util.flatten_dict(
      variables["params"], sep="/", is_leaf=lambda _, x: isinstance(x, nn.LogicallyPartitioned))
  d = c.model.text.hidden
  assert flat["qa_head/dense/kernel"].names == ("embed", "mlp")
  assert flat["qa_head/dense/kernel"].value.shape == (d, 2 * d)
  assert flat["qa_head/out/kernel"].names == ("mlp", "classes")
  assert flat["qa_head/out/kernel"].value.shape == (2 * d, 5)
  params = nn.unbox(variables)["params"]
  fused = jax.random.normal(jax.random.PRNGKey(1), (3, 7, d))
  got = model.apply({"params": params}, fused, method=ALPRO.qa_logits)
  h = params["qa_head"]
  x = np.asarray(fused[:, 0])
  hid = np.maximum(x @ np.asarray(h["dense"]["kernel"]) + np.asarray(h["dense"]["bias"]), 0)
  want = hid @ np.asarray(h["out"]["kernel"]) + np.asarray(h["out"]["bias"])
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
  # No head without answers (a pre-training checkpoint has none).
  c.model.num_answers = 0
  shapes = jax.eval_shape(ALPRO(alpro_config(c.model, 40)).init, jax.random.PRNGKey(0), video,
                          ids, mask)
  assert "qa_head" not in shapes["params"]
  with pytest.raises(ValueError, match="num_answers"):
    c.model.num_answers = -1
    alpro_config(c.model, 40)


def test_qa_task_needs_answers():
  from vlp_jax.core import task as task_lib
  from vlp_jax.data.setup import TextInfo
  c = alpro_qa.get_config("tiny")
  c.model.num_answers = 0
  with pytest.raises(ValueError, match="num_answers"):
    task_lib.build(c, TextInfo(None, 40))


# ---------------------------------------------------------------- synthetic questions


def _check_answer(q, a, objects):
  """The answer a question about `objects` must have, from the attributes alone."""
  by_verb = {v: m for m, (verbs, _) in synthetic.MOTION_PHRASES.items() for v in verbs}
  if q == "how many shapes are there?":
    return a == synthetic.COUNT_WORDS[len(objects)]
  if m := re.fullmatch(r"what colour is the (\w+)\?", q):
    return [o["colour"] for o in objects if o["shape"] == m[1]] == [a]
  if (m := re.fullmatch(r"what shape is (\w+)\?", q)) and m[1] in synthetic.COLOURS:
    return [o["shape"] for o in objects if o["colour"] == m[1]] == [a]
  for pattern, attr in ((r"what size is the (\w+) (\w+)\?", "size"),
                        (r"what does the (\w+) (\w+) do\?", "action"),
                        (r"which way does the (\w+) (\w+) move\?", "motion")):
    if m := re.fullmatch(pattern, q):
      (o,) = [o for o in objects if (o["colour"], o["shape"]) == (m[1], m[2])]
      if attr == "action":  # only asked for non-directional motions
        return a == synthetic.ACTION_ANSWERS[o["motion"]]
      return a == o[attr]
  m = re.fullmatch(r"what (colour is the shape that|shape|object) (.+)\?", q)
  movers = [o for o in objects if o["motion"] == by_verb[m[2]]]
  assert len(movers) == 1, (q, objects)  # unambiguous
  o = movers[0]
  return a == {"colour is the shape that": o["colour"], "shape": o["shape"],
               "object": f"{o['colour']} {o['shape']}"}[m[1]]


def test_synthetic_questions_follow_the_attributes():
  heldout = synthetic.heldout_pairs(0)
  tok_words = set(tokenizer.synthetic_vocab_words())
  kinds = set()
  for i in range(200):
    rng = np.random.default_rng([5, i])
    objects = synthetic._objects(rng, "train" if i % 4 else "test_unseen", heldout)
    qs, ans = synthetic.question_answers(rng, objects)
    assert len(qs) == len(ans) == synthetic.QUESTIONS_PER_CLIP
    assert len(set(qs)) == len(qs)
    for q, a in zip(qs, ans):
      assert _check_answer(q, a, objects), (q, a, objects)
      assert set(q.rstrip("?").split()) <= tok_words, q
      kinds.add(q.split()[1])
  assert kinds >= {"colour", "size", "way", "does", "shape", "many", "object"}


def test_synthetic_records_hold_aligned_questions(tmp_path):
  clip = synthetic.render_clip(0, "train", 3, 4, 32, synthetic.heldout_pairs(0))
  ex = records.example_to_dict(synthetic.clip_record(clip, 4))
  qs = [q.decode() for q in ex[records.QUESTIONS]]
  assert qs == clip["questions"] and [a.decode() for a in ex[records.ANSWERS]] == clip["answers"]
  objects = json.loads(ex["synthetic/attributes"][0])
  assert all(_check_answer(q, a, objects) for q, a in zip(clip["questions"], clip["answers"]))
  # Questions tokenise without [UNK] with the corpus vocabulary.
  tokenizer.write_vocab(str(tmp_path / "vocab.txt"), tokenizer.synthetic_vocab_words())
  tok = tokenizer.load_tokenizer(str(tmp_path / "vocab.txt"))
  ids, _ = text.tokenize(tok, qs, 16)
  assert tok.unk_token_id not in ids
