"""MAMA's caption augmentation: keyframes, the grid, post-processing, captioners (incl. tiny
random transformers models built here), the resumable side-file driver and the training
loader's extra captions."""
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from configs import alpro_pretrain
from vlp_jax.core import task as task_lib
from vlp_jax.data import pipeline, records, setup, tokenizer
from vlp_jax.methods.mama import augment, captioners, keyframes

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _segments_clip(seed=0, segment=10, size=16):
  """40 frames: 4 constant-colour segments (cuts at 10, 20, 30) plus pixel noise."""
  rng = np.random.default_rng(seed)
  colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (220, 220, 220)]
  frames = np.concatenate([np.broadcast_to(np.array(c, np.float32), (segment, size, size, 3))
                           for c in colours])
  frames = frames + rng.normal(0, 4, frames.shape)
  return np.clip(frames, 0, 255).astype(np.uint8)


def test_difference_finds_the_cuts():
  idx = keyframes.select(_segments_clip(), 12, "difference")
  assert idx.shape == (12,) and list(idx) == sorted(set(idx.tolist()))
  assert {10, 20, 30} <= set(idx.tolist())


def test_density_peak_picks_one_frame_per_segment():
  idx = keyframes.select(_segments_clip(), 4, "density_peak")
  assert sorted((idx // 10).tolist()) == [0, 1, 2, 3]
  assert list(keyframes.select(_segments_clip(), 4, "uniform")) == [5, 15, 25, 35]


@pytest.mark.parametrize("method", keyframes.METHODS)
def test_short_and_static_clips(method):
  short = _segments_clip(segment=1)[:3]  # 3 frames < k: every frame, repeated, sorted
  idx = keyframes.select(short, 12, method)
  assert idx.shape == (12,) and set(idx.tolist()) == {0, 1, 2}
  assert list(idx) == sorted(idx)
  static = np.full((20, 8, 8, 3), 90, np.uint8)  # no peaks: evenly spaced frames fill in
  idx = keyframes.select(static, 12, method)
  assert len(set(idx.tolist())) == 12 and list(idx) == sorted(idx)


def test_select_errors():
  with pytest.raises(ValueError, match="density_peak"):
    keyframes.select(_segments_clip(), 12, "kmeans")
  with pytest.raises(ValueError, match="N, H, W, 3"):
    keyframes.select(np.zeros((4, 8, 8), np.uint8), 12)


def test_grid_is_row_major():
  h, w = 2, 3
  frames = np.stack([np.full((h, w, 3), 10 * i, np.uint8) for i in range(12)])
  g = keyframes.grid(frames)
  assert g.shape == (3 * h, 4 * w, 3) and g.dtype == np.uint8
  for i in range(12):
    r, c = i // 4, i % 4
    assert (g[r * h:(r + 1) * h, c * w:(c + 1) * w] == 10 * i).all()
  with pytest.raises(ValueError, match="12"):
    keyframes.grid(frames[:11])


def test_postprocess():
  p = captioners.DEFAULT_PROMPT
  raw = f"USER: <image>\n{p} ASSISTANT:  The Image shows a picture of two images and imagery. "
  assert captioners.postprocess(raw, p) == "The Video shows a video of two videos and imagery."
  assert captioners.postprocess("Pictures of a cat", p) == "Videos of a cat"
  long = " ".join(f"w{i}" for i in range(60))
  assert captioners.postprocess(long, p).split() == [f"w{i}" for i in range(40)]
  assert captioners.postprocess("   ", p) == ""


# ------------------------------------------------------------------------------ the driver
def _jpeg(array):
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format="JPEG", quality=95)
  return buf.getvalue()


def _level(k):
  return 20 + 35 * k  # clip k's grey level: a captioner can tell clips apart from pixels


@pytest.fixture(scope="module")
def clips_dir(tmp_path_factory):
  """6 clips `c0`..`c5` of 14 frames (16 x 16, grey level `_level(k)` with a moving bar)."""
  d = str(tmp_path_factory.mktemp("clips"))
  with records.ShardedWriter(d, "train", 2) as w:
    for k in range(6):
      frames = []
      for t in range(14):
        x = np.full((16, 16, 3), _level(k), np.uint8)
        x[:, t % 16] = 255 - _level(k)
        frames.append(_jpeg(x))
      w.write(records.clip_example(f"c{k}", frames, [f"clip {k}"], 2.0))
  return d


def _lines(path):
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def test_skips_are_counted_and_listed(clips_dir, tmp_path):
  def fn(image, prompt):
    assert prompt == "say it"
    k = round((np.asarray(image, np.float32).mean() - 20) / 35)  # the bar barely moves it
    if k == 2:
      raise RuntimeError("model crashed")
    return "" if k == 4 else f"a picture of clip {k}"

  out = str(tmp_path / "caps.jsonl")
  cap = captioners.CallableCaptioner(fn, name="fn")
  s = augment.augment(clips_dir, "train", cap, out_path=out, batch_size=4, prompt="say it",
                      keyframe_method="uniform", progress=False)
  assert (s["captioned"], s["skipped"], s["already_done"], s["total"]) == (4, 2, 0, 6)
  rows = {r["video_id"]: r for r in _lines(out)}
  assert sorted(rows) == ["c0", "c1", "c3", "c5"]
  assert rows["c3"]["caption"] == "a video of clip 3"
  assert rows["c3"]["captioner"] == "fn" and rows["c3"]["prompt"] == "say it"
  assert rows["c3"]["seed"] == 0 and len(rows["c3"]["keyframes"]) == 12
  skipped = {r["video_id"]: r["reason"] for r in _lines(s["skipped_file"])}
  assert skipped.keys() == {"c2", "c4"}
  assert "RuntimeError: model crashed" in skipped["c2"] and skipped["c4"] == "empty caption"


def test_resume_after_limit_and_truncated_line(clips_dir, tmp_path):
  out = str(tmp_path / "caps.jsonl")
  cap = captioners.TemplateCaptioner()
  kw = dict(out_path=out, batch_size=2, progress=False)
  first = augment.augment(clips_dir, "train", cap, limit=2, **kw)
  assert (first["captioned"], first["total"]) == (2, 2)
  with open(out, "a", encoding="utf-8") as f:
    f.write('{"video_id": "c5", "capt')  # an interrupted write
  second = augment.augment(clips_dir, "train", cap, **kw)
  assert (second["captioned"], second["already_done"], second["skipped"]) == (4, 2, 0)
  ids = [r["video_id"] for r in _lines(out)]
  assert sorted(ids) == [f"c{k}" for k in range(6)]
  again = augment.augment(clips_dir, "train", cap, **kw)
  assert (again["captioned"], again["already_done"]) == (0, 6)
  # Same pixels, same text; every clip gets its own.
  assert len({r["caption"] for r in _lines(out)}) > 1
  assert setup.read_captions(out)["c1"] == [r["caption"] for r in _lines(out)
                                               if r["video_id"] == "c1"]


def test_build_specs_and_errors(tmp_path):
  assert isinstance(captioners.build("template"), captioners.TemplateCaptioner)
  cap = captioners.build("vlp_jax.methods.mama.keyframes:grid")
  assert isinstance(cap, captioners.CallableCaptioner)
  assert cap.name == "vlp_jax.methods.mama.keyframes:grid"
  with pytest.raises(ValueError, match="no_such_module"):
    captioners.build("no_such_module:fn")
  missing = str(tmp_path / "no_model")
  with pytest.raises(FileNotFoundError, match="no_model"):
    captioners.build(missing)
  empty = tmp_path / "empty"
  empty.mkdir()
  (empty / "weights.bin").write_bytes(b"")
  with pytest.raises(ValueError, match="empty.*no config.json.*weights.bin"):
    captioners.build(str(empty))
  bert = tmp_path / "bert"
  bert.mkdir()
  (bert / "config.json").write_text(json.dumps(dict(model_type="bert",
                                                    architectures=["BertModel"])))
  with pytest.raises(ValueError, match="bert.*not an image-captioning model.*'bert'"):
    captioners.build(str(bert))


# ------------------------------------------------------------------ tiny transformers models
WORDS = "a the red green blue square circle moves left right up down video".split()


def _word_tokenizer(specials, **kwargs):
  import transformers
  from tokenizers import Tokenizer, models, pre_tokenizers
  vocab = {w: i for i, w in enumerate(specials + WORDS)}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  return transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, pad_token="[PAD]", bos_token="[BOS]", eos_token="[EOS]",
      unk_token="[UNK]", **kwargs), len(vocab)


