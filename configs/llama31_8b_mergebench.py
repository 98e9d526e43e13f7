r"""Llama-3.1-8B experts in the MergeBench style: merged, then quantized to 4 and 3 bits.

NEEDS THE HUGGING FACE HUB (or a filled HF cache) AND AN ACCELERATOR. Not run on CPU.

Models (MergeBench, He et al., NeurIPS 2025 Datasets & Benchmarks; github.com/uiuctml/MergeBench,
``merging/main.py``): base ``meta-llama/Llama-3.1-8B`` (gated: accept its licence on the hub and
``huggingface-cli login``) and the five full fine-tunes ``MergeBench/Llama-3.1-8B_<domain>`` for
``instruction``, ``math``, ``coding``, ``safety`` and ``multilingual`` (repo ids as MergeBench's
merging code builds them). The experts were trained with Alpaca-style prompts (MergeBench's
``merging/taskloader.py``), which :data:`ALPACA` reproduces; the base has no chat template, so
``data.chat_template`` is off. Merge settings follow MergeBench's ``scripts/merge.sh``: Task
Arithmetic and TIES at coefficient 0.4 (TIES keeps the top 30 %), RegMean with off-diagonal
scale 0.5, all fixed (no selection split). Calibration (and RegMean's Gram matrices, as
MergeBench's RegMean) uses ``MergeBench/<domain>_val``, the experts' own training sets.

Evaluation. MergeBench scores GSM8K-CoT (exact match), multilingual ARC / HellaSwag / MMLU
(log-likelihood accuracy), IFEval (rule checkers), HumanEval+ / MBPP+ (pass@1 with code
execution) and WildGuardTest / HarmBench / XSTest / DAN (refusal judged by a classifier). This
pool has the first two kinds of evaluator, so:

- math: ``openai/gsm8k`` (``main``, test, 1319 problems), exact match of the last number of the
  greedy answer (lm-evaluation-harness' flexible extract), zero-shot with the Alpaca prompt;
- multilingual: ``alexandrainst/m_arc`` (``fr``, test), log-likelihood, ``acc_norm``, lm-evaluation-
  harness' okapi ARC prompt;
- coding: SUBSTITUTE for execution-based pass@1: CRUXEval-O (``cruxeval-org/cruxeval``, test,
  800 functions): predict a Python function's output for an input; exact match of the first line;
- instruction following: SUBSTITUTE for IFEval: RewardBench's LLMBar pairs
  (``allenai/reward-bench``, split ``filtered``, subsets ``llmbar-*``), log-likelihood preference of
  the instruction-following response over the deviating one (``acc_norm``);
- safety: SUBSTITUTE for classifier-judged refusal: RewardBench's XSTest / refusal / do-not-answer
  pairs (same dataset, safety subsets), log-likelihood preference of the safe response.

The substitutes' dataset ids and columns are taken from their dataset cards (not verified
here, offline); check them before a long run with ``--config.eval.limit=8``.

Command (one accelerator with >= 141 GB today, see Memory; ``run.mesh="auto"`` shards the
calibration batches, solves and evaluation batches over every visible device)::

    huggingface-cli login
    epmq run --config configs/llama31_8b_mergebench.py --workdir runs/llama31_8b_mergebench

A smoke run: add ``--config.eval.limit=8 --config.calib.n_per_task=8 --config.quant.bits=4``.

Memory (parameters in bfloat16: 8.03 B x 2 B = 16 GB per model):

- Models held at once, as the pools stand today: the base and the five experts are loaded whole
  onto the accelerator (``from_pretrained`` places every tensor on the default device), 96 GB;
  the runner keeps one merge per merge method (16 GB each) and builds one variant at a time
  (16 GB float, ~5 GB packed). With ``merge.methods=("ta",)`` that is ~130 GB: one H200 (141 GB)
  fits it, an 80 GB card does not; run the merge methods one at a time with ``run.resume``.
  With streamed experts (issue 11 items 2-3: merges and the calibration driver read each
  expert's leaves or block k from its safetensors) the experts cost one block each
  (~0.44 GB x 5): base + merge + variant, ~48 GB, fit one 80 GB GPU.
- Calibration activations: the driver keeps the hidden states of every calibration sequence on
  the merged path and on the expert paths, 2 x T x n x S x 4096 x 2 B = 2 x 5 x 128 x 1024 x
  8 KiB ~ 11 GB at ``calib.n_per_task=128`` and ``data.max_length=1024``, plus one group's
  captured inputs (a batch of 8 x 1024 x 14336 x 4 B ~ 0.5 GB for ``down_proj``) and one
  layer's statistics (H up to 14336^2 x 4 B ~ 0.8 GB).
- Evaluation: the KV cache (32 layers x 2 x 8 heads x 128 x 2 B = 128 KiB per token; 16
  GSM8K sequences of ~800 tokens ~ 1.7 GB) and, for log-likelihood tasks, the float32 logits of
  a batch and their log-softmax (2 x 16 x 1024 x 128256 x 4 B ~ 17 GB; lower ``eval.batch_size``
  on a smaller card).

Estimated runtime on one H200 (not measured): downloading the 6 checkpoints (96 GB) 15-30 min;
each calibrated variant ~5-10 min (32 blocks x 7 layers; 640 sequences of up to 1024 tokens
through the merge and through the experts); each table row's evaluation ~10 min (GSM8K's 1319
greedy answers of 512 tokens dominate: the decoder runs all 512 steps); the default grid (31
rows, 27 of them calibrated) is therefore ~8-10 GPU-hours. Trim with
``--config.merge.methods=ta --config.calib.lam_sweep= --config.calib.ablations=`` (~3 h).
"""

import ml_collections

