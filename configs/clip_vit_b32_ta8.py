r"""CLIP ViT-B/32 merged over 8 image tasks with Task Arithmetic, then quantized to 4 bits.

The paper's headline setting. Base ``openai/clip-vit-base-patch32``; experts are FusionBench's
fine-tuned vision towers ``tanganke/clip-vit-base-patch32_<task>`` for SUN397, Cars, RESISC45,
EuroSAT, SVHN, GTSRB, MNIST and DTD. Every task is scored with its own frozen zero-shot head
(the base text tower over the task's class names and templates). Task Arithmetic at
lambda = 0.3 merges every vision-tower leaf; the linear kernels of the 12 encoder layers
(q/k/v/out_proj, fc1, fc2) are quantized (4-bit, asymmetric, groups of 128 along d_in); patch
embedding and projection stay in float. Calibration: 128 train images per task.

Command::

    epmq run --config configs/clip_vit_b32_ta8.py --config.data.data_dir=$TFDS_DATA_DIR

A smoke run in minutes: add ``--config.eval.limit=64 --config.calib.n_per_task=8``.

It needs the 9 checkpoints (hub or HF cache) and the 8 data sets under ``data.data_dir``.
Data: the Hugging Face datasets FusionBench evaluates on, with their own train (calibration)
and test (evaluation) splits: ``tanganke/sun397``, ``tanganke/stanford_cars``,
``tanganke/resisc45``, ``tanganke/eurosat``, ``ufldl-stanford/svhn`` (config
``cropped_digits``), ``tanganke/gtsrb``, ``ylecun/mnist``, ``tanganke/dtd``. Prepare them once,
where there is network (streamed batch by batch, fits a 12 GB Colab runtime)::

    python -c "from epmq_jax.data import registry; registry.prepare_tasks(registry.TASKS_8, '$TFDS_DATA_DIR')"

as colab/paper_clip_vit_b32.ipynb does. Nothing is carved from a test split; the
``validation`` split (read only when ``merge.scaling`` is None) is a seeded 10% draw of train,
as FusionBench's val configs draw theirs (epmq_jax/data/registry.py has the details and the
tfds alternative for the tasks whose tfds builder works).

Expected runtime on one A100/H100 GPU or a TPU v4-8 host: about 40 minutes (an estimate from
the layer shapes; not measured here, the project is developed on CPU). Calibration takes a few
minutes per quantized variant; most of the time is evaluating the ~87k test images once per
table row.

Published numbers (average accuracy over the 8 tasks, %, METHOD.md section 8):
4-bit GPTQ 65.0, E-PMQ 73.6. Full precision, from the merging literature: experts
about 90.3-90.5, Task Arithmetic about 68-69.
"""

import ml_collections

from epmq_jax.models.templates import TASKS_8


def fusion_bench_repo(model: str, task: str) -> str:
    """FusionBench's expert repo id: ``tanganke/<model>_<task>`` (some tasks are hyphenated)."""
    hyphenated = {"stanford_cars", "oxford_iiit_pet", "rendered_sst2"}
    return f"tanganke/{model}_{task.replace('_', '-') if task in hyphenated else task}"


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    """The config; ``arg`` is unused (kept for ``--config path:arg``)."""
    del arg
    cfg = ml_collections.ConfigDict()

    # the vision tower is merged and quantized; the base text tower builds the zero-shot heads
    cfg.model_pool = ml_collections.ConfigDict()
    cfg.model_pool.kind = "hf_clip"
    cfg.model_pool.base = "openai/clip-vit-base-patch32"
    cfg.model_pool.experts = ml_collections.ConfigDict(
        {t: fusion_bench_repo("clip-vit-base-patch32", t) for t in TASKS_8})
    cfg.model_pool.tokenizer = ""  # "" = the base checkpoint's
    cfg.model_pool.revision = ""  # a hub revision (branch, tag or commit) for every checkpoint
    cfg.model_pool.dtype = ""  # "" = float32 params; "bfloat16" halves their memory

    cfg.task_pool = ml_collections.ConfigDict()
    cfg.task_pool.kind = "clip_zeroshot"  # per task: normalized text embeddings over templates

    cfg.data = ml_collections.ConfigDict()
    cfg.data.tasks = TASKS_8
    cfg.data.data_dir = ""  # prepared task data (registry.prepare_tasks); "" = ~/tensorflow_datasets
    cfg.data.calib_split = "train"  # the source's train split
    cfg.data.eval_split = "test"  # the source's test split (FusionBench's test config)
    cfg.data.image_size = 224

    cfg.merge = ml_collections.ConfigDict()
    cfg.merge.methods = ("ta", "regmean")
    cfg.merge.scaling = 0.3  # fixed lambda (the literature's); None = choose from `scalings`
    cfg.merge.scalings = (0.3,)
    cfg.merge.ties_density = 0.2
    cfg.merge.ties_trim = "global"
    cfg.merge.regmean_alpha = 0.6  # FusionBench's CLIP setting; None = choose from regmean_alphas
    cfg.merge.regmean_alphas = (0.6,)
    cfg.merge.filter = ""  # regex of merged leaves; "" = all vision-tower leaves

    cfg.quant = ml_collections.ConfigDict()
    cfg.quant.bits = (4,)
    cfg.quant.methods = ("rtn", "gptq", "awq", "epmq")
    cfg.quant.methods_by_merge = ml_collections.ConfigDict({"regmean": ("gptq", "epmq")})
    cfg.quant.group_size = 128
    cfg.quant.symmetric = False
    cfg.quant.damp = 0.01
    cfg.quant.checkpoint_bits = 4  # packed checkpoints written: these methods at these bits
    cfg.quant.checkpoint_methods = ("gptq", "epmq")
    cfg.quant.filter = r"encoder/layers/\d+/(self_attn/(q|k|v|out)_proj|mlp/fc\d)/kernel"

    cfg.calib = ml_collections.ConfigDict()
    cfg.calib.n_per_task = 128  # calibration images per task, from the train split
    cfg.calib.seed = 0
    cfg.calib.batch_size = 32
    cfg.calib.lam = 0.1
    cfg.calib.anchor = "output"
    cfg.calib.target = "expert"
    cfg.calib.alpha = 0.25
    cfg.calib.task_weights = "frobenius"
    cfg.calib.rounding = "gptq"
    cfg.calib.lam_sweep = (0.0, 0.1, 1.0, 10.0)
    cfg.calib.ablations = ("target=merged", "target=mix", "anchor=weight", "rounding=rtn")
    cfg.calib.sweep_merge = "ta"
    cfg.calib.sweep_bits = 4

    cfg.eval = ml_collections.ConfigDict()
    cfg.eval.batch_size = 256
    cfg.eval.progress = True
    cfg.eval.limit = ml_collections.config_dict.placeholder(int)  # N: score only N examples per task

    cfg.run = ml_collections.ConfigDict()
    cfg.run.mesh = "auto"  # every visible device; "" = one device
    cfg.run.resume = True  # a rerun continues where an interrupted one stopped
    return cfg
