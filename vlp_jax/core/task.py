"""The task contract: what a method supplies to the core trainer, and the task registry.

A method (`vlp_jax/methods/<name>/`) subclasses `Task` and registers it under the name a
config selects with `config.task`:

    @task_lib.register("my_task")
    class MyTask(task_lib.Task):
      ...

The core trainer then builds, per run: the task (`Task(config, text)`), its parameter
collections (`init_collections`, one optax optimizer each, `vlp_jax/core/optim.py`), the frozen
pytrees it reads (`load_frozen`, for training only), one loader per data stream (`streams`),
and either the default update (value_and_grad of `loss`, `vlp_jax/core/update.py`) or the
task's own (`make_update`). Evaluation calls the task's `evaluators` by the type named in
`config.evals.<name>.type`; `launch.export` calls the task's `export`.
"""
from __future__ import annotations

import abc
import dataclasses
import importlib.metadata
from typing import Any, ClassVar
from collections.abc import Callable, Mapping, Sequence

import jax

# Host-batch arrays of a caption stream that the devices need; ids and strings stay on the host.
CAPTION_KEYS = ("video", "text_ids", "text_mask", "mlm_ids", "mlm_labels", "valid")

# (params, batches, mesh, rules) -> {metric: float}; see `Task.evaluators`.
Evaluator = Callable[..., dict]


@dataclasses.dataclass(frozen=True)
class Stream:
  """A named host-batch stream that every update step takes one batch of.

  Attributes:
    keys: host-batch keys that go to the devices (everything else stays on the host).
    split: split of `config.data.dir` it reads; None = `config.data.train_split`.
    batch_size: global batch size; None = `config.batch_size`.
    image_mix: mix whole batches of still images in at `config.data.image_ratio` (the
      `mixture.MixtureLoader`); the batches then also carry `is_image` bool [B].
    seed_offset: added to `config.seed` for this stream's shuffling and masking.
    exclude_ids: a file of clip ids (one per line) this stream never yields, e.g. MAMA's
      meta set held out of the training stream; "" = none.
    features: read windows of cached per-frame features of `split` instead of its records:
      a `vlp_jax.data.feature_loader.FeatureSource` (cache directory, window length, clip
      selection); None = the records.
  """
  keys: tuple[str, ...] = CAPTION_KEYS
  split: str | None = None
  batch_size: int | None = None
  image_mix: bool = False
  seed_offset: int = 0
  exclude_ids: str = ""
  features: Any = None


@dataclasses.dataclass(frozen=True)
class Frozen:
  """Pytrees the update reads but never trains (a teacher, a frozen backbone).

  Attributes:
    params: nested dict of jax arrays, already placed with `shardings`.
    shardings: matching `NamedSharding`s.
  """
  params: Any
  shardings: Any


@dataclasses.dataclass(frozen=True)
class UpdateContext:
  """What the core hands a task that supplies its own update (`Task.make_update`).

  Attributes:
    optimizers: collection name -> optax transformation (frozen leaves get `set_to_zero`).
    schedules: collection name -> learning-rate schedule (step -> lr).
    grad_accum: micro-batches per step (`config.optim.grad_accum`).
  """
  optimizers: Mapping[str, Any]
  schedules: Mapping[str, Callable[[jax.Array], jax.Array]]
  grad_accum: int


