r"""CLIP ViT-B/32 merged over 14 image tasks with Task Arithmetic, then quantized to 4 bits.

FusionBench's TALL14 setting (the 14 tasks of Wang et al. 2024, "Localizing Task Information for
Improved Model Merging and Compression"; FusionBench ``config/modelpool/CLIPVisionModelPool/
clip-vit-base-patch32_TALL14.yaml``): base ``openai/clip-vit-base-patch32``, experts
``tanganke/clip-vit-base-patch32_<task>`` for the 8 tasks of configs/clip_vit_b32_ta8.py plus
Flowers102, PCam, FER2013, Oxford-IIIT Pet, STL-10 and CIFAR-100. Everything else as the
8-task config: zero-shot heads, Task Arithmetic at lambda = 0.3, the 12 encoder layers' linear
kernels in 4 bits (groups of 128), 128 calibration images per task.

Command::

    epmq run --config configs/clip_vit_b32_ta14.py --config.data.data_dir=$TFDS_DATA_DIR

Data: FusionBench's Hugging Face datasets with their own train (calibration) and test
(evaluation) splits: those of configs/clip_vit_b32_ta8.py, ``dpdl-benchmark/oxford_flowers102``,
``1aurent/PatchCamelyon``, ``clip-benchmark/wds_fer2013`` (FusionBench's FER2013 loader),
``timm/oxford-iiit-pet``, ``tanganke/stl10`` and ``tanganke/cifar100``. Prepare them once, where
there is network (streamed batch by batch)::

    python -c "from epmq_jax.data import registry; registry.prepare_tasks(registry.TASKS_14, '$TFDS_DATA_DIR')"

Flowers102, PCam (``valid``) have their own validation split; for the others ``validation`` is
a seeded 10% draw of train (read only when ``merge.scaling`` is None).

Expected runtime on one A100/H100 GPU or a TPU v4-8 host: about 70 minutes (an estimate, not
measured: the 8-task config's ~40 minutes scaled by the ~155k test images per table row, PCam's
33k patches the largest addition).

Published numbers: none for this setting (METHOD.md section 8 has the 8- and 20-task ones).
"""

import importlib.util
from pathlib import Path

import ml_collections

from epmq_jax.models.templates import TASKS_14


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    """The 8-task Task Arithmetic config over FusionBench's 14 tasks; ``arg`` is unused."""
    del arg
    path = Path(__file__).with_name("clip_vit_b32_ta8.py")  # loaded by path, as configs are
    spec = importlib.util.spec_from_file_location("_config_clip_vit_b32_ta8", path)
    b32 = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(b32)
    cfg = b32.get_config()
    cfg.name = "clip_vit_b32_ta14"
    cfg.model_pool.experts = ml_collections.ConfigDict(
        {t: b32.fusion_bench_repo("clip-vit-base-patch32", t) for t in TASKS_14})
    cfg.data.tasks = TASKS_14
    return cfg
