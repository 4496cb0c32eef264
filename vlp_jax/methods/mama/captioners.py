"""Image captioners for MAMA's caption augmentation, behind one small interface.

A captioner has a `name` (recorded with every caption it writes) and is called on a batch of
grid images:

  captioner(images, prompt=..., seed=...) -> one caption per image

Implementations: `TransformersCaptioner` (a local `transformers` model directory: an
image-to-text model such as a ViT-GPT2 `VisionEncoderDecoderModel`, BLIP or GIT, or an
image-text-to-text chat model such as LLaVA-1.5, MAMA's captioner), `CallableCaptioner` (any
Python function) and `TemplateCaptioner` (deterministic text from the pixels, for tests).
`build` makes one from a command-line spec; `postprocess` cleans a caption as MAMA does.
"""
from __future__ import annotations

import importlib
import json
import os
import re
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import transformers
from PIL import Image

DEFAULT_PROMPT = "In a sentence, describe the process in the video."
MAX_WORDS = 40
TASKS = ("image-to-text", "image-text-to-text")

ImageLike = Image.Image | np.ndarray


@runtime_checkable
class Captioner(Protocol):
  """Captions a batch of images.

  Attributes:
    name: captioner id, written next to each caption in the side file.
  """

  name: str

  def __call__(self, images: Sequence[ImageLike], *, prompt: str, seed: int) -> list[str]:
    """One caption per image (PIL images or uint8 [H, W, 3] arrays)."""
    ...


def _to_pil(image: ImageLike) -> Image.Image:
  if isinstance(image, Image.Image):
    return image.convert("RGB")
  return Image.fromarray(np.asarray(image, np.uint8)).convert("RGB")


# ------------------------------------------------------------------------------ postprocess
_ROLE_LABEL = re.compile(r"^\s*(assistant|answer)\s*:\s*", re.IGNORECASE)
_STILL_WORD = re.compile(r"\b(image|picture)(s?)\b", re.IGNORECASE)


def _to_video(m: re.Match) -> str:
  word = "video" + m.group(2).lower()
  return word.capitalize() if m.group(1)[0].isupper() else word


def postprocess(text: str, prompt: str = DEFAULT_PROMPT, max_words: int = MAX_WORDS) -> str:
  """Cleans a generated caption as MAMA does.

  Drops an echo of `prompt` (and what precedes it, e.g. a chat template's "USER:" turn) and a
  leading "ASSISTANT:" label, writes "image(s)" / "picture(s)" as "video(s)" (whole words,
  first letter's case kept: the captioner saw a grid of frames, the caption describes the
  video), keeps at most `max_words` whitespace-separated words and strips whitespace.

  Returns:
    The cleaned caption; "" when nothing is left.
  """
  text = str(text)
  p = prompt.strip().lower()
  if p:
    at = text.lower().rfind(p)
    if at >= 0:
      text = text[at + len(p):]
  text = _ROLE_LABEL.sub("", text)
  text = _STILL_WORD.sub(_to_video, text)
  return " ".join(text.split()[:max_words]).strip()


# ------------------------------------------------------------------------------ captioners
class CallableCaptioner:
  """Wraps a Python function as a captioner.

  Args:
    fn: `fn(image, prompt) -> str` per image (a PIL image), or with `batched`
      `fn(images, prompt) -> list[str]`.
    name: captioner id; default the function's `module.qualname`.
    batched: `fn` takes the whole batch (also read from an attribute `fn.batched`).
  """

  def __init__(self, fn: Callable[..., Any], name: str | None = None,
               batched: bool | None = None):
    if not callable(fn):
      raise TypeError(f"captioner function must be callable, got {type(fn).__name__}")
    self.fn = fn
    self.name = name or f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', fn)}"
    self.batched = bool(getattr(fn, "batched", False) if batched is None else batched)

  def __call__(self, images: Sequence[ImageLike], *, prompt: str = DEFAULT_PROMPT,
               seed: int = 0) -> list[str]:
    del seed  # a plain function owns its randomness
    images = [_to_pil(im) for im in images]
    if not self.batched:
      return [self.fn(im, prompt) for im in images]
    out = list(self.fn(images, prompt))
    if len(out) != len(images):
      raise ValueError(f"captioner {self.name!r} returned {len(out)} captions for "
                       f"{len(images)} images")
    return out


