r"""FLAN-T5-base merged over the 8 GLUE tasks with Task Arithmetic, then quantized to 4 bits.

Base ``google/flan-t5-base``; experts ``tanganke/flan-t5-base_glue-<task>`` (FusionBench's
full fine-tunes) for CoLA, MNLI, MRPC, QNLI, QQP, RTE, SST-2 and STS-B. The tasks are
text-to-text with FusionBench's prompts and label words (``epmq_jax.data.glue``); answers are
decoded greedily (up to 9 new tokens, as FusionBench's ``generate(max_length=10)``) and scored
on the validation splits (``validation_matched`` for MNLI) with exact-match accuracy, and
Spearman's rho for STS-B (``eval.metric_style="fusion_bench"``; ``"glue"`` gives Matthews
correlation for CoLA and mean(Pearson, Spearman) for STS-B).

Task Arithmetic at lambda = 0.3 merges every leaf (the shared embedding and the untied LM head
included, as FusionBench does). The linear kernels of all 12 encoder and 12 decoder blocks
(q/k/v/o of self- and cross-attention, wi_0/wi_1/wo) are quantized to 4 bits in groups of 128;
the embedding and ``lm_head`` stay in float. Calibration: 128 train examples per task, inputs
truncated to 256 tokens; the decoder is calibrated on teacher-forced target answers.

Command::

    epmq run --config configs/flan_t5_base_glue.py --config.data.data_dir=$TFDS_DATA_DIR

A smoke run in minutes: add ``--config.eval.limit=32 --config.calib.n_per_task=8``.

It needs the 9 checkpoints (hub or HF cache), the tokenizer, and the GLUE tasks under
``data.data_dir`` as ``glue/<task>``: ``tfds build glue/<task> --file_format=array_record``, or
``epmq_jax.data.glue.prepare_from_hf(task, data_dir)`` (no TensorFlow needed).

Expected runtime on one A100/H100 GPU or a TPU v4-8 host: about 1.5 hours (an estimate, not
measured here): each table row decodes the ~60k GLUE validation examples (QQP's 40k dominate),
calibration takes a few minutes per variant.

Published numbers (average over the 8 GLUE tasks, %, METHOD.md section 8):
4-bit GPTQ 78.26, E-PMQ 83.34.
"""

import ml_collections

from epmq_jax.data.glue import GLUE_TASK_NAMES


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    """The config; ``arg`` is unused (kept for ``--config path:arg``)."""
    del arg
    cfg = ml_collections.ConfigDict()

    cfg.model_pool = ml_collections.ConfigDict()
    cfg.model_pool.kind = "hf_t5"
    cfg.model_pool.base = "google/flan-t5-base"
    cfg.model_pool.experts = ml_collections.ConfigDict(
        {t: f"tanganke/flan-t5-base_glue-{t}" for t in GLUE_TASK_NAMES})
    cfg.model_pool.tokenizer = "google/flan-t5-base"  # all FLAN-T5 sizes share it
    cfg.model_pool.revision = ""  # a hub revision for every checkpoint ("" = main)
    cfg.model_pool.dtype = ""  # "" = float32 params

    cfg.task_pool = ml_collections.ConfigDict()
    cfg.task_pool.kind = "glue"  # one shared LM head; the answer is generated text

    cfg.data = ml_collections.ConfigDict()
    cfg.data.tasks = GLUE_TASK_NAMES
    cfg.data.data_dir = ""  # tensorflow-datasets data_dir ("" = tfds default)
    cfg.data.calib_split = "train"
    cfg.data.eval_split = "validation"  # per task: GlueTask.eval_split (MNLI: validation_matched)
    cfg.data.max_length = 256  # encoder tokens (truncated)
    cfg.data.max_target_length = 8  # decoder tokens of a target answer, for calibration

    cfg.merge = ml_collections.ConfigDict()
    cfg.merge.methods = ("ta",)
    cfg.merge.scaling = 0.3
    cfg.merge.scalings = (0.3,)
    cfg.merge.ties_density = 0.2
    cfg.merge.ties_trim = "global"
    cfg.merge.regmean_alpha = 0.6  # used when "regmean" is added to merge.methods (no selection on GLUE)
    cfg.merge.regmean_alphas = (0.6,)
    cfg.merge.filter = ""  # "" = every leaf

    cfg.quant = ml_collections.ConfigDict()
    cfg.quant.bits = (4,)
    cfg.quant.methods = ("rtn", "gptq", "awq", "epmq")
    cfg.quant.group_size = 128
    cfg.quant.symmetric = False
    cfg.quant.damp = 0.01
    cfg.quant.checkpoint_bits = 4  # packed checkpoints written: these methods at these bits
    cfg.quant.checkpoint_methods = ("gptq", "epmq")
    cfg.quant.filter = (r"(encoder|decoder)/block/\d+/layer/\d+/"
                        r"(SelfAttention|EncDecAttention|DenseReluDense)/\w+/kernel")

    cfg.calib = ml_collections.ConfigDict()
    cfg.calib.n_per_task = 128  # calibration examples per task, from the train split
    cfg.calib.seed = 0
    cfg.calib.batch_size = 16
    cfg.calib.lam = 0.1
    cfg.calib.anchor = "output"
    cfg.calib.target = "expert"
    cfg.calib.alpha = 0.25
    cfg.calib.task_weights = "frobenius"
    cfg.calib.rounding = "gptq"
    cfg.calib.lam_sweep = (0.0, 0.1, 1.0, 10.0)
    cfg.calib.ablations = ("target=merged", "rounding=rtn")
    cfg.calib.sweep_merge = "ta"
    cfg.calib.sweep_bits = 4

    cfg.eval = ml_collections.ConfigDict()
    cfg.eval.batch_size = 64
    cfg.eval.progress = True
    cfg.eval.max_new_tokens = 9
    cfg.eval.metric_style = "fusion_bench"
    cfg.eval.limit = ml_collections.config_dict.placeholder(int)  # N: score only N examples per task

    cfg.run = ml_collections.ConfigDict()
    cfg.run.mesh = "auto"  # every visible device; "" = one device
    cfg.run.resume = True  # a rerun continues where an interrupted one stopped
    return cfg