def _quiet_generation(gen, eos=2):
  """Ids 0 [PAD], 1 [BOS], 2 [EOS], 3 [UNK]: at least 2 words, never a special but EOS."""
  gen.update(decoder_start_token_id=1, bos_token_id=1, pad_token_id=0, eos_token_id=eos,
             min_new_tokens=2, suppress_tokens=[0, 1, 3])


@pytest.fixture(scope="module")
def ved_dir(tmp_path_factory):
  """A random ViT + GPT-2 VisionEncoderDecoderModel (image-to-text) with its tokenizer and
  image processor, saved like a hub checkpoint."""
  import transformers
  d = str(tmp_path_factory.mktemp("ved"))
  tok, vocab_size = _word_tokenizer(["[PAD]", "[BOS]", "[EOS]", "[UNK]"])
  enc = transformers.ViTConfig(image_size=32, patch_size=16, hidden_size=32, num_hidden_layers=1,
                               num_attention_heads=2, intermediate_size=64)
  dec = transformers.GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=1, n_head=2,
                                n_positions=64, add_cross_attention=True, is_decoder=True,
                                bos_token_id=1, eos_token_id=2, pad_token_id=0)
  config = transformers.VisionEncoderDecoderConfig.from_encoder_decoder_configs(enc, dec)
  config.update(dict(decoder_start_token_id=1, pad_token_id=0, eos_token_id=2))
  model = transformers.VisionEncoderDecoderModel(config=config)
  _quiet_generation(model.generation_config)
  model.save_pretrained(d)
  tok.save_pretrained(d)
  transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(d)
  return d


