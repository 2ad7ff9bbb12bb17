"""The zoo's encoder entry: all-MiniLM-L6-v2 from its wheel gives real sentence embeddings."""
import pytest
import torch
import torch.nn.functional as F

from compress.models import load_model

pytestmark = pytest.mark.slow


def test_minilm_embeddings_are_semantic():
    m = load_model("minilm-l6", progress=False)
    assert type(m.model).__name__ == "BertModel" and m.model.config.hidden_size == 384
    batch = m.tokenizer(["a cat sits on the mat", "a dog sits on the rug", "stock markets fell sharply"],
                        return_tensors="pt", padding=True)
    with torch.no_grad():
        hidden = m.model(**batch).last_hidden_state
    mask = batch.attention_mask[..., None]
    emb = F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    sim = emb @ emb.T
    assert sim[0, 1] > 0.4 and sim[0, 2] < 0.2 and sim[1, 2] < 0.2  # pets together, finance apart
