"""A logistic head on ``minilm-l6`` mean-pooled sentence embeddings: topic logits from an encoder,
for calibrators to be fitted and scored on (the recalibration study's non-LM baseline).
"""
from __future__ import annotations

import torch

from compress.errors import CompressError


@torch.no_grad()
def mean_pooled_embeddings(encoder, tokenizer, texts: list[str], *, batch_size: int = 16, max_length: int = 256,
                           device=None) -> torch.Tensor:
    """[N, H] float32 (CPU) attention-masked mean of the encoder's last hidden states."""
    device = torch.device(device) if device is not None else next(encoder.parameters()).device
    out = []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(texts[start:start + batch_size], padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt").to(device)
        hidden = encoder(**enc).last_hidden_state.float()
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        out.append(((hidden * mask).sum(1) / mask.sum(1).clamp_min(1)).cpu())
    return torch.cat(out)


def embedding_topic_logits(encoder, tokenizer, train, evaluate: dict, *, C: float = 1.0, max_iter: int = 1000,
                           batch_size: int = 16, max_length: int = 256, device=None) -> dict:
    """A scikit-learn LogisticRegression on mean-pooled embeddings of ``train`` (TopicExamples);
    returns {name: (logits [N, C] float32, labels [N])} for every list in ``evaluate`` (the decision
    function: softmax of it is the head's predict_proba). Fit calibrators on one of them
    (e.g. validation) and score on another (test)."""
    from sklearn.linear_model import LogisticRegression  # scikit-learn: a slow import, for this function only

    def embed(examples):
        return mean_pooled_embeddings(encoder, tokenizer, [e.text for e in examples], batch_size=batch_size,
                                      max_length=max_length, device=device)

    y = [e.label for e in train]
    if len(set(y)) < 2:
        raise CompressError("the logistic head needs training examples of at least 2 classes")
    head = LogisticRegression(C=C, max_iter=max_iter).fit(embed(train).numpy(), y)
    n_classes = max(max(y), *(e.label for ex in evaluate.values() for e in ex)) + 1
    out = {}
    for name, examples in evaluate.items():
        scores = torch.from_numpy(head.decision_function(embed(examples).numpy())).float()
        if scores.dim() == 1:  # two classes: sklearn gives the class-1 margin
            scores = torch.stack([torch.zeros_like(scores), scores], 1)
        logits = torch.full((len(examples), n_classes), -1e4)  # classes the head never saw: ~0 probability
        logits[:, torch.as_tensor(head.classes_)] = scores
        out[name] = (logits, torch.tensor([e.label for e in examples]))
    return out
