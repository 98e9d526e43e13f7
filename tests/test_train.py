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


def test_prototype_head_is_the_class_mean_of_normalised_features():
    rng = np.random.default_rng(1)
    feats = rng.normal(size=(50, 6)).astype(np.float32)
    labels = np.repeat(np.arange(3), [10, 15, 25]).astype(np.int32)
    cfg = ml_collections.ConfigDict(dict(kind="prototype"))
    head = train.fit_head(feats, labels, 3, cfg, logit_scale=10.0, seed=0)
    unit = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    ref = np.stack([unit[labels == c].mean(0) for c in range(3)], axis=1)
    np.testing.assert_allclose(np.asarray(head["kernel"]), ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"classes \[3\] have no example"):
        train.fit_head(feats, labels, 4, cfg, logit_scale=10.0, seed=0)
    with pytest.raises(ValueError, match="train.head.kind='knn'"):
        train.fit_head(feats, labels, 3, ml_collections.ConfigDict(dict(kind="knn")),
                       logit_scale=10.0, seed=0)


def test_pretrain_loss_with_two_label_columns_sums_both_heads(monkeypatch):
    rng = np.random.default_rng(2)
    f = rng.normal(size=(7, 4))
    heads = [{"kernel": rng.normal(size=(4, 5))}, {"kernel": rng.normal(size=(4, 3))}]
    y = np.stack([rng.integers(0, 5, 7), rng.integers(0, 3, 7)], axis=1)

    def xent_ref(w, labels):
        z = 10.0 * (f / np.linalg.norm(f, axis=1, keepdims=True)) @ (
            w / np.linalg.norm(w, axis=0, keepdims=True))
        z = z - z.max(1, keepdims=True)
        return -(z[np.arange(7), labels] - np.log(np.exp(z).sum(1))).mean()

    # features = the inputs, so the loss sees f directly
    monkeypatch.setattr(train, "_features", lambda graphdef, p, xb: jnp.asarray(xb, jnp.float32))
    value = train._pretrain_loss(None, 10.0, {"encoder": None, "head": heads}, None, f, y)
    assert float(value) == pytest.approx(xent_ref(heads[0]["kernel"], y[:, 0])
                                         + xent_ref(heads[1]["kernel"], y[:, 1]), rel=1e-5)


def test_train_all_builds_the_suite_through_tfds(trained):
    cfg, suite, cache, first, _ = trained
    out = train.train_all(cfg, cache)  # suite=None: written to and read from cache/tfds
    assert out.timings["cache_hits"] == 1 + 2 * len(suite)
    assert len(os.listdir(os.path.join(cache, "tfds"))) == len(suite)


# ----------------------------------------------------------------------------- multi-task model


def test_multitask_batches_are_balanced_mixtures_of_every_task(monkeypatch):
    rng = np.random.default_rng(0)
    data = [(rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8),
             rng.integers(0, c, n).astype(np.int32)) for n, c in ((64, 10), (40, 2))]
    heads = [{"kernel": jnp.ones((8, 10))}, {"kernel": jnp.ones((8, 2))}]
    seen = {}

    def fake_optimize(loss, graphdef, scale, params, const, batches, steps, cfg, *, desc):
        seen.update(loss=loss, const=const, steps=steps, batches=[next(batches) for _ in range(10)])
        return params

    monkeypatch.setattr(train, "_optimize", fake_optimize)
    cfg = ml_collections.ConfigDict(dict(lr=1e-3, epochs=2))
    train.multitask_finetune(None, {}, heads, data, cfg, logit_scale=10.0, batch_size=16, seed=0)
    assert seen["loss"] is train._multitask_loss and seen["const"] == tuple(heads)  # heads: constants
    assert seen["steps"] == int(np.ceil(2 * (64 + 40) / 16)) == train.multitask_steps(cfg, [64, 40], 16)
    lookup = [{img.tobytes(): (i, lab) for i, (img, lab) in enumerate(zip(*d))} for d in data]
    drawn = [[], []]
    for xb, yb in seen["batches"]:
        assert xb.shape == (2, 8, 28, 28, 1) and yb.shape == (2, 8)  # 8 images of each task
        for t in range(2):
            for img, lab in zip(xb[t], yb[t]):
                i, want = lookup[t][img.tobytes()]  # KeyError: not an image of task t
                assert lab == want
                drawn[t].append(i)
    # without replacement within an epoch: 64 = 8 batches of task 0, 40 = 5 of task 1
    assert sorted(drawn[0][:64]) == list(range(64))
    assert sorted(drawn[1][:40]) == sorted(drawn[1][40:80]) == list(range(40))
    with pytest.raises(ValueError, match="batch_size=1 over 2 tasks"):
        train.multitask_finetune(None, {}, heads, data, cfg, logit_scale=10.0, batch_size=1, seed=0)
    with pytest.raises(ValueError, match="1 heads for 2 tasks"):
        train.multitask_finetune(None, {}, heads[:1], data, cfg, logit_scale=10.0, batch_size=16,
                                 seed=0)