def _grids(n):
  rng = np.random.default_rng(0)
  return [rng.integers(0, 255, (48, 64, 3), dtype=np.uint8) for _ in range(n)]


def test_transformers_image_to_text(ved_dir, clips_dir, tmp_path):
  cap = captioners.TransformersCaptioner(ved_dir, max_new_tokens=6)
  assert cap.task == "image-to-text" and cap.name == os.path.basename(ved_dir)
  grids = _grids(2)
  a = cap(grids, prompt=captioners.DEFAULT_PROMPT, seed=0)
  assert len(a) == 2 and all(isinstance(t, str) and t.split() for t in a)
  assert cap(grids, prompt=captioners.DEFAULT_PROMPT, seed=0) == a
  out = str(tmp_path / "caps.jsonl")
  s = augment.augment(clips_dir, "train", cap, out_path=out, batch_size=4,
                      keyframe_method="density_peak", progress=False)
  assert (s["captioned"], s["skipped"]) == (6, 0)
  rows = _lines(out)
  assert {r["captioner"] for r in rows} == {cap.name}
  assert all(set(r["caption"].split()) <= set(WORDS) for r in rows)


def test_transformers_image_text_to_text_chat(tmp_path):
  """A random LLaVA (CLIP vision + Llama text) with a chat template: the prompt goes in."""
  import transformers
  d = str(tmp_path / "llava")
  tok, vocab_size = _word_tokenizer(["[PAD]", "[BOS]", "[EOS]", "[UNK]", "<image>"],
                                    extra_special_tokens={"image_token": "<image>"})
  vision = transformers.CLIPVisionConfig(image_size=32, patch_size=16, hidden_size=32,
                                         intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, projection_dim=32)
  text = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=1, num_attention_heads=2,
                                  num_key_value_heads=2, max_position_embeddings=128,
                                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
  config = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_id=4,
                                    vision_feature_layer=-1,
                                    vision_feature_select_strategy="default")
  model = transformers.LlavaForConditionalGeneration(config)
  _quiet_generation(model.generation_config)
  model.generation_config.suppress_tokens = [0, 1, 3, 4]
  model.save_pretrained(d)
  template = ("{% for m in messages %}USER: {% for c in m['content'] %}{% if c['type'] == "
              "'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %} "
              "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")
  image_processor = transformers.CLIPImageProcessor(size={"shortest_edge": 32},
                                                    crop_size={"height": 32, "width": 32})
  transformers.LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=16,
                              vision_feature_select_strategy="default", chat_template=template,
                              num_additional_image_tokens=1).save_pretrained(d)
  cap = captioners.build(d, max_new_tokens=5)
  assert cap.task == "image-text-to-text"
  grids = _grids(2)
  a = cap(grids, prompt="describe the video", seed=3)
  assert len(a) == 2 and all(set(t.split()) <= set(WORDS) and t.split() for t in a)
  assert cap(grids, prompt="describe the video", seed=3) == a


