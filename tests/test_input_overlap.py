"""The step loop never waits on the host: the batch of step s+1 is assembled and put on the
devices while step s is still running (asynchronous dispatch; the finiteness check is one step
behind)."""
import threading

import jax
import jax.numpy as jnp
from jax.experimental import io_callback

from configs import alpro_pretrain
from vlp_jax.core import trainer as trainer_lib


class _Signalling:
  """A loader that records the batches asked for and wakes whoever waits for one."""

  def __init__(self, loader, asked: list, cond: threading.Condition):
    self.loader, self.asked, self.cond = loader, asked, cond

  def __iter__(self):
    return self

  def __next__(self):
    batch = next(self.loader)
    with self.cond:
      self.asked.append(len(self.asked) + 1)
      self.cond.notify_all()
    return batch


def test_next_batch_is_assembled_while_the_step_runs(tmp_path):
  c = alpro_pretrain.get_config("tiny")
  with c.unlocked():
    c.data.source = "random"
    c.model.text.vocab_size = 64
    c.loss.pem = 0.0
    c.num_steps, c.log_every, c.ckpt_every = 4, 100, 100
    c.evals = {}
  trainer = trainer_lib.Trainer(c, str(tmp_path), jax.devices()[:1]).build()
  asked, cond, waited = [], threading.Condition(), []
  real_loaders, real_update = trainer.loaders, trainer.update_fn
  trainer.loaders = lambda: {k: _Signalling(v, asked, cond) for k, v in real_loaders().items()}

  def gate(step):
    # Runs on the device, inside step `step`: hold it until the host has asked for the next
    # batch. A loop that waited for this step before fetching would never get there.
    step = int(step)
    # The timeout only guards against a hang: a loaded 2-core machine can take seconds to
    # assemble a batch, and a loop that does not overlap fails however long it is.
    with cond:
      ok = cond.wait_for(lambda: len(asked) >= min(step + 1, c.num_steps), timeout=60)
    waited.append((step, ok))
    return jnp.int32(ok)

  def update_fn(frozen=None):
    step_fn = real_update(frozen)

    def gated(state, batches):
      state, metrics = step_fn(state, batches)
      ok = jax.jit(lambda s: io_callback(gate, jax.ShapeDtypeStruct((), jnp.int32), s))(
          state.step)
      return state, dict(metrics, loss=metrics["loss"] + 0.0 * ok)
    return gated

  trainer.update_fn = update_fn
  trainer.fit()
  assert [s for s, _ in waited] == [1, 2, 3, 4]
  assert all(ok for _, ok in waited), waited