class Task(abc.ABC):
  """A method's objective on the core. Constructors must have no side effects.

  Subclasses implement `init_collections`, `loss` and `evaluators`; the other methods have
  defaults that fit a single-collection model trained on one caption stream.

  Attributes:
    config: the run's resolved config (read only: a task never mutates it).
    text: `vlp_jax.data.setup.TextInfo` (tokenizer, vocabulary size, answer vocabulary).
  """

  # Keys of `config.init` that name `hf:DIR` checkpoints this task can import
  # (`import_pretrained`), e.g. ("text", "video").
  pretrained_keys: ClassVar[tuple[str, ...]] = ()

  def __init__(self, config, text):
    self.config = config
    self.text = text

  # ---- parameters ---------------------------------------------------------------------------

  @abc.abstractmethod
  def init_collections(self, rng: jax.Array) -> dict[str, Any]:
    """{collection name: logically boxed float32 params}, e.g. {"model": ...}.

    Traced under `jax.eval_shape` and `jax.jit` (never run eagerly): the core creates every
    collection directly in its sharded layout. Each collection gets its own optimizer from
    `config.optim.<collection>`.
    """

  def load_frozen(self, mesh, rules, workdir: str) -> Frozen | None:
    """Frozen pytrees the update reads (PEM's prompter, a frozen CLIP), or None.

    Called once by the trainer before training (never by evaluation). It may read files
    (another run's checkpoint) but never trains: a missing prerequisite is an error that says
    which stage makes it.
    """
    del mesh, rules, workdir
    return None

  def warm_start(self, workdir: str) -> str:
    """Another run's WORKDIR whose params start this run when `config.init.checkpoint` is ""
    (e.g. ALPRO's prompter stage with `pem.warm_start`); "" = a fresh init. Read once, when
    the run starts without a checkpoint of its own, after every stage has finished. Its params
    also take the place of the `config.init` transformers imports that run started from (as its
    config.json records them)."""
    del workdir
    return ""

  def import_pretrained(self, key: str, path: str, params: dict[str, Any]) -> dict[str, Any]:
    """Applies `config.init.<key> = "hf:<path>"` on the host.

    Args:
      key: one of `pretrained_keys`.
      path: a local `transformers` checkpoint directory.
      params: {collection: nested dict} whose leaves are `jax.ShapeDtypeStruct` placeholders
        (shape and dtype of the live params; their values are not on this host).
    Returns:
      The same structure with the imported leaves replaced by float32 numpy arrays; leaves
      left as placeholders keep their current values.
    """
    del path, params
    raise ValueError(f"config.init.{key}: task {self.config.task!r} imports no transformers "
                     "checkpoint")

  # ---- data -----------------------------------------------------------------------------------

  def streams(self) -> dict[str, Stream]:
    """Named streams the update takes a batch of each step; "train" is the main one."""
    return {"train": Stream()}

  # ---- the update -----------------------------------------------------------------------------

  @abc.abstractmethod
  def loss(self, params: dict[str, Any], batches: dict[str, dict[str, jax.Array]],
           rng: jax.Array, *, train: bool, frozen: Any = None, step: Any = None
           ) -> tuple[jax.Array, dict]:
    """The scalar objective the default update minimises.

    Args:
      params: {collection: params}; the default update differentiates every collection.
      batches: {stream name: global batch of sharded arrays}.
      rng: this step's (or micro-batch's) key.
      train: dropout and other training-only behaviour on.
      frozen: `load_frozen(...).params`, or None.
      step: int32 scalar, the step being taken (0-based; for schedules inside the loss), or
        None outside training. Optional in a subclass: the default update passes it only to a
        `loss` that declares it.
    Returns:
      (float32 scalar loss, metrics: dict of float32 scalars). Losses in `vlp_jax.losses`
      return per-sample values; reducing them is the task's choice.
    """

  def make_update(self, ctx: UpdateContext) -> Callable | None:
    """The task's own update, or None for the core's default (`core/update.py`).

    The returned `update(state, batches, frozen) -> (state, metrics)` is traced inside the
    core's jit (sharded state in and out, state donated). It must advance `state.step` and
    return `loss` in its metrics; the core adds `finite` over the loss and every collection.
    """
    del ctx
    return None

  def analytic_flops(self, batch_size: int) -> float | None:
    """FLOPs of one training step on `batch_size` examples counted from the model's shapes
    (matmuls), the benchmark's cross-check of XLA's cost analysis; None = not counted."""
    del batch_size
    return None

  # ---- evaluation ---------------------------------------------------------------------------

  @abc.abstractmethod
  def evaluators(self) -> dict[str, Evaluator]:
    """{type name: evaluator}; `config.evals.<name>.type` picks one.

    An evaluator is `fn(params, batches, mesh, rules, eval_cfg) -> metrics` over one pass of
    an eval loader (`params`: {collection: params}); metric keys carry the evaluator's prefix
    (`retrieval/...`, `qa/...`). It may return `(metrics, arrays)` instead: small numpy
    arrays (a similarity block, rank vectors, a confusion matrix) that the trainer saves as
    WORKDIR/eval/<name>/step_<step>.npz for `launch.report`.
    """

  # ---- export ---------------------------------------------------------------------------------

  def export(self, params: dict[str, Any], out_dir: str, *, platforms: Sequence[str]
             ) -> dict[str, Any] | None:
    """Writes the trained model in portable form to `out_dir` (`launch.export`), or None.

    Args:
      params: {collection: nested dict of float32 arrays} on one CPU device (a checkpoint of
        this task's run).
      out_dir: the output directory (it exists).
      platforms: platforms a `jax.export` artifact, if the task writes one, is lowered for.
    Returns:
      A JSON-serialisable summary of what was written (`launch.export` adds it to
      OUT/export.json), or None: the task has no export of its own (the default).
    """
    del params, out_dir, platforms
    return None


_REGISTRY: dict[str, type[Task]] = {}
# Installed packages declare their methods as entry points of this group (pyproject.toml:
# `[project.entry-points."vlp_jax.methods"]`); each is imported once, on the first lookup of an
# unknown task, and registers its tasks. The core itself names no method.
ENTRY_POINT_GROUP = "vlp_jax.methods"
_plugins_loaded = False


def load_plugins() -> None:
  """Imports every installed method package (the entry points of `ENTRY_POINT_GROUP`)."""
  global _plugins_loaded
  if _plugins_loaded:
    return
  _plugins_loaded = True
  for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
    entry.load()


def register(name: str) -> Callable[[type[Task]], type[Task]]:
  """Class decorator: makes `config.task = name` build this task."""
  def wrap(cls: type[Task]) -> type[Task]:
    if not (isinstance(cls, type) and issubclass(cls, Task)):
      raise TypeError(f"register({name!r}) needs a Task subclass, got {cls!r}")
    if name in _REGISTRY and _REGISTRY[name] is not cls:
      raise ValueError(f"task {name!r} is already registered by {_REGISTRY[name].__module__}")
    _REGISTRY[name] = cls
    return cls
  return wrap


def known() -> list[str]:
  """Names of the registered tasks (installed methods included), sorted."""
  load_plugins()
  return sorted(_REGISTRY)


def get(name: str) -> type[Task]:
  """The task class registered as `name`.

  Raises:
    ValueError: unknown name; the message lists the known ones.
  """
  if name not in _REGISTRY:
    load_plugins()
  if name not in _REGISTRY:
    raise ValueError(f"unknown config.task {name!r}; known: {known()}")
  return _REGISTRY[name]


def build(config, text) -> Task:
  """Instantiates the task `config.task`."""
  return get(config.task)(config, text)