class TemplateCaptioner:
  """Deterministic captions from an image's mean colour and brightness (tests, dry runs).

  The same pixels always give the same text, whatever the prompt and seed.
  """

  name = "template"
  _COLOURS = ("red", "green", "blue")

  def __call__(self, images: Sequence[ImageLike], *, prompt: str = DEFAULT_PROMPT,
               seed: int = 0) -> list[str]:
    del prompt, seed
    return [self._describe(np.asarray(_to_pil(im), np.float32)) for im in images]

  def _describe(self, x: np.ndarray) -> str:
    mean = x.reshape(-1, 3).mean(axis=0)
    level = float(mean.mean())
    light = "dark" if level < 85 else "dim" if level < 170 else "bright"
    colour = "grey" if mean.max() - mean.min() < 24 else self._COLOURS[int(mean.argmax())]
    half = x.shape[0] // 2
    top, bottom = x[:half].mean(), x[half:].mean()
    where = ("the top brighter" if top > bottom + 8 else
             "the bottom brighter" if bottom > top + 8 else "an even light")
    return f"a {light} {colour} video with {where}"


def _read_json(path: str) -> dict | None:
  if not os.path.isfile(path):
    return None
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _has_chat_template(path: str) -> bool:
  if any(os.path.isfile(os.path.join(path, f))
         for f in ("chat_template.jinja", "chat_template.json")):
    return True
  for name in ("processor_config.json", "tokenizer_config.json"):
    cfg = _read_json(os.path.join(path, name))
    if cfg and cfg.get("chat_template"):
      return True
  return False


def _model_types(mapping: str) -> dict[str, str]:
  """model_type -> class name of a `transformers` auto-model mapping, {} when this version has
  none: IMAGE_TEXT_TO_TEXT (transformers 4 and 5) or VISION_2_SEQ (4 only). Looked up on use,
  as the auto-model module imports torch."""
  return getattr(transformers.models.auto.modeling_auto, f"MODEL_FOR_{mapping}_MAPPING_NAMES", {})


def detect_task(path: str) -> str:
  """The captioning task of a local `transformers` model directory: "image-to-text" or
  "image-text-to-text".

  A `vision-encoder-decoder` model, or one without a chat template, is an image-to-text
  captioner (captions from pixels, no prompt); a model with a chat template (LLaVA-like) is
  prompted through the image-text-to-text pipeline.

  Raises:
    FileNotFoundError: `path` is not a directory.
    ValueError: it has no readable config.json, or its model_type is not an image(+text)-to-text
      generator; the message names the path and what it found.
  """
  if not os.path.isdir(path):
    raise FileNotFoundError(f"captioner model directory {path!r} does not exist")
  try:
    config = _read_json(os.path.join(path, "config.json"))
  except (OSError, ValueError) as e:
    raise ValueError(f"{path!r}: config.json cannot be read: {e}") from e
  if config is None:
    found = sorted(os.listdir(path))[:10]
    raise ValueError(f"{path!r} is not a transformers model directory: no config.json "
                     f"(found {found or 'nothing'})")
  model_type = config.get("model_type")
  if model_type not in {**_model_types("IMAGE_TEXT_TO_TEXT"), **_model_types("VISION_2_SEQ")}:
    raise ValueError(
        f"{path!r} is not an image-captioning model: model_type {model_type!r}, architectures "
        f"{config.get('architectures')}; expected an image-to-text or image-text-to-text model "
        "(e.g. vision-encoder-decoder, blip, git, llava)")
  if model_type == "vision-encoder-decoder" or not _has_chat_template(path):
    return "image-to-text"
  return "image-text-to-text"


