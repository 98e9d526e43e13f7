"""BERT in Flax vs transformers' PyTorch BertModel (tiny random config, float32)."""

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("pooler", [True, False])
def test_bert_hidden_states_match_torch(tmp_path, pooler):
    from epmq_jax.models import BertModel, from_pretrained

    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=64,
                                  max_position_embeddings=16, type_vocab_size=2)
    ref = transformers.BertModel(cfg, add_pooling_layer=pooler).eval()
    with torch.no_grad():  # random LayerNorm affine params, so a swapped scale/bias shows
        for name, p in ref.named_parameters():
            if "LayerNorm" in name:
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.2)
    ref.save_pretrained(tmp_path)
    model = from_pretrained(tmp_path)
    assert isinstance(model, BertModel) and (model.pooler is not None) == pooler

    rng = np.random.default_rng(0)
    ids = rng.integers(2, 50, size=(3, 10))
    mask = np.ones((3, 10), np.int64)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    types = (np.arange(10) >= 5).astype(np.int64)[None].repeat(3, 0)
    with torch.no_grad():
        out = ref(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                  token_type_ids=torch.from_numpy(types))
    got = model(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(types))
    valid = mask.astype(bool)  # padded positions' states are not defined by the model's output
    np.testing.assert_allclose(np.asarray(got)[valid], out.last_hidden_state.numpy()[valid],
                               atol=1e-4, rtol=0)
    if pooler:
        np.testing.assert_allclose(model.pooled(got), out.pooler_output.numpy(), atol=1e-4,
                                   rtol=0)
    # no mask and no token types = all ones / all zeros
    with torch.no_grad():
        plain = ref(input_ids=torch.from_numpy(ids)).last_hidden_state.numpy()
    np.testing.assert_allclose(model(jnp.asarray(ids)), plain, atol=1e-4, rtol=0)


def test_bert_from_task_checkpoint(tmp_path):
    """BertFor* checkpoints: names carry ``bert.``; the task head is not part of the encoder."""
    from epmq_jax.models import from_pretrained

    torch.manual_seed(1)
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=32,
                                  max_position_embeddings=8, num_labels=3)
    ref = transformers.BertForSequenceClassification(cfg).eval()
    ref.save_pretrained(tmp_path)
    model = from_pretrained(tmp_path)
    ids = np.random.default_rng(0).integers(0, 50, size=(2, 8))
    with torch.no_grad():
        want = ref.bert(input_ids=torch.from_numpy(ids)).last_hidden_state.numpy()
    np.testing.assert_allclose(model(jnp.asarray(ids)), want, atol=1e-4, rtol=0)
