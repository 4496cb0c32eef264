"""PyTorch eager reference of ALPRO's VTC step, for `launch.benchmark --compare=torch`.

The same shapes as the config's ALPRO model: Hugging Face `TimesformerModel` (divided
space-time attention) and `BertModel` with the text encoder's `fusion_layer` layers, linear
projections to `model.embed_dim`, a learned temperature, symmetric InfoNCE and AdamW with
`optim.model`'s hyper-parameters and gradient clipping; dropout as in the config. Needs
`torch` and `transformers` (the test extras); used only to time the reference.
"""
from __future__ import annotations

import statistics
import time


def build(config, seed: int = 0) -> dict:
  """The reference's modules at `config`'s shapes: {"video": TimesformerModel, "text":
  BertModel, "vision_proj", "text_proj": Linear, "temp": scalar Parameter}."""
  import torch  # noqa: PLC0415  (test extra: only the benchmark reference needs it)
  import transformers  # noqa: PLC0415

  torch.manual_seed(seed)
  v, t = config.model.video, config.model.text
  vocab = int(t.vocab_size) or 30522
  video_model = transformers.TimesformerModel(transformers.TimesformerConfig(
      image_size=int(v.image_size), patch_size=int(v.patch_size), num_frames=int(v.num_frames),
      hidden_size=int(v.hidden), num_hidden_layers=int(v.layers),
      num_attention_heads=int(v.heads), intermediate_size=int(v.mlp_dim),
      hidden_dropout_prob=float(v.dropout), attention_probs_dropout_prob=float(v.dropout),
      attention_type="divided_space_time", layer_norm_eps=1e-6))
  text_model = transformers.BertModel(transformers.BertConfig(
      vocab_size=vocab, hidden_size=int(t.hidden), num_hidden_layers=int(t.fusion_layer),
      num_attention_heads=int(t.heads), intermediate_size=int(t.mlp_dim),
      max_position_embeddings=int(t.max_position), hidden_dropout_prob=float(t.dropout),
      attention_probs_dropout_prob=float(t.dropout)), add_pooling_layer=False)
  embed = int(config.model.embed_dim)
  vision_proj = torch.nn.Linear(int(v.hidden), embed)
  text_proj = torch.nn.Linear(int(t.hidden), embed)
  temp = torch.nn.Parameter(torch.tensor(float(config.model.temp_init)))
  return {"video": video_model, "text": text_model, "vision_proj": vision_proj,
          "text_proj": text_proj, "temp": temp}


def run(config, steps: int = 10, warmup: int = 2, seed: int = 0) -> dict:
  """Times the eager PyTorch train step at `config`'s shapes (CPU, float32).

  Returns {"torch_step_time_s" (median), "torch_step_time_min_s", "torch_threads",
  "torch_version", "torch_loss_finite"}.
  """
  import torch  # noqa: PLC0415  (test extra: only the benchmark reference needs it)

  ref = build(config, seed)
  video_model, text_model = ref["video"], ref["text"]
  vision_proj, text_proj, temp = ref["vision_proj"], ref["text_proj"], ref["temp"]
  d = config.data
  vocab = int(config.model.text.vocab_size) or 30522
  modules = torch.nn.ModuleList([video_model, text_model, vision_proj, text_proj])
  params = list(modules.parameters()) + [temp]
  o = config.optim.model
  opt = torch.optim.AdamW(params, lr=float(o.lr), betas=(float(o.b1), float(o.b2)),
                          eps=float(o.eps), weight_decay=float(o.weight_decay))
  modules.train()

  b, frames, size, length = int(config.batch_size), int(d.num_frames), int(d.image_size), \
      int(d.max_text_len)
  gen = torch.Generator().manual_seed(seed)
  pixels = torch.randn(b, frames, 3, size, size, generator=gen)  # HF layout: [B, T, C, H, W]
  ids = torch.randint(0, vocab, (b, length), generator=gen)
  mask = torch.ones(b, length, dtype=torch.long)
  target = torch.arange(b)
  clip_norm = float(o.get("clip_norm", 0.0))

  def step() -> float:
    opt.zero_grad(set_to_none=True)
    vcls = video_model(pixel_values=pixels).last_hidden_state[:, 0]
    tcls = text_model(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0]
    vf = torch.nn.functional.normalize(vision_proj(vcls), dim=-1)
    tf = torch.nn.functional.normalize(text_proj(tcls), dim=-1)
    logits = tf @ vf.t() / temp.clamp(0.001, 0.5)
    loss = 0.5 * (torch.nn.functional.cross_entropy(logits, target)
                  + torch.nn.functional.cross_entropy(logits.t(), target))
    loss.backward()
    if clip_norm > 0:
      torch.nn.utils.clip_grad_norm_(params, clip_norm)
    opt.step()
    return float(loss.detach())

  times, loss = [], float("nan")
  for i in range(warmup + steps):
    t0 = time.perf_counter()
    loss = step()
    if i >= warmup:
      times.append(time.perf_counter() - t0)
  return {"torch_step_time_s": statistics.median(times), "torch_step_time_min_s": min(times),
          "torch_threads": torch.get_num_threads(), "torch_version": torch.__version__,
          "torch_loss_finite": bool(loss == loss and abs(loss) != float("inf"))}


def gemm_flops(shape: tuple[int, int, int], repeats: int = 5) -> dict[str, float]:
  """PyTorch's best FLOP/s for `vlp_jax.core.benchmark.gemm_flops`'s matmuls of `shape` =
  (m, k, n): "forward" `x[m, k] @ w[k, n]`, "weight_grad" `x[m, k].T @ dy[m, n]` (float32)."""
  import torch  # noqa: PLC0415  (test extra: only the benchmark reference needs it)

  m, k, n = shape
  x, w, dy = torch.ones(m, k), torch.ones(k, n), torch.ones(m, n)
  fns = {"forward": lambda: x @ w, "weight_grad": lambda: x.T @ dy}
  out = {}
  for name, f in fns.items():
    f()
    best = float("inf")
    for _ in range(repeats):
      t0 = time.perf_counter()
      f()
      best = min(best, time.perf_counter() - t0)
    out[name] = 2.0 * m * k * n / best
  return out