class TransformersCaptioner:
  """A local `transformers` image-captioning model, loaded from disk only
  (`local_files_only`: nothing is fetched from the network).

  image-to-text models (vision-encoder-decoder, BLIP, GIT, ...) caption from the pixels alone:
  the prompt is not shown to them. image-text-to-text models (LLaVA-like, with a chat
  template) get one user turn with the image and the prompt, through
  `transformers.pipeline("image-text-to-text")`.

  Args:
    path: model directory (config.json, weights, tokenizer, image processor / processor).
    task: "image-to-text" or "image-text-to-text"; None = `detect_task(path)`.
    max_new_tokens: generation length limit.
    temperature: sampling temperature; 0 = greedy decoding.
    prompt: the default prompt of `__call__`.
    device: torch device string; None = "cuda" when available, else "cpu".

  Raises:
    FileNotFoundError, ValueError: see `detect_task`; ValueError for an unknown task.
  """

  def __init__(self, path: str, *, task: str | None = None, max_new_tokens: int = 40,
               temperature: float = 0.2, prompt: str = DEFAULT_PROMPT, device: str | None = None):
    self.path = os.path.abspath(path)
    detected = detect_task(self.path)
    self.task = task or detected
    if self.task not in TASKS:
      raise ValueError(f"captioner task must be one of {TASKS}, got {self.task!r}")
    self.name = os.path.basename(os.path.normpath(self.path))
    self.max_new_tokens = int(max_new_tokens)
    self.temperature = float(temperature)
    self.prompt = prompt
    self.device = device or ("cuda" if transformers.utils.is_torch_cuda_available() else "cpu")
    model_type = _read_json(os.path.join(self.path, "config.json"))["model_type"]
    auto = (transformers.AutoModelForImageTextToText
            if model_type in _model_types("IMAGE_TEXT_TO_TEXT")
            else transformers.AutoModelForVision2Seq)
    # The checkpoint's own dtype (e.g. float16 LLaVA) on an accelerator; float32 on CPU.
    dtype = {} if self.device == "cpu" else {"dtype": "auto"}
    self._model = auto.from_pretrained(self.path, local_files_only=True, **dtype)
    self._model = self._model.to(self.device).eval()
    if self.task == "image-text-to-text":
      processor = transformers.AutoProcessor.from_pretrained(self.path, local_files_only=True)
      self._chat = getattr(processor, "chat_template", None) is not None
      self._pipe = transformers.pipeline("image-text-to-text", model=self._model,
                                         processor=processor, device=self.device)
    else:
      # transformers 5 has no "image-to-text" pipeline: generate from the pixels directly.
      self._image_processor = transformers.AutoImageProcessor.from_pretrained(
          self.path, local_files_only=True)
      self._tokenizer = transformers.AutoTokenizer.from_pretrained(self.path,
                                                                   local_files_only=True)

  def _generate_kwargs(self) -> dict[str, Any]:
    out = dict(max_new_tokens=self.max_new_tokens, do_sample=self.temperature > 0)
    if self.temperature > 0:
      out["temperature"] = self.temperature
    return out

  def __call__(self, images: Sequence[ImageLike], *, prompt: str | None = None,
               seed: int = 0) -> list[str]:
    """Captions (raw, before `postprocess`) for PIL images or uint8 [H, W, 3] arrays; the
    random state is reset from `seed` first, so the same batch and seed give the same text."""
    prompt = self.prompt if prompt is None else prompt
    images = [_to_pil(im) for im in images]
    if not images:
      return []
    transformers.set_seed(int(seed))
    if self.task == "image-to-text":
      pixels = self._image_processor(images=images, return_tensors="pt")["pixel_values"]
      ids = self._model.generate(pixel_values=pixels.to(self._model.device, self._model.dtype),
                                 **self._generate_kwargs())
      return list(self._tokenizer.batch_decode(ids, skip_special_tokens=True))
    kwargs = dict(max_new_tokens=self.max_new_tokens, return_full_text=False,
                  generate_kwargs={k: v for k, v in self._generate_kwargs().items()
                                   if k != "max_new_tokens"})
    if self._chat:
      chats = [[{"role": "user", "content": [{"type": "image", "image": im},
                                             {"type": "text", "text": prompt}]}]
               for im in images]
      out = self._pipe(text=chats, **kwargs)
    else:
      out = self._pipe(images=images, text=[prompt] * len(images), **kwargs)
    # One result per input: a dict, or a list holding one dict.
    return [(r[0] if isinstance(r, list) else r)["generated_text"] for r in out]


_CALLABLE_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


def build(spec: str, **kwargs) -> Captioner:
  """A captioner from a command-line spec.

  Args:
    spec: "template" (`TemplateCaptioner`), "module.path:function" (an importable callable,
      wrapped in `CallableCaptioner`; `fn(image, prompt) -> str`, or the whole batch when the
      function has `batched = True`), or a local model directory (`TransformersCaptioner`).
    **kwargs: passed to `TransformersCaptioner` (task, max_new_tokens, temperature, prompt,
      device).

  Raises:
    FileNotFoundError: a directory spec that does not exist.
    ValueError: a directory that is not an image-captioning model, or a callable spec whose
      module or attribute cannot be found or is not callable.
  """
  if spec == "template":
    return TemplateCaptioner()
  if _CALLABLE_SPEC.match(spec) and not os.path.exists(spec):
    module_name, attr = spec.split(":")
    try:
      obj = importlib.import_module(module_name)
    except ImportError as e:
      raise ValueError(f"captioner {spec!r}: cannot import {module_name!r}: {e}") from e
    for part in attr.split("."):
      if not hasattr(obj, part):
        raise ValueError(f"captioner {spec!r}: {module_name!r} has no attribute {attr!r}")
      obj = getattr(obj, part)
    if not callable(obj):
      raise ValueError(f"captioner {spec!r} is not callable ({type(obj).__name__})")
    return CallableCaptioner(obj, name=spec)
  return TransformersCaptioner(spec, **kwargs)