def test_multitask_loss_is_the_mean_of_each_tasks_loss_against_numpy(trained):
    cfg, suite, _, first, _ = trained
    xb = np.stack([suite[t].train[0][:6] for t in suite.names])  # (2, 6, 28, 28, 1)
    yb = np.stack([suite[t].train[1][:6] for t in suite.names])
    heads = tuple(first.heads[t] for t in suite.names)
    value = train._multitask_loss(first.graphdef, 10.0, first.pretrained, heads, xb, yb)
    model = first.model(first.pretrained)
    ref = []
    for t in range(2):
        f = np.asarray(model.get_image_features(jnp.asarray(xb[t], jnp.float32) / 127.5 - 1.0),
                       np.float64)
        w = np.asarray(heads[t]["kernel"], np.float64)
        z = 10.0 * (f / np.linalg.norm(f, axis=1, keepdims=True)) @ (
            w / np.linalg.norm(w, axis=0, keepdims=True))
        logp = z - z.max(1, keepdims=True) - np.log(np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True))
        ref.append(-logp[np.arange(6), yb[t]].mean())
    assert float(value) == pytest.approx(np.mean(ref), rel=1e-4)


def test_multitask_finetune_trains_the_encoder_only(trained):
    cfg, suite, _, first, _ = trained
    heads = [first.heads[t] for t in suite.names]
    before = [_leaves(h) for h in heads]
    mt = train.multitask_finetune(first.graphdef, first.pretrained, heads,
                                  [suite[t].train for t in suite.names],
                                  ml_collections.ConfigDict(dict(lr=1e-2, steps=3)),
                                  logit_scale=10.0, batch_size=16, seed=0)
    assert jax.tree.structure(mt) == jax.tree.structure(first.pretrained)  # no head leaf trained
    for b, h in zip(before, heads):
        for x, y in zip(b, _leaves(h)):
            np.testing.assert_array_equal(x, y)
    assert all(not np.array_equal(a, b) for a, b in zip(_leaves(first.pretrained), _leaves(mt)))


def test_train_all_caches_the_multitask_model(trained):
    cfg, suite, cache, first, _ = trained
    assert first.multitask is None
    cfg = _cfg()
    cfg.train.multitask = dict(lr=1e-2, steps=3)
    out = train.train_all(cfg, cache, suite, multitask=True)
    assert out.timings["cache_hits"] == 1 + 2 * len(suite) and out.timings["multitask"] > 0
    again = train.train_all(cfg, cache, suite, multitask=True)
    assert again.timings["cache_hits"] == 2 + 2 * len(suite) and again.timings["multitask"] == 0
    for x, y in zip(_leaves(out.multitask), _leaves(again.multitask)):
        np.testing.assert_array_equal(x, y)
    cfg.train.multitask.lr = 5e-3  # only the multi-task model depends on it
    assert train.train_all(cfg, cache, suite, multitask=True).timings["cache_hits"] == 1 + 2 * len(suite)
    del cfg.train["multitask"]
    with pytest.raises(ValueError, match="train.multitask section"):
        train.train_all(cfg, cache, suite, multitask=True)


def test_cache_keys_change_with_the_regime(trained):
    cfg, suite, cache, first, _ = trained
    broad = _cfg()
    broad.suite.regime, broad.suite.pretrain_clusters = "broad", 4
    broad.suite.pretrain_labels = "content+domain"  # two pretraining heads
    names = set(os.listdir(cache))
    out = train.train_all(broad, cache, suite)
    assert out.timings["cache_hits"] == 0  # pretraining, heads and experts all new
    new = set(os.listdir(cache)) - names
    assert sorted(n.split("-")[0] for n in new) == ["expert", "expert", "head", "head", "pretrained"]
    assert any(not np.array_equal(a, b) for a, b in zip(_leaves(first.pretrained), _leaves(out.pretrained)))
