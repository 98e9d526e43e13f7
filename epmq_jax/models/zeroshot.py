"""Zero-shot classification heads for CLIP, as the task-arithmetic literature builds them.

For each class, the prompts (one per template) are embedded by the text tower, each embedding is
L2-normalised, the embeddings are averaged over the templates and the mean is normalised again.
The head stacks these class embeddings as columns, times ``exp(logit_scale)``:
``head (projection_dim, n_classes)``. Each task is scored with its own head:
``logits = normalize(image_embeds) @ head``.

Tokenisation is the caller's (``tokenize(list[str]) -> (input_ids, attention_mask)`` int arrays,
padded to one length); :func:`hf_tokenizer` wraps a transformers tokenizer for it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from epmq_jax.models.clip import CLIPModel
from epmq_jax.models.templates import TaskPrompts, task_prompts

Tokenize = Callable[[list[str]], tuple[np.ndarray, np.ndarray]]


def _normalize(x: jax.Array) -> jax.Array:
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


@nnx.jit
def _text_features(model: CLIPModel, ids: jax.Array, mask: jax.Array) -> jax.Array:
    return model.get_text_features(ids, mask)


def encode_texts(model: CLIPModel, tokenize: Tokenize, texts: list[str],
                 batch_size: int = 256) -> jax.Array:
    """Text embeddings ``(len(texts), projection_dim)`` (not normalised), in fixed-size batches
    (the last one padded by repetition) so that one compiled program serves every task."""
    ids, mask = (np.asarray(a) for a in tokenize(texts))
    if ids.shape != mask.shape or ids.shape[0] != len(texts):
        raise ValueError(f"tokenize returned input_ids {ids.shape} and attention_mask "
                         f"{mask.shape}; expected both ({len(texts)}, seq_len)")
    n = len(texts)
    bs = min(batch_size, n)
    pad = -n % bs
    ids = np.concatenate([ids, np.repeat(ids[-1:], pad, 0)])
    mask = np.concatenate([mask, np.repeat(mask[-1:], pad, 0)])
    out = [_text_features(model, jnp.asarray(ids[i:i + bs]), jnp.asarray(mask[i:i + bs]))
           for i in range(0, len(ids), bs)]
    return jnp.concatenate(out)[:n]


def zeroshot_head(model: CLIPModel, tokenize: Tokenize, task: str | TaskPrompts,
                  batch_size: int = 256) -> jax.Array:
    """A task's classification head.

    Args:
        model: the (base) CLIP model; its text tower and ``logit_scale`` are used.
        tokenize: ``list[str] -> (input_ids, attention_mask)``, ``(n, seq_len)`` each.
        task: a task name of :mod:`epmq_jax.models.templates`, or its :class:`TaskPrompts`.
        batch_size: prompts per text-tower call.

    Returns:
        ``(projection_dim, n_classes)`` float32: normalised template-averaged class embeddings
        as columns, times ``exp(logit_scale)``.
    """
    spec = task_prompts(task) if isinstance(task, str) else task
    n_c, n_t = len(spec.classnames), len(spec.templates)
    texts = [p for row in spec.prompts() for p in row]
    emb = _normalize(encode_texts(model, tokenize, texts, batch_size))
    emb = _normalize(emb.reshape(n_c, n_t, -1).mean(axis=1))
    return jnp.exp(model.logit_scale[...]) * emb.T


def zeroshot_heads(model: CLIPModel, tokenize: Tokenize, tasks: Iterable[str],
                   batch_size: int = 256) -> dict[str, jax.Array]:
    """``{task: zeroshot_head(...)}`` for several tasks."""
    return {t: zeroshot_head(model, tokenize, t, batch_size) for t in tasks}


def classify(image_embeds: jax.Array, head: jax.Array) -> jax.Array:
    """Logits ``(batch, n_classes)`` of image embeddings ``(batch, projection_dim)`` (as from
    ``get_image_features``) under a head from :func:`zeroshot_head`."""
    if image_embeds.ndim != 2 or image_embeds.shape[-1] != head.shape[0]:
        raise ValueError(f"image_embeds has shape {tuple(image_embeds.shape)}; expected "
                         f"(batch, {head.shape[0]}) for a head of shape {tuple(head.shape)}")
    return _normalize(image_embeds) @ head


def hf_tokenizer(path_or_repo_id: str, max_length: int = 77) -> Tokenize:
    """Wraps a transformers tokenizer (e.g. the base CLIP checkpoint's) as a :data:`Tokenize`.

    Needs ``transformers`` (imported here, lazily). Pads every batch to ``max_length``.
    """
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(path_or_repo_id)

    def tokenize(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        out = tok(texts, padding="max_length", max_length=max_length, truncation=True,
                  return_tensors="np")
        return out["input_ids"], out["attention_mask"]

    return tokenize
