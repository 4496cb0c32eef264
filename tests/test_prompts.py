"""Prompt vectors around class names (vlp_jax/models/prompts.py) against a naive per-class
construction, and the CLIP text tower's pooling at the explicit EOT index."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlp_jax.models import clip, prompts

WORDS = ["circle", "moving", "left", "right", "square", "growing", "a", "video", "of",
         "slowly", "triangle"]
SOT, EOT, PAD, VOCAB = 20, 21, 0, 24
L = 16


class _Tokenizer:
  """The part of a CLIP tokenizer the prompt builder uses: word-level ids, SOT / EOT / pad."""
  bos_token_id, eos_token_id, pad_token_id = SOT, EOT, PAD

  def __call__(self, texts, add_special_tokens=True):
    assert not add_special_tokens
    return {"input_ids": [[1 + WORDS.index(w) for w in t.split()] for t in texts]}


NAMES = ["circle moving left", "square", "a triangle growing slowly", "right"]


def _clip():
  cfg = clip.ClipConfig(
      text=clip.ClipTextConfig(vocab_size=VOCAB, hidden=32, layers=2, heads=2, mlp_dim=64,
                               max_position=L, eos_token_id=EOT, bos_token_id=SOT,
                               pad_token_id=PAD),
      vision=clip.ClipVisionConfig(image_size=16, patch_size=8, hidden=32, layers=1, heads=2,
                                   mlp_dim=64),
      projection_dim=16)
  model = clip.CLIP(cfg)
  params = nn.unbox(model.init(jax.random.PRNGKey(0), np.zeros((1, 16, 16, 3), np.float32),
                               np.zeros((1, L), np.int32))["params"])
  return model, params


@pytest.mark.parametrize("layout", ["shared", "official"])
def test_prompt_insertion_and_eot_pooling_match_a_naive_per_class_loop(layout):
  p, q = 2, 3
  tokens = prompts.build_prompt_tokens(_Tokenizer(), NAMES, p, q, context_length=L,
                                       layout=layout)
  model, params = _clip()
  learner = prompts.PromptLearner(tokens.table_rows, 32)
  lp = learner.init(jax.random.PRNGKey(1), jnp.zeros((len(NAMES), L, 32)), tokens.slot)
  table = np.asarray(nn.unbox(lp)["params"]["prompts"])
  assert table.shape == ((p + q, 32) if layout == "shared" else (L, 32))
  assert 0.005 < table.std() < 0.02  # N(0, 0.01)

  emb = model.apply({"params": params}, jnp.asarray(tokens.ids), method=clip.CLIP.embed_tokens)
  got = np.asarray(learner.apply(lp, emb, jnp.asarray(tokens.slot)))
  words = np.asarray(params["text_model"]["embeddings"]["token_embedding"]["embedding"])
  got_feat = np.asarray(model.apply({"params": params}, jnp.asarray(got),
                                    jnp.asarray(tokens.eot_index),
                                    method=clip.CLIP.encode_text_embeds))
  for c, name in enumerate(NAMES):
    name_ids = [1 + WORDS.index(w) for w in name.split()]
    n = len(name_ids)
    if layout == "shared":
      pre, suf = table[:p], table[p:p + q]
    else:  # rows by absolute position
      pre, suf = table[1:1 + p], table[1 + p + n:1 + p + n + q]
    rows = ([words[SOT]] + list(pre) + [words[t] for t in name_ids] + list(suf) + [words[EOT]])
    rows += [words[PAD]] * (L - len(rows))
    np.testing.assert_allclose(got[c], np.stack(rows), rtol=1e-6, err_msg=name)
    assert tokens.eot_index[c] == 1 + p + n + q and tokens.ids[c, tokens.eot_index[c]] == EOT
    assert tokens.mask[c].sum() == 2 + p + n + q
    # One class alone, pooled at its EOT, gives the same feature as the batch.
    one = np.asarray(model.apply({"params": params}, jnp.asarray(np.stack(rows))[None],
                                 jnp.asarray([1 + p + n + q]),
                                 method=clip.CLIP.encode_text_embeds))
    np.testing.assert_allclose(got_feat[c], one[0], rtol=1e-5, atol=1e-6)


def test_zero_prompts_equal_the_clip_text_tower():
  tokens = prompts.build_prompt_tokens(_Tokenizer(), NAMES, 0, 0, context_length=L)
  model, params = _clip()
  learner = prompts.PromptLearner(tokens.table_rows, 32)
  lp = learner.init(jax.random.PRNGKey(1), jnp.zeros((len(NAMES), L, 32)), tokens.slot)
  emb = model.apply({"params": params}, jnp.asarray(tokens.ids), method=clip.CLIP.embed_tokens)
  ours = model.apply({"params": params}, learner.apply(lp, emb, jnp.asarray(tokens.slot)),
                     jnp.asarray(tokens.eot_index), method=clip.CLIP.encode_text_embeds)
  plain = model.apply({"params": params}, jnp.asarray(tokens.ids),
                      method=clip.CLIP.encode_text)
  np.testing.assert_array_equal(np.asarray(ours), np.asarray(plain))
  assert (tokens.slot == -1).all()


def test_bad_inputs_name_the_problem():
  with pytest.raises(ValueError, match=r"'a triangle growing slowly' has 4 tokens.*only 3"):
    prompts.build_prompt_tokens(_Tokenizer(), NAMES, 4, 5, context_length=14)
  with pytest.raises(ValueError, match="layout"):
    prompts.build_prompt_tokens(_Tokenizer(), NAMES, 1, 1, layout="nope")


def test_template_checks_its_single_slot():
  assert prompts.check_template("a video of a {}.") == "a video of a {}."
  assert prompts.check_template("{}").format("x") == "x"
  for bad in ("a video", "{} and {}", "a {0}", "a {} }"):
    with pytest.raises(ValueError, match="exactly one"):
      prompts.check_template(bad)
