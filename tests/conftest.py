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
