r"""CLIP ViT-B/32 merged over 8 image tasks with TIES-Merging, then quantized to 4 bits.

Everything as configs/clip_vit_b32_ta8.py (base, the 8 FusionBench experts, zero-shot heads,
4-bit groups of 128, 128 calibration images per task) except the merge: TIES with the top 20%
of every task vector kept (global trim, as the reference code and FusionBench), the "mass"
sign election, the disjoint mean, and lambda = 0.3.

Command::

    epmq run --config configs/clip_vit_b32_ties8.py --config.data.data_dir=$TFDS_DATA_DIR

Expected runtime on one A100/H100 GPU or a TPU v4-8 host: about 40 minutes (an estimate, as
for the Task Arithmetic config; TIES' global top-k adds under a minute).

Published numbers (average accuracy over the 8 tasks, %, METHOD.md section 8):
4-bit GPTQ 69.1, E-PMQ 74.8. Full-precision TIES from the merging literature: about 72.2-72.4.
"""

from pathlib import Path

import ml_collections

from epmq_jax.config import load_config


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    """The Task Arithmetic config with the merge switched to TIES; ``arg`` is unused."""
    del arg
    cfg = load_config(Path(__file__).with_name("clip_vit_b32_ta8.py"))
    cfg.name = "clip_vit_b32_ties8"
    cfg.merge.methods = ("ties", "regmean")
    cfg.merge.scaling = 0.3
    cfg.merge.ties_density = 0.2
    cfg.merge.ties_trim = "global"
    cfg.calib.sweep_merge = "ties"
    return cfg
