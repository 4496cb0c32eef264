"""Test session setup: 8 simulated CPU devices, so sharding tests can build real meshes.

Tests that want one device take `jax.devices()[:1]`. The package (`vlp_jax`, `configs`, `launch`)
is imported from its installation (`pip install -e .`).
"""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests are dominated by XLA compile time of tiny programs: the lowest backend optimisation
# level compiles ~40 % faster (and runs slower, which tiny programs do not notice).
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"
_flag = "--xla_force_host_platform_device_count=8"
if _flag not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = " ".join(
      [os.environ.get("XLA_FLAGS", ""), _flag, TEST_XLA_FLAGS]).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

# Identical programs (the same tiny step in several tests) compile once per session.
import tempfile  # noqa: E402

os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "vlp_jax_test_compile_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import sys  # noqa: E402

import pytest  # noqa: E402

_EXIT_STATUS = []


def pytest_sessionfinish(session, exitstatus):
  _EXIT_STATUS.append(int(exitstatus))


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
  # tf.data iterators that tests leave alive are destroyed at interpreter shutdown, where one can
  # wait forever on a pipeline thread (seen once after a full run): once pytest has reported,
  # leave without running those destructors, keeping pytest's exit status.
  if _EXIT_STATUS:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_EXIT_STATUS[-1])
