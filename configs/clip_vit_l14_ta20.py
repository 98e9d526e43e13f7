r"""CLIP ViT-L/14 merged over 20 image tasks with Task Arithmetic, then quantized to 4 bits.

Base ``openai/clip-vit-large-patch14``; experts ``tanganke/clip-vit-large-patch14_<task>`` for
the 8 tasks of configs/clip_vit_b32_ta8.py plus Flowers102, PCAM, FER2013, Oxford-IIIT Pet,
STL10, CIFAR-100, EMNIST letters, KMNIST, Food101, Fashion-MNIST, Rendered SST-2 and CIFAR-10
(FusionBench's TALL20). Task Arithmetic at lambda = 0.3; the 24 encoder layers' linear kernels
in 4 bits, groups of 128; 64 calibration images per task (20 tasks x 64 x 257 tokens).

Command::

    epmq run --config configs/clip_vit_l14_ta20.py --config.data.data_dir=$TFDS_DATA_DIR

Data: FusionBench's Hugging Face datasets, each with its own splits: those of
configs/clip_vit_b32_ta8.py, ``dpdl-benchmark/oxford_flowers102``, ``1aurent/PatchCamelyon``,
``clip-benchmark/wds_fer2013`` (FusionBench's FER2013 loader), ``timm/oxford-iiit-pet``,
``tanganke/stl10``, ``tanganke/cifar100`` and ``tanganke/cifar10``, ``ethz/food101``,
``zalando-datasets/fashion_mnist``, ``tanganke/emnist_letters``, ``tanganke/kmnist``,
``nateraw/rendered-sst2``. Food-101 has no test split: its ``validation`` split is the official
Food-101 test set (250 reviewed images per class), which FusionBench evaluates on, so it is
the prepared ``test``. Prepare all 20 once (streamed; PCam's 330k patches are the largest)::

    python -c "from epmq_jax.data import registry; registry.prepare_tasks(registry.TASKS_20, '$TFDS_DATA_DIR')"

Expected runtime on one A100/H100 GPU or a TPU v4-8 host: about 3 hours (an estimate, not
measured here): each table row evaluates ~260k test images with ViT-L/14, and E-PMQ's
calibration runs 20 expert paths beside the quantized one (~15 minutes per E-PMQ variant).

Published numbers (average accuracy over the 20 tasks, %, METHOD.md section 8):
4-bit GPTQ 34.8, E-PMQ 76.7.
"""

import importlib.util
from pathlib import Path

import ml_collections

from epmq_jax.models.templates import TASKS_20


def _b32_ta8():
    """configs/clip_vit_b32_ta8.py as a module (config files are loaded by path, not package)."""
    path = Path(__file__).with_name("clip_vit_b32_ta8.py")
    spec = importlib.util.spec_from_file_location("_config_clip_vit_b32_ta8", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    """The ViT-B/32 Task Arithmetic config moved to ViT-L/14 and 20 tasks; ``arg`` is unused."""
    del arg
    b32 = _b32_ta8()
    cfg = b32.get_config()
    cfg.name = "clip_vit_l14_ta20"
    cfg.model_pool.base = "openai/clip-vit-large-patch14"
    cfg.model_pool.experts = ml_collections.ConfigDict(
        {t: b32.fusion_bench_repo("clip-vit-large-patch14", t) for t in TASKS_20})
    cfg.data.tasks = TASKS_20
    cfg.calib.n_per_task = 64
    cfg.calib.batch_size = 16
    cfg.eval.batch_size = 128
    return cfg