DOMAINS = ("instruction", "math", "coding", "safety", "multilingual")

#: MergeBench's Alpaca prompt (merging/taskloader.py, without its indentation), for a prompt
#: without an input field; ``{instruction}`` is filled with each task's own prompt.
ALPACA = ("Below is an instruction that describes a task, paired with an input that provides further "
          "context. Write a response that appropriately completes the request.\n\n"
          "### Instruction:\n{instruction}\n\n### Response:\n")


def _alpaca(inner: str) -> str:
    """The Alpaca prompt around a ``str.format`` template over the dataset's columns."""
    return ALPACA.replace("{instruction}", inner)


_LLMBAR = ["llmbar-natural", "llmbar-adver-neighbor", "llmbar-adver-GPTInst", "llmbar-adver-GPTOut",
           "llmbar-adver-manual"]
_SAFETY = ["xstest-should-refuse", "xstest-should-respond", "donotanswer", "refusals-dangerous",
           "refusals-offensive"]


def _task_data() -> dict:
    return {
        "math": dict(
            source="openai/gsm8k", config="main", kind="generate", test_split="test", validation_split="",
            prompt=_alpaca("{question}"), answer="answer", max_new_tokens=512,
            ignore=(r",", r"\$"), extract=r"(-?\d+(?:\.\d+)?)",
            calib=dict(source="MergeBench/math_val", split="train", prompt=_alpaca("{query}"),
                       answer="response")),
        "multilingual": dict(
            source="alexandrainst/m_arc", config="fr", kind="choice", test_split="test", validation_split="",
            prompt="Question: {instruction}\nAnswer:",
            choices=["option_a", "option_b", "option_c", "option_d", "option_e"], label="answer",
            metric="acc_norm",
            calib=dict(source="MergeBench/multilingual_val", split="train", prompt=_alpaca("{inputs}"),
                       answer="targets")),
        "coding": dict(   # SUBSTITUTE (see the module docstring)
            source="cruxeval-org/cruxeval", kind="generate", test_split="test", validation_split="",
            prompt=_alpaca("What does this Python function return?\n\n{code}\n\n"
                           "Give only the value of f({input})."),
            answer="output", max_new_tokens=64, extract=r"^\s*(.*)",
            calib=dict(source="MergeBench/coding_val", split="train", prompt=_alpaca("{instruction}"),
                       answer="response")),
        "instruction": dict(   # SUBSTITUTE
            source="allenai/reward-bench", kind="choice", test_split="filtered", validation_split="",
            prompt=_alpaca("{prompt}"), choices=["chosen", "rejected"], label=0, choice_prefix="",
            where={"subset": _LLMBAR}, metric="acc_norm",
            calib=dict(source="MergeBench/instruction_val", split="train", prompt=_alpaca("{instruction}"),
                       answer="output", where=None)),
        "safety": dict(   # SUBSTITUTE
            source="allenai/reward-bench", kind="choice", test_split="filtered", validation_split="",
            prompt=_alpaca("{prompt}"), choices=["chosen", "rejected"], label=0, choice_prefix="",
            where={"subset": _SAFETY}, metric="acc_norm",
            calib=dict(source="MergeBench/safety_val", split="train", prompt=_alpaca("{prompt}"),
                       answer="response", where=None)),
    }


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    """The config; ``arg`` is unused (kept for ``--config path:arg``)."""
    del arg
    c = ml_collections.ConfigDict()
    c.model_pool = ml_collections.ConfigDict(dict(
        kind="hf_llm",
        base="meta-llama/Llama-3.1-8B",
        experts={d: f"MergeBench/Llama-3.1-8B_{d}" for d in DOMAINS},
        tokenizer="",          # "" = the base's
        revision="",           # a hub revision for every checkpoint ("" = main)
        dtype="bfloat16",      # parameters (the checkpoints are bf16)
    ))
    c.task_pool = ml_collections.ConfigDict(dict(kind="llm_tasks"))
    c.data = ml_collections.ConfigDict(dict(
        tasks=DOMAINS,
        task_data=_task_data(),
        chat_template=False,   # the experts were trained on Alpaca prompts, not a chat template
        max_length=1024,       # tokens per sequence (calibration, log-likelihood); longer lose their start
        select_split="",       # "" = coefficients fixed by the config (MergeBench's)
        report_split="test",
    ))
    c.merge = ml_collections.ConfigDict(dict(
        methods=("ta", "ties", "regmean"),
        scaling=0.4, scalings=(0.4,),
        ties_density=0.3, ties_trim="global",
        regmean_alpha=0.5, regmean_alphas=(0.5,),
        filter="",
    ))
    c.quant = ml_collections.ConfigDict(dict(
        bits=(4, 3), methods=("rtn", "gptq", "awq", "epmq"),
        methods_by_merge={"regmean": ("gptq", "epmq")},
        group_size=128, symmetric=False, damp=0.01,
        checkpoint_bits=4, checkpoint_methods=("gptq", "epmq"),
        filter=r"model/layers/\d+/(self_attn/[qkvo]_proj|mlp/(gate|up|down)_proj)/kernel",
    ))
    c.calib = ml_collections.ConfigDict(dict(
        n_per_task=128, seed=0, batch_size=8,
        lam=0.1, anchor="output", target="expert", alpha=0.25, task_weights="frobenius",
        rounding="gptq",
        lam_sweep=(0.0, 0.1, 1.0), sweep_merge="ta", sweep_bits=4,
        ablations=("target=merged", "rounding=rtn"),
    ))
    c.eval = ml_collections.ConfigDict(dict(batch_size=16, progress=True,
                                            limit=ml_collections.config_dict.placeholder(int)))
    c.run = ml_collections.ConfigDict(dict(mesh="auto", resume=True))
    return c