# ------------------------------------------------------------------------- training side
def _vocab_dir(tmp_path):
  d = str(tmp_path)
  with open(os.path.join(d, "vocab.txt"), "w", encoding="utf-8") as f:
    f.write("\n".join(SPECIALS + ["alpha", "beta", "gamma"]) + "\n")
  frames = [_jpeg(np.full((16, 16, 3), 80, np.uint8))] * 2
  with records.ShardedWriter(d, "train", 1) as w:
    w.write(records.clip_example("v0", frames, ["alpha"], 2.0))
    w.write(records.clip_example("v1", frames, ["gamma"], 2.0))
  return d


def _first_words(loader, tok, batches):
  seen = {}
  for _ in range(batches):
    b = next(loader)
    for vid, ids in zip(b["video_id"], b["text_ids"]):
      seen.setdefault(vid.decode(), set()).add(tok.convert_ids_to_tokens(int(ids[1])))
  return seen


def test_loader_draws_extra_captions_in_training_only(tmp_path):
  d = _vocab_dir(tmp_path)
  tok = tokenizer.load_tokenizer(os.path.join(d, "vocab.txt"))
  cfg = alpro_pretrain.get_config("tiny").data
  cfg.update(shuffle_buffer=4, max_text_len=8)
  kw = dict(batch_size=2, seed=0, tokenizer=tok, num_frames=2, image_size=16, data_dir=d)
  extra = {"v0": ["beta"], "unknown": ["gamma"]}
  train = pipeline.Loader(cfg, "train", training=True, extra_captions=extra, **kw)
  assert _first_words(train, tok, 12) == {"v0": {"alpha", "beta"}, "v1": {"gamma"}}
  plain = pipeline.Loader(cfg, "train", training=True, **kw)
  assert _first_words(plain, tok, 6) == {"v0": {"alpha"}, "v1": {"gamma"}}
  ev = pipeline.Loader(cfg, "train", training=False, extra_captions=extra, **kw)
  assert _first_words(ev, tok, 1) == {"v0": {"alpha"}, "v1": {"gamma"}}


def test_stream_loader_reads_config_side_files(tmp_path):
  d = _vocab_dir(tmp_path)
  side = os.path.join(d, "train.captions.jsonl")
  with open(side, "w", encoding="utf-8") as f:
    f.write(json.dumps(dict(video_id="v1", caption="beta")) + "\n")
  c = alpro_pretrain.get_config("tiny")
  c.data.update(dir=d, image_size=16, extra_captions=f"{side}, {side}")
  text = setup.text_info(c, d)
  loader = setup.stream_loader(c, d, text, task_lib.Stream(), 2)
  assert _first_words(loader, text.tokenizer, 12)["v1"] == {"beta", "gamma"}
  c.data.extra_captions = os.path.join(d, "missing.jsonl")
  with pytest.raises(FileNotFoundError, match="missing.jsonl"):
    setup.stream_loader(c, d, text, task_lib.Stream(), 2)
