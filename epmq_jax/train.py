"""Training for the offline suite: pretrain an encoder, fit per-task heads, fine-tune experts.

The protocol of the task-arithmetic literature, at a size that trains on a laptop CPU:

1. ``pretrain``: train the project's CLIP vision encoder (``CLIPVisionModelWithProjection``
   with a small config) on plain MNIST digits with a throw-away head.
2. ``fit_head``: per task, fit a linear head on the frozen pretrained encoder's projected,
   L2-normalised embedding (a cosine classifier, like a CLIP zero-shot head).
3. ``finetune``: fine-tune the whole encoder on the task with that head frozen: the expert.
4. Merging (elsewhere) merges encoders only; each task keeps its own head.

Parameters are plain nested dicts of arrays (``nnx.split(model, nnx.Param)[1].to_pure_dict()``),
so the merge and quantization functions apply to them directly; ``TrainedModels.model(params)``
rebuilds an ``nnx`` module. A head is ``{"kernel": float32 (projection_dim, num_classes)}``;
logits are ``logit_scale * normalize(features) @ normalize_columns(kernel)``.

Everything trained is cached with orbax under ``cache_dir``, one directory per stage, named by
a hash of exactly the config entries that stage depends on (so changing one task retrains only
that task's head and expert). Orbax writes to a temporary directory and renames it, so an
interrupted save never leaves a half-written checkpoint that looks finished.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from epmq_jax.data import offline_suite as osuite

Params = dict[str, Any]
Head = dict[str, jax.Array]

log = logging.getLogger(__name__)
_CACHE_VERSION = 1


# ----------------------------------------------------------------------------- model


def make_model(model_cfg: Any) -> nnx.Module:
    """The encoder: the project's ``CLIPVisionModelWithProjection`` with the config's sizes.

    Args:
        model_cfg: the ``model`` section: ``image_size``, ``patch_size``, ``num_channels``,
            ``hidden_size``, ``intermediate_size``, ``num_hidden_layers``,
            ``num_attention_heads``, ``projection_dim``, ``seed`` (initialisation).
    """
    from epmq_jax.models.clip import CLIPVisionConfig, CLIPVisionModelWithProjection

    kw = {k: v for k, v in dict(model_cfg).items() if k != "seed"}
    return CLIPVisionModelWithProjection(CLIPVisionConfig(**kw), rngs=nnx.Rngs(model_cfg.seed))


def split_params(model: nnx.Module) -> tuple[nnx.GraphDef, Params]:
    """``(graphdef, params)`` with params a plain nested dict of arrays."""
    graphdef, state = nnx.split(model, nnx.Param)
    return graphdef, state.to_pure_dict()


def head_logits(features: jax.Array, head: Head, logit_scale: float) -> jax.Array:
    """Cosine-classifier logits.

    Args:
        features: ``(N, projection_dim)`` projected image embeddings.
        head: ``{"kernel": (projection_dim, C)}``.
        logit_scale: the fixed temperature (CLIP's exp(logit_scale) is 100).

    Returns:
        ``(N, C)`` logits.
    """
    f = features / (jnp.linalg.norm(features, axis=-1, keepdims=True) + 1e-6)
    w = head["kernel"]
    w = w / (jnp.linalg.norm(w, axis=0, keepdims=True) + 1e-6)
    return logit_scale * f @ w


def _xent(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


# ----------------------------------------------------------------------------- loops


def _lr_schedule(cfg: Any, steps: int) -> np.ndarray:
    """Per-step learning rates: linear warm-up to ``cfg.lr``, then cosine decay to 0."""
    warmup = min(int(cfg.get("warmup_steps", 0)), max(steps - 1, 0))
    sched = optax.warmup_cosine_decay_schedule(0.0, float(cfg.lr), warmup, max(steps, warmup + 1))
    return np.asarray(sched(jnp.arange(steps)), np.float32)


def _optimizer(weight_decay: float, clip_norm: float) -> optax.GradientTransformation:
    """AdamW without the learning rate (the step multiplies by it, so one compile serves
    every schedule): clip, Adam moments, decoupled weight decay."""
    return optax.chain(optax.clip_by_global_norm(clip_norm), optax.scale_by_adam(),
                       optax.add_decayed_weights(weight_decay))


def _steps(cfg: Any, n: int, batch_size: int) -> int:
    if cfg.get("steps"):
        return int(cfg.steps)
    return int(np.ceil(cfg.epochs * n / batch_size))


def _pixels(images: jax.Array) -> jax.Array:
    return images.astype(jnp.float32) / 127.5 - 1.0


def _features(graphdef: nnx.GraphDef, params: Params, images: jax.Array) -> jax.Array:
    return nnx.merge(graphdef, params).get_image_features(_pixels(images))


# The losses: ``loss(graphdef, logit_scale, trainable, const, x, y)``; ``const`` is not trained.
def _pretrain_loss(graphdef, logit_scale, p, const, xb, yb):
    # yb (b,): one head; yb (b, L): L label columns, one head each, their losses summed
    f = _features(graphdef, p["encoder"], xb)
    if yb.ndim == 1:
        return _xent(head_logits(f, p["head"], logit_scale), yb)
    return sum(_xent(head_logits(f, h, logit_scale), yb[:, i]) for i, h in enumerate(p["head"]))


def _head_loss(graphdef, logit_scale, head, const, fb, yb):
    return _xent(head_logits(fb, head, logit_scale), yb)


def _finetune_loss(graphdef, logit_scale, p, head, xb, yb):
    return _xent(head_logits(_features(graphdef, p, xb), head, logit_scale), yb)


def _multitask_loss(graphdef, logit_scale, p, heads, xb, yb):
    # xb (T, b, H, W, C), yb (T, b): one forward pass, then each task's slice through its own head
    t, b = yb.shape
    feats = _features(graphdef, p, xb.reshape(t * b, *xb.shape[2:])).reshape(t, b, -1)
    return jnp.mean(jnp.stack([_xent(head_logits(feats[i], heads[i], logit_scale), yb[i])
                               for i in range(t)]))


@functools.lru_cache(maxsize=32)
def _train_step(loss: Callable, graphdef: nnx.GraphDef | None, logit_scale: float,
                weight_decay: float, clip_norm: float
                ) -> tuple[optax.GradientTransformation, Callable]:
    """The optimizer and a jitted AdamW step ``(params, opt_state, lr, const, x, y)``; cached,
    so every task (and every learning rate) reuses one compile per batch shape."""
    opt = _optimizer(weight_decay, clip_norm)

    @jax.jit
    def step(params, opt_state, lr, const, xb, yb):
        value, grads = jax.value_and_grad(loss, argnums=2)(graphdef, logit_scale, params, const,
                                                            xb, yb)
        updates, opt_state = opt.update(grads, opt_state, params)
        updates = jax.tree.map(lambda u: -lr * u, updates)
        return optax.apply_updates(params, updates), opt_state, value

    return opt, step


def _epochs(n: int, batch_size: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Index batches of ``batch_size`` from ``range(n)``, reshuffled every epoch (a ragged tail
    is dropped so every batch has one shape)."""
    while True:
        order = rng.permutation(n)
        for pos in range(0, n - batch_size + 1, batch_size):
            yield order[pos: pos + batch_size]


def _optimize(loss: Callable, graphdef: nnx.GraphDef | None, logit_scale: float, params: Any,
              const: Any, batches: Iterator[tuple[np.ndarray, np.ndarray]], steps: int, cfg: Any,
              *, desc: str) -> Any:
    """``steps`` AdamW steps on ``loss(graphdef, logit_scale, params, const, x_batch, y_batch)``
    over ``params`` (``const`` stays fixed), one batch of ``batches`` per step.

    ``cfg`` has ``lr``, optional ``warmup_steps``, ``weight_decay``, ``clip_norm``. Uint8 images
    are converted to the model's input inside the jitted step.
    """
    from tqdm.auto import tqdm

    lrs = _lr_schedule(cfg, steps)
    opt, step = _train_step(loss, graphdef, float(logit_scale),
                            float(cfg.get("weight_decay", 0.0)), float(cfg.get("clip_norm", 1.0)))
    opt_state = opt.init(params)
    bar = tqdm(range(steps), desc=desc, leave=False, mininterval=1.0)
    for i in bar:
        xb, yb = next(batches)
        params, opt_state, value = step(params, opt_state, lrs[i], const, xb, yb)
        if i % 50 == 0 or i == steps - 1:
            bar.set_postfix(loss=f"{float(value):.3f}")
    return params


def _fit(loss: Callable, graphdef: nnx.GraphDef | None, logit_scale: float, params: Any,
         const: Any, x: np.ndarray, y: np.ndarray, cfg: Any, *, batch_size: int, seed: int,
         desc: str) -> Any:
    """Minimises ``loss`` (see :func:`_optimize`) on shuffled minibatches of ``(x, y)``; ``cfg``
    has ``epochs`` or ``steps`` besides the optimizer settings."""
    batch_size = min(batch_size, len(x))
    batches = ((x[i], y[i]) for i in _epochs(len(x), batch_size, np.random.default_rng(seed)))
    return _optimize(loss, graphdef, logit_scale, params, const, batches,
                     _steps(cfg, len(x), batch_size), cfg, desc=desc)


def pretrain(graphdef: nnx.GraphDef, params: Params, images: np.ndarray, labels: np.ndarray,
             cfg: Any, *, num_classes: int | Sequence[int], logit_scale: float, batch_size: int,
             seed: int) -> Params:
    """Pretrains the encoder with throw-away cosine heads that train along.

    Args:
        graphdef, params: the freshly initialised encoder.
        images: uint8 ``(N, 28, 28, 1)``.
        labels: int32 ``(N,)`` with ``num_classes`` an int (one head), or ``(N, L)`` with
            ``num_classes`` L ints (one head per label column; the loss is the sum of theirs).
        cfg: the ``train.pretrain`` section (``lr``, ``epochs``/``steps``, ...).

    Returns:
        The pretrained encoder params (the throw-away heads are dropped).
    """
    proj = int(jax.eval_shape(lambda p: _features(graphdef, p, images[:1]), params).shape[-1])

    def init(key, c):
        return {"kernel": jax.random.normal(key, (proj, c)) * proj ** -0.5}

    if labels.ndim == 1:
        head0 = init(jax.random.key(seed), int(num_classes))
    else:
        if labels.shape[1] != len(num_classes):
            raise ValueError(f"pretrain: labels {labels.shape} need one class count per column, "
                             f"got num_classes={num_classes}")
        keys = jax.random.split(jax.random.key(seed), len(num_classes))
        head0 = [init(k, int(c)) for k, c in zip(keys, num_classes)]
    out = _fit(_pretrain_loss, graphdef, logit_scale, {"encoder": params, "head": head0}, None,
               images, labels, cfg, batch_size=batch_size, seed=seed, desc="pretrain")
    return out["encoder"]


def encode(graphdef: nnx.GraphDef, params: Params, images: np.ndarray, *,
           batch_size: int = 500, sharding: Any = None) -> np.ndarray:
    """Projected embeddings ``(N, projection_dim)`` of uint8 images ``(N, H, W, C)``.

    Runs in batches of ``batch_size``; the last one is zero-padded so one compile serves all.
    With ``sharding`` (a ``NamedSharding`` over the batch axis) each batch is split across its
    devices (``batch_size`` is rounded up to a multiple of the number of devices).
    """
    fn = _encode_fn(graphdef)
    if sharding is not None:
        k = len(sharding.device_set)
        batch_size = -(-batch_size // k) * k
        params = jax.device_put(params, jax.sharding.NamedSharding(sharding.mesh,
                                                                  jax.sharding.PartitionSpec()))
    out = []
    for i in range(0, len(images), batch_size):
        xb = images[i: i + batch_size]
        pad = batch_size - len(xb)
        if pad:
            xb = np.concatenate([xb, np.zeros((pad, *xb.shape[1:]), xb.dtype)])
        if sharding is not None:
            xb = jax.device_put(xb, sharding)
        out.append(np.asarray(fn(params, xb))[: batch_size - pad])
    return np.concatenate(out, axis=0)


_ENCODE_CACHE: dict[Any, Callable] = {}


def _encode_fn(graphdef: nnx.GraphDef) -> Callable:
    if graphdef not in _ENCODE_CACHE:
        _ENCODE_CACHE[graphdef] = jax.jit(functools.partial(_features, graphdef))
    return _ENCODE_CACHE[graphdef]


def fit_head(features: np.ndarray, labels: np.ndarray, num_classes: int, cfg: Any, *,
             logit_scale: float, seed: int) -> Head:
    """A cosine head on fixed features (the frozen encoder's embeddings).

    ``cfg.kind`` (default ``"probe"``): ``"probe"`` fits the kernel by AdamW on the
    cross-entropy (a linear probe); ``"prototype"`` takes each class's column as the mean of its
    L2-normalised features (a nearest-class-mean head, fit by no gradient: like a CLIP
    zero-shot head, one embedding per class name, it is a fair but not an optimal classifier).

    Args:
        features: float ``(N, projection_dim)``; labels int32 ``(N,)``.
        cfg: the ``train.head`` section (``kind``; for a probe ``lr``, ``steps``/``epochs``).

    Returns:
        ``{"kernel": (projection_dim, num_classes)}``.
    """
    kind = cfg.get("kind", "probe")
    d = features.shape[-1]
    if kind == "prototype":
        f = np.asarray(features, np.float64)
        f = f / (np.linalg.norm(f, axis=-1, keepdims=True) + 1e-6)
        counts = np.bincount(labels, minlength=num_classes)
        if (counts == 0).any():
            raise ValueError(f"fit_head: classes {np.flatnonzero(counts == 0).tolist()} have no "
                             f"example among {len(labels)} labels")
        sums = np.zeros((num_classes, d))
        np.add.at(sums, labels, f)
        return {"kernel": jnp.asarray((sums / counts[:, None]).T, jnp.float32)}
    if kind != "probe":
        raise ValueError(f"train.head.kind={kind!r}: expected 'probe' or 'prototype'")
    head = {"kernel": jax.random.normal(jax.random.key(seed), (d, num_classes)) * d ** -0.5}
    return _fit(_head_loss, None, logit_scale, head, None, np.asarray(features, np.float32),
                labels, cfg, batch_size=cfg.get("batch_size", 1024), seed=seed, desc="head")


def _fit_head_on(graphdef: nnx.GraphDef, params: Params, images: np.ndarray,
                 labels: np.ndarray, num_classes: int, cfg: Any, *, logit_scale: float,
                 seed: int) -> Head:
    return fit_head(encode(graphdef, params, images), labels, num_classes, cfg,
                    logit_scale=logit_scale, seed=seed)


def finetune(graphdef: nnx.GraphDef, params: Params, head: Head, images: np.ndarray,
             labels: np.ndarray, cfg: Any, *, logit_scale: float, batch_size: int,
             seed: int, desc: str = "finetune") -> Params:
    """Fine-tunes the encoder on one task; the head is a constant (frozen).

    Returns:
        The expert's encoder params (same tree as ``params``).
    """
    head = jax.tree.map(jnp.asarray, head)
    return _fit(_finetune_loss, graphdef, logit_scale, params, head, images, labels, cfg,
                batch_size=batch_size, seed=seed, desc=desc)


def multitask_steps(cfg: Any, sizes: Sequence[int], batch_size: int) -> int:
    """The multi-task fine-tuning's step count: ``cfg.steps`` if set, else
    ``ceil(cfg.epochs * sum(sizes) / batch_size)`` (``cfg.epochs`` passes over every task's
    training set: with the experts' epochs and batch size, about the sum of their steps)."""
    if cfg.get("steps"):
        return int(cfg.steps)
    return int(np.ceil(cfg.epochs * sum(sizes) / batch_size))


def multitask_finetune(graphdef: nnx.GraphDef, params: Params, heads: Sequence[Head],
                       data: Sequence[osuite.Split], cfg: Any, *, logit_scale: float,
                       batch_size: int, seed: int, desc: str = "multitask") -> Params:
    """Fine-tunes one encoder on every task jointly; every task's head is a constant (frozen).

    Each step's batch is a balanced mixture: ``batch_size // T`` images of every task, each
    task drawn from its own training set reshuffled every epoch; the loss is the mean over
    tasks of each task's cross-entropy through its own head, so every task weighs the same
    whatever its size.

    Args:
        graphdef, params: the pretrained encoder.
        heads: the T tasks' heads ``{"kernel": (projection_dim, C_t)}``.
        data: the T tasks' training sets ``(images uint8 (N_t, 28, 28, 1), labels int32 (N_t,))``.
        cfg: the ``train.multitask`` section: ``lr``, ``epochs`` or ``steps`` (see
            :func:`multitask_steps`), optional ``warmup_steps``, ``weight_decay``, ``clip_norm``.
        batch_size: images per step over all tasks (at least T).

    Returns:
        The multi-task encoder's params (same tree as ``params``).
    """
    t = len(data)
    if t == 0 or len(heads) != t:
        raise ValueError(f"multitask_finetune: {len(heads)} heads for {t} tasks' data, "
                         "expected one head per task and at least one task")
    per_task = batch_size // t
    if per_task < 1 or any(len(x) < per_task for x, _ in data):
        raise ValueError(f"multitask_finetune: batch_size={batch_size} over {t} tasks of "
                         f"{[len(x) for x, _ in data]} images, expected 1 <= batch_size // T <= "
                         "every task's size")
    streams = [_epochs(len(x), per_task, np.random.default_rng([seed, i]))
               for i, (x, _) in enumerate(data)]

    def batches():
        while True:
            idx = [next(s) for s in streams]
            yield (np.stack([x[i] for (x, _), i in zip(data, idx)]),
                   np.stack([y[i] for (_, y), i in zip(data, idx)]))

    heads = tuple(jax.tree.map(jnp.asarray, h) for h in heads)
    steps = multitask_steps(cfg, [len(x) for x, _ in data], batch_size)
    return _optimize(_multitask_loss, graphdef, logit_scale, params, heads, batches(), steps, cfg,
                     desc=desc)


def predict(graphdef: nnx.GraphDef, params: Params, head: Head, images: np.ndarray, *,
            logit_scale: float, batch_size: int = 500, sharding: Any = None) -> np.ndarray:
    """Predicted classes int ``(N,)`` for uint8 images ``(N, H, W, C)`` (``sharding``: see :func:`encode`)."""
    feats = encode(graphdef, params, images, batch_size=batch_size, sharding=sharding)
    return np.asarray(jnp.argmax(head_logits(jnp.asarray(feats), head, logit_scale), axis=-1))


def evaluate(graphdef: nnx.GraphDef, params: Params, head: Head, images: np.ndarray,
             labels: np.ndarray, *, logit_scale: float, batch_size: int = 500,
             sharding: Any = None) -> float:
    """Top-1 accuracy in percent of encoder ``params`` with ``head`` on one task's images.

    Args:
        graphdef: the encoder's graphdef (``TrainedModels.graphdef``).
        params: encoder params (pretrained, an expert, a merge, a dequantized model, ...).
        head: the task's head.
        images: uint8 ``(N, 28, 28, 1)``; labels: int ``(N,)``.
        sharding: optional batch sharding (see :func:`encode`).
    """
    if len(images) != len(labels) or len(images) == 0:
        raise ValueError(f"evaluate: {len(images)} images and {len(labels)} labels")
    pred = predict(graphdef, params, head, images, logit_scale=logit_scale, batch_size=batch_size,
                   sharding=sharding)
    return float(100.0 * np.mean(pred == np.asarray(labels)))


# ----------------------------------------------------------------------------- caching


def config_hash(*parts: Any) -> str:
    """A short stable hash of config sections (ConfigDicts, dicts, scalars)."""
    def plain(x):
        if hasattr(x, "to_dict"):
            x = x.to_dict()
        if isinstance(x, Mapping):
            return {str(k): plain(v) for k, v in sorted(x.items())}
        if isinstance(x, list | tuple):
            return [plain(v) for v in x]
        return x
    blob = json.dumps([_CACHE_VERSION, *[plain(p) for p in parts]], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _cached(path: str, target: Any, compute: Callable[[], Any]) -> tuple[Any, bool]:
    """Restores ``path`` if it holds a finished checkpoint, else computes and saves it.

    Returns:
        ``(tree, hit)``.
    """
    import orbax.checkpoint as ocp

    path = os.path.abspath(path)
    ckptr = ocp.StandardCheckpointer()
    if os.path.isdir(path):
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        return ckptr.restore(path, abstract), True
    tree = compute()
    ckptr.save(path, tree)
    ckptr.wait_until_finished()
    return tree, False


@dataclasses.dataclass
class TrainedModels:
    """Everything trained for the suite.

    Attributes:
        graphdef: the encoder's ``nnx.GraphDef``; ``model(params)`` rebuilds a module.
        pretrained: pretrained encoder params (nested dict of arrays).
        experts: ``{task: expert encoder params}`` in suite order (same tree as ``pretrained``).
        heads: ``{task: {"kernel": (projection_dim, num_classes)}}`` (fit on ``pretrained``).
        logit_scale: the heads' temperature.
        timings: seconds spent per stage (0 for cache hits) and ``cache_hits``.
        multitask: the encoder fine-tuned on every task jointly (heads frozen), or None when
            it was not asked for.
    """

    graphdef: nnx.GraphDef
    pretrained: Params
    experts: dict[str, Params]
    heads: dict[str, Head]
    logit_scale: float
    timings: dict[str, Any]
    multitask: Params | None = None

    def model(self, params: Params) -> nnx.Module:
        return nnx.merge(self.graphdef, params)

    def evaluate(self, params: Params, task: str, images: np.ndarray, labels: np.ndarray, *,
                 batch_size: int = 500) -> float:
        """Accuracy (percent) of encoder ``params`` with ``task``'s head."""
        return evaluate(self.graphdef, params, self.heads[task], images, labels,
                        logit_scale=self.logit_scale, batch_size=batch_size)


def train_all(cfg: Any, cache_dir: str, suite: osuite.Suite | None = None, *,
              multitask: bool = False) -> TrainedModels:
    """Pretrains, fits every task's head, fine-tunes every expert (and the multi-task model),
    with caching.

    Args:
        cfg: the experiment config with sections ``suite``, ``model`` and ``train``
            (see configs/offline_8task.py).
        cache_dir: where the stage checkpoints live (created if missing).
        suite: the built suite (when None: built from ``cfg.suite`` through tfds, with the
            data written once under ``cache_dir/tfds``).
        multitask: also fine-tune one encoder on all tasks (:func:`multitask_finetune` with
            ``train.multitask``).

    Returns:
        ``TrainedModels``.
    """
    if suite is None:
        suite = osuite.build_suite(cfg.suite, data_dir=os.path.join(cache_dir, "tfds"))
    tcfg = cfg.train
    if multitask and tcfg.get("multitask") is None:
        raise ValueError("train_all(multitask=True) needs a train.multitask section "
                         "(lr, epochs or steps); the config has none")
    scale = float(tcfg.logit_scale)
    graphdef, init = split_params(make_model(cfg.model))
    os.makedirs(cache_dir, exist_ok=True)
    timings: dict[str, Any] = {"cache_hits": 0, "pretrain": 0.0, "heads": 0.0, "finetune": 0.0,
                               "multitask": 0.0}

    def timed(stage, path, target, compute):
        t0 = time.perf_counter()
        tree, hit = _cached(path, target, compute)
        timings["cache_hits"] += int(hit)
        if not hit:
            timings[stage] += time.perf_counter() - t0
        return tree

    pre_key = config_hash("pretrain", cfg.model, tcfg.pretrain, tcfg.batch_size, scale,
                          osuite.pretrain_spec(cfg.suite))

    def do_pretrain():
        x, y = osuite.pretrain_data(cfg.suite)
        return pretrain(graphdef, init, x, y, tcfg.pretrain,
                        num_classes=osuite.pretrain_num_classes(cfg.suite), logit_scale=scale,
                        batch_size=tcfg.batch_size, seed=cfg.suite.seed)

    pretrained = timed("pretrain", os.path.join(cache_dir, f"pretrained-{pre_key}"), init,
                       do_pretrain)

    experts, heads, head_keys = {}, {}, []
    suite_key = {k: v for k, v in cfg.suite.to_dict().items() if k != "tasks"}
    for i, task in enumerate(suite.tasks):
        x, y = task.train
        head_key = config_hash("head", pre_key, suite_key, task.name, tcfg.head)
        head_keys.append(head_key)
        d = int(jax.tree.leaves(pretrained["visual_projection"])[0].shape[-1])
        target = {"kernel": jnp.zeros((d, task.num_classes), jnp.float32)}
        head_fn = functools.partial(_fit_head_on, graphdef, pretrained, x, y, task.num_classes,
                                    tcfg.head, logit_scale=scale, seed=cfg.suite.seed + i)
        heads[task.name] = timed(
            "heads", os.path.join(cache_dir, f"head-{task.name}-{head_key}"), target, head_fn)
        ft_key = config_hash("finetune", head_key, tcfg.finetune, tcfg.batch_size)
        ft_fn = functools.partial(finetune, graphdef, pretrained, heads[task.name], x, y,
                                  tcfg.finetune, logit_scale=scale, batch_size=tcfg.batch_size,
                                  seed=cfg.suite.seed + i, desc=f"finetune {task.name}")
        experts[task.name] = timed(
            "finetune", os.path.join(cache_dir, f"expert-{task.name}-{ft_key}"), init, ft_fn)
    mt = None
    if multitask:
        mt_key = config_hash("multitask", head_keys, tcfg.multitask, tcfg.batch_size)
        mt_fn = functools.partial(multitask_finetune, graphdef, pretrained,
                                  [heads[t.name] for t in suite.tasks], [t.train for t in suite.tasks],
                                  tcfg.multitask, logit_scale=scale, batch_size=tcfg.batch_size,
                                  seed=cfg.suite.seed)
        mt = timed("multitask", os.path.join(cache_dir, f"multitask-{mt_key}"), init, mt_fn)
    return TrainedModels(graphdef, pretrained, experts, heads, scale, timings, mt)
