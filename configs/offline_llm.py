"""The offline LLM benchmark: a small Llama, eight synthetic text skills, merge, quantize, evaluate.

Run:  epmq run --config configs/offline_llm.py          (sizes: full, small, tiny)

Everything is made here, no download: the skills' data (``epmq_jax.data.offline_llm``:
add, reverse, sort, count a letter, close brackets, a product modulo 10, Caesar shift, every second
letter; prompts like ``rev:hdkwa=`` -> ``awkdh``), a character tokenizer, a foundation model
(the project's ``LlamaForCausalLM``, pretrained briefly on the mixture of all skills) and one
expert per skill fine-tuned from it (``epmq_jax.train_llm``); all cached under WORKDIR/cache.
Scores are exact match of the greedy (KV-cache) answer, per skill and averaged; merge
coefficients and RegMean's alpha are chosen on the validation splits, test is reported.

TUNING LOG (filled in below)
"""

import ml_collections


def get_config(size: str = "full") -> ml_collections.ConfigDict:
    """``size``: "full" (the benchmark), "small" (Colab) or "tiny" (CI tests)."""
    c = ml_collections.ConfigDict()

    # ---- skills / model / training (epmq_jax.data.offline_llm, epmq_jax.train_llm)
    c.suite = ml_collections.ConfigDict(dict(
        tasks=["add", "reverse", "sort", "count", "brackets", "modulo", "caesar", "skip"],
        n_train=2000, n_val=200, n_test=300,  # per skill, distinct inputs in every split
        seq_len=28,   # [bos] prompt answer [eos], left-padded (the longest example has 27 tokens)
        seed=0,
    ))
    c.model = ml_collections.ConfigDict(dict(
        hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False, seed=0,
    ))
    c.train = ml_collections.ConfigDict(dict(
        batch_size=64,
        pretrain=dict(lr=2e-3, steps=600, warmup_steps=50, weight_decay=0.0),   # the weak foundation
        finetune=dict(lr=1e-3, steps=150, warmup_steps=20, weight_decay=0.0),   # each expert
    ))

    # ---- pools (epmq_jax.pipeline.kinds)
    c.model_pool = ml_collections.ConfigDict(dict(kind="offline_llm"))
    c.task_pool = ml_collections.ConfigDict(dict(kind="offline_llm"))

    # ---- merge / quant / calib / eval / run (epmq_jax.pipeline)
    c.merge = ml_collections.ConfigDict(dict(
        methods=("ta", "ties", "regmean"),
        scalings=(0.1, 0.2, 0.3, 0.5, 1.0),   # candidates, chosen on validation
        scaling=ml_collections.config_dict.placeholder(float),
        ties_density=0.2, ties_trim="global",
        regmean_alphas=(0.3, 0.6, 0.9),
        regmean_alpha=ml_collections.config_dict.placeholder(float),
        filter="",   # every leaf (embedding, norms and LM head too)
    ))
    c.quant = ml_collections.ConfigDict(dict(
        bits=(4, 3), methods=("rtn", "gptq", "awq", "epmq"),
        methods_by_merge={"regmean": ("gptq", "epmq")},
        group_size=32, symmetric=False, damp=0.01,
        checkpoint_bits=4, checkpoint_methods=("gptq", "epmq"),
    ))
    c.calib = ml_collections.ConfigDict(dict(
        n_per_task=128, seed=0, batch_size=128,   # one batch per skill
        lam=0.1, anchor="output", target="expert", alpha=0.25, task_weights="frobenius",
        rounding="gptq",
        lam_sweep=(0.0, 0.01, 0.1, 1.0, 10.0), sweep_merge="ta", sweep_bits=4,
        ablations=("target=merged", "target=mix", "anchor=weight", "rounding=rtn"),
    ))
    c.eval = ml_collections.ConfigDict(dict(batch_size=800, max_new_tokens=9, progress=True,
                                            limit=ml_collections.config_dict.placeholder(int)))
    c.run = ml_collections.ConfigDict(dict(mesh="", resume=False, cache_dir=""))  # "" = WORKDIR/cache
    _resize(c, size)
    return c


def _resize(c: ml_collections.ConfigDict, size: str) -> None:
    """Reduced sizes: "small" for Colab, "tiny" for the CI tests."""
    if size == "full":
        return
    if size == "small":
        c.suite.update(dict(n_val=100, n_test=200))
        c.calib.update(dict(n_per_task=64, lam_sweep=(0.0, 0.1, 1.0)))
    elif size == "tiny":
        c.suite.update(dict(tasks=["count", "modulo", "sort", "brackets"], n_train=96, n_val=16, n_test=24))
        c.model.update(dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                            num_key_value_heads=1))
        c.train.update(dict(batch_size=32))
        c.train.pretrain.update(dict(steps=20, warmup_steps=5))
        c.train.finetune.update(dict(steps=10, warmup_steps=2))
        c.merge.update(dict(methods=("ta", "regmean"), scalings=(0.3, 1.0), regmean_alphas=(0.5, 1.0)))
        c.quant.update(dict(bits=(4,), group_size=16))
        c.calib.update(dict(n_per_task=16, batch_size=16, lam_sweep=(0.0, 0.1), ablations=("anchor=weight",)))
        c.eval.update(dict(batch_size=128, progress=False))
    else:
        raise ValueError(f"offline_llm: size must be 'full', 'small' or 'tiny', got {size!r}")
