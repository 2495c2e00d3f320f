"""Per-sequence summed log-probs of the answer tokens of a batch (the arrays of `data.pad_batch`): what the
SFT loss, the DPO loss and DPO's reference pass need from the model. Pure."""

from __future__ import annotations

from mlx_cai import backend  # noqa: F401  (BLAS before mlx.core)

import mlx.core as mx

from mlx_cai import kernels
from mlx_cai.losses import sequence_logps
from mlx_cai.train.data import completion_mask

# Model types whose logits are head(backbone(tokens)) with mlx-lm's layout (`model.model`, `lm_head` or tied).
HEAD_SPLIT_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def split_head(model):
    """(backbone, head) where logits = head(backbone(tokens)), or None for other architectures."""
    args = getattr(model, "args", None)
    if getattr(args, "model_type", None) not in HEAD_SPLIT_TYPES or not hasattr(model, "model"):
        return None
    if getattr(args, "tie_word_embeddings", False):
        return model.model, model.model.embed_tokens.as_linear
    return (model.model, model.lm_head) if hasattr(model, "lm_head") else None


def answer_logps(model, tokens: mx.array, lengths: mx.array, positions: mx.array, rows: mx.array):
    """Per-sequence summed log-probs of the answer tokens and their counts, both (B,).

    The vocabulary projection runs only at the K answer positions (the prompt and padding never reach the
    (·, V) logits): for a short-prompt chat batch that is a third less head work and a (K, V) instead of
    (B, W, V) logits buffer. Other architectures take the full logits and mask them.
    """
    targets = tokens[:, 1:]
    parts = split_head(model)
    if parts is None:
        return sequence_logps(model(tokens[:, :-1]), targets, completion_mask(lengths, targets.shape[1]))
    backbone, head = parts
    hidden = backbone(tokens[:, :-1])
    logits = head(hidden.reshape(-1, hidden.shape[-1])[positions])  # (K, V)
    token_logps = kernels.token_logprobs(logits, targets.reshape(-1)[positions])  # (K,)
    onehot = (rows[None, :] == mx.arange(tokens.shape[0])[:, None]).astype(mx.float32)  # (B, K)
    return onehot @ token_logps, onehot.sum(axis=-1)
