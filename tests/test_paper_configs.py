"""The paper's config files load, carry the documented sections and keys, and cite METHOD.md §8."""

import re
from pathlib import Path

import ml_collections
import pytest

from epmq_jax.config import load_config
from epmq_jax.data.glue import GLUE_TASK_NAMES
from epmq_jax.models.templates import TASKS, TASKS_8, TASKS_20

CONFIGS = Path(__file__).resolve().parent.parent / "configs"

# file -> (published numbers of METHOD.md §8 that its docstring must quote, base, #tasks, merge)
PAPER = {
    "clip_vit_b32_ta8": (("65.0", "73.6"), "openai/clip-vit-base-patch32", 8, "ta"),
    "clip_vit_b32_ties8": (("69.1", "74.8"), "openai/clip-vit-base-patch32", 8, "ties"),
    "clip_vit_b32_ta14": ((), "openai/clip-vit-base-patch32", 14, "ta"),
    "clip_vit_l14_ta20": (("34.8", "76.7"), "openai/clip-vit-large-patch14", 20, "ta"),
    "flan_t5_base_glue": (("78.26", "83.34"), "google/flan-t5-base", 8, "ta"),
}

KEYS = {
    "model_pool": ("kind", "base", "experts", "tokenizer", "revision", "dtype"),
    "task_pool": ("kind",),
    "data": ("tasks", "data_dir", "calib_split", "eval_split"),
    "merge": ("methods", "scaling", "ties_density", "ties_trim", "filter"),
    "quant": ("bits", "methods", "group_size", "symmetric", "damp", "filter", "checkpoint_bits",
              "checkpoint_methods"),
    "calib": ("n_per_task", "seed", "batch_size", "lam", "anchor", "target", "alpha",
              "task_weights", "rounding"),
    "eval": ("batch_size", "limit"),
    "run": ("mesh", "resume"),
}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_config_loads_with_documented_keys(name):
    numbers, base, n_tasks, merge = PAPER[name]
    path = CONFIGS / f"{name}.py"
    cfg = load_config(path)
    assert isinstance(cfg, ml_collections.ConfigDict)
    assert cfg.name == name
    for section, keys in KEYS.items():
        assert section in cfg, f"{name}: no '{section}' section"
        missing = [k for k in keys if k not in cfg[section]]
        assert not missing, f"{name}: {section} lacks {missing}"
    assert cfg.model_pool.base == base
    assert cfg.merge.methods == ((merge,) if name.startswith("flan") else (merge, "regmean"))
    assert cfg.merge.scaling == 0.3
    assert cfg.quant.bits == (4,) and cfg.quant.group_size == 128
    assert set(cfg.quant.methods) == {"rtn", "gptq", "awq", "epmq"}
    assert len(cfg.data.tasks) == n_tasks == len(cfg.model_pool.experts)
    assert set(cfg.model_pool.experts) == set(cfg.data.tasks)
    assert cfg.calib.n_per_task > 0

    doc = path.read_text().split('"""')[1]
    assert f"epmq run --config configs/{name}.py" in doc
    assert re.search(r"runtime", doc, re.I) and re.search(r"\d+(\.\d+)? (minutes|hours?)", doc)
    for number in numbers:
        assert number in doc, f"{name}: docstring lacks the published number {number}"


def test_clip_experts_are_fusion_bench_repos():
    b32 = load_config(CONFIGS / "clip_vit_b32_ta8.py")
    assert tuple(b32.data.tasks) == TASKS_8
    assert b32.model_pool.experts["stanford_cars"] == "tanganke/clip-vit-base-patch32_stanford-cars"
    assert b32.model_pool.experts["sun397"] == "tanganke/clip-vit-base-patch32_sun397"
    l14 = load_config(CONFIGS / "clip_vit_l14_ta20.py")
    assert tuple(l14.data.tasks) == TASKS_20 and set(TASKS_20) <= set(TASKS)
    assert l14.model_pool.experts["oxford_iiit_pet"] == "tanganke/clip-vit-large-patch14_oxford-iiit-pet"
    assert l14.model_pool.experts["emnist_letters"] == "tanganke/clip-vit-large-patch14_emnist_letters"
    # deriving a config must not change the one it derives from
    assert load_config(CONFIGS / "clip_vit_b32_ta8.py").to_dict() == b32.to_dict()


def test_t5_config_names_glue_experts_and_quantizes_block_kernels_only():
    cfg = load_config(CONFIGS / "flan_t5_base_glue.py")
    assert tuple(cfg.data.tasks) == GLUE_TASK_NAMES
    assert cfg.model_pool.experts["stsb"] == "tanganke/flan-t5-base_glue-stsb"
    filt = re.compile(cfg.quant.filter)
    assert filt.search("encoder/block/3/layer/0/SelfAttention/q/kernel")
    assert filt.search("decoder/block/11/layer/1/EncDecAttention/o/kernel")
    assert filt.search("decoder/block/0/layer/2/DenseReluDense/wi_1/kernel")
    assert not filt.search("lm_head/kernel")
    assert not filt.search("encoder/block/0/layer/0/SelfAttention/relative_attention_bias/embedding")


def test_clip_quant_filter_matches_encoder_linears_only():
    filt = re.compile(load_config(CONFIGS / "clip_vit_b32_ta8.py").quant.filter)
    assert filt.search("encoder/layers/11/mlp/fc2/kernel")
    assert filt.search("vision_model/encoder/layers/0/self_attn/out_proj/kernel")
    assert not filt.search("embeddings/patch_embedding/kernel")
    assert not filt.search("visual_projection/kernel")
