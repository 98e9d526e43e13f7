"""Training for the offline suite at a tiny size: caching, frozen heads, accuracy, head fitting."""

import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from epmq_jax import train
from epmq_jax.data import offline_suite as osuite


def _cfg():
    c = ml_collections.ConfigDict()
    c.suite = ml_collections.ConfigDict(dict(tasks=["mnist", "mnist_inverted"], n_train=64,
                                             n_val=16, n_test=40, seed=0, pretrain_n=64))
    c.model = ml_collections.ConfigDict(dict(
        image_size=28, patch_size=7, num_channels=1, hidden_size=16, intermediate_size=32,
        num_hidden_layers=1, num_attention_heads=2, projection_dim=8, seed=0))
    c.train = ml_collections.ConfigDict(dict(
        batch_size=32, logit_scale=10.0,
        pretrain=dict(lr=1e-3, steps=3),
        head=dict(lr=1e-2, steps=5),
        finetune=dict(lr=1e-2, steps=4, warmup_steps=1)))
    return c


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    cfg = _cfg()
    suite = osuite.build_suite(cfg.suite)
    cache = str(tmp_path_factory.mktemp("cache"))
    t0 = time.perf_counter()
    first = train.train_all(cfg, cache, suite)
    t_first = time.perf_counter() - t0
    return cfg, suite, cache, first, t_first


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_cache_hit_skips_training_and_restores_identical_params(trained):
    cfg, suite, cache, first, t_first = trained
    assert first.timings["cache_hits"] == 0
    stages = sorted(os.listdir(cache))
    assert len([s for s in stages if s.startswith("expert-")]) == 2
    assert len([s for s in stages if s.startswith("head-")]) == 2
    t0 = time.perf_counter()
    again = train.train_all(cfg, cache, suite)
    t_again = time.perf_counter() - t0
    assert again.timings["cache_hits"] == 1 + 2 * len(suite)
    assert again.timings["finetune"] == 0.0 and again.timings["pretrain"] == 0.0
    assert t_again < t_first / 2
    for a, b in [(first.pretrained, again.pretrained), (first.experts, again.experts),
                 (first.heads, again.heads)]:
        assert jax.tree.structure(a) == jax.tree.structure(b)
        for x, y in zip(_leaves(a), _leaves(b)):
            np.testing.assert_array_equal(x, y)


def test_cache_key_follows_the_config(trained):
    cfg, suite, cache, first, _ = trained
    changed = _cfg()
    changed.train.finetune.lr = 5e-3  # only the experts depend on this
    keys = {s for s in os.listdir(cache)}
    assert train.config_hash(cfg.train.finetune) != train.config_hash(changed.train.finetune)
    assert train.config_hash(cfg.model) == train.config_hash(_cfg().model)
    out = train.train_all(changed, cache, suite)
    assert out.timings["cache_hits"] == 1 + len(suite)  # pretrained + heads reused
    new = set(os.listdir(cache)) - keys
    assert sorted(n.split("-")[0] for n in new) == ["expert", "expert"]


def test_finetune_keeps_head_frozen_and_moves_encoder(trained):
    cfg, suite, _, first, _ = trained
    task = suite["mnist"]
    head = first.heads["mnist"]
    before = _leaves(head)
    expert = train.finetune(first.graphdef, first.pretrained, head, *task.train,
                            cfg.train.finetune, logit_scale=cfg.train.logit_scale,
                            batch_size=cfg.train.batch_size, seed=0)
    for x, y in zip(before, _leaves(head)):
        np.testing.assert_array_equal(x, y)
    moved = [not np.array_equal(a, b) for a, b in
             zip(_leaves(first.pretrained), _leaves(expert))]
    assert all(moved)  # every encoder leaf is trained
    for a, b in zip(_leaves(first.experts["mnist"]), _leaves(expert)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)  # same seed, same expert


def test_evaluate_against_numpy_reference(trained):
    cfg, suite, _, first, _ = trained
    x, y = suite["mnist_inverted"].test  # 40 images, batch 16: a ragged last batch
    acc = first.evaluate(first.experts["mnist_inverted"], "mnist_inverted", x, y,
                         batch_size=16)
    model = first.model(first.experts["mnist_inverted"])
    feats = np.asarray(model.get_image_features(jnp.asarray(x, jnp.float32) / 127.5 - 1.0),
                       np.float64)
    w = np.asarray(first.heads["mnist_inverted"]["kernel"], np.float64)
    logits = (feats / np.linalg.norm(feats, axis=1, keepdims=True)) @ (
        w / np.linalg.norm(w, axis=0, keepdims=True))
    ref = 100.0 * np.mean(np.argmax(logits, axis=1) == y)
    assert acc == pytest.approx(ref, abs=1e-9)
    with pytest.raises(ValueError, match="3 images and 2 labels"):
        first.evaluate(first.pretrained, "mnist", x[:3], y[:2])


def test_head_logits_against_numpy():
    rng = np.random.default_rng(0)
    f, w = rng.normal(size=(5, 4)), rng.normal(size=(4, 3))
    out = train.head_logits(jnp.asarray(f, jnp.float32), {"kernel": jnp.asarray(w, jnp.float32)},
                            7.0)
    ref = 7.0 * (f / np.linalg.norm(f, axis=1, keepdims=True)) @ (
        w / np.linalg.norm(w, axis=0, keepdims=True))
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-5)


def test_fit_head_separates_linearly_separable_classes():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(3, 8)) * 3.0
    labels = rng.integers(0, 3, 300).astype(np.int32)
    feats = (centers[labels] + 0.3 * rng.normal(size=(300, 8))).astype(np.float32)
    head = train.fit_head(feats, labels, 3, ml_collections.ConfigDict(dict(lr=0.05, steps=200)),
                          logit_scale=10.0, seed=0)
    assert head["kernel"].shape == (8, 3)
    pred = np.argmax(np.asarray(train.head_logits(jnp.asarray(feats), head, 10.0)), axis=1)
    assert np.mean(pred == labels) > 0.97


def test_train_all_builds_the_suite_through_tfds(trained):
    cfg, suite, cache, first, _ = trained
    out = train.train_all(cfg, cache)  # suite=None: written to and read from cache/tfds
    assert out.timings["cache_hits"] == 1 + 2 * len(suite)
    assert len(os.listdir(os.path.join(cache, "tfds"))) == len(suite)
