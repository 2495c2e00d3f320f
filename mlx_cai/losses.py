"""DPO loss family as pure MLX functions of per-sequence log-probs.

Notation, all shape (B,): ``pc``/``pr`` policy log-prob of the chosen/rejected
completion, ``rc``/``rr`` the same under the frozen reference model (sums over
completion tokens, see `sequence_logps`). The log-ratio margin is
``h = (pc - rc) - (pr - rr)`` and ``d = beta * h``.

Variants (per example, then averaged), in `LOSSES`:

- ``sigmoid`` (Rafailov et al. 2023; cDPO label smoothing eps):
  ``-(1 - eps) log s(d) - eps log s(-d)``
- ``ipo`` (Azar et al. 2023): ``(h - 1 / (2 beta))^2``
- ``hinge`` (SLiC, Zhao et al. 2023): ``relu(1 - d)``
- ``robust`` (Chowdhury et al. 2024, unbiased under label-flip rate eps):
  ``(-(1 - eps) log s(d) + eps log s(-d)) / (1 - 2 eps)``

These match TRL's DPOTrainer definitions of the same names.
"""

from __future__ import annotations

from typing import Callable

import mlx.core as mx

from mlx_cai import kernels


def log_sigmoid(x: mx.array) -> mx.array:
    """Numerically stable ``log(sigmoid(x)) = -log(1 + exp(-x))``, elementwise."""
    return -mx.logaddexp(0.0, -x)


def _sigmoid_loss(h: mx.array, beta: float, eps: float) -> mx.array:
    d = beta * h
    return -(1.0 - eps) * log_sigmoid(d) - eps * log_sigmoid(-d)


def _ipo_loss(h: mx.array, beta: float, eps: float) -> mx.array:
    # IPO regresses the raw log-ratio margin onto 1/(2 beta); beta is not a scale here.
    return (h - 1.0 / (2.0 * beta)) ** 2


def _hinge_loss(h: mx.array, beta: float, eps: float) -> mx.array:
    return mx.maximum(1.0 - beta * h, 0.0)


def _robust_loss(h: mx.array, beta: float, eps: float) -> mx.array:
    # The 1/(1-2eps) debiasing factor blows up at eps = 0.5 (labels pure noise).
    if not 0.0 <= eps < 0.5:
        raise ValueError(f"robust loss needs 0 <= label_smoothing < 0.5, got {eps}")
    d = beta * h
    return (-(1.0 - eps) * log_sigmoid(d) + eps * log_sigmoid(-d)) / (1.0 - 2.0 * eps)


# loss_type -> per-example loss f(h (B,), beta, eps) -> (B,)
LOSSES: dict[str, Callable[[mx.array, float, float], mx.array]] = {
    "sigmoid": _sigmoid_loss,
    "ipo": _ipo_loss,
    "hinge": _hinge_loss,
    "robust": _robust_loss,
}


def dpo_loss(
    policy_chosen: mx.array,
    policy_rejected: mx.array,
    ref_chosen: mx.array,
    ref_rejected: mx.array,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    nll_alpha: float = 0.0,
    chosen_nll: mx.array | None = None,
) -> tuple[mx.array, dict[str, mx.array]]:
    """DPO-family loss of a batch of preference pairs.

    Args:
        policy_chosen, policy_rejected, ref_chosen, ref_rejected: (B,) summed
            completion log-probs (the ref ones are treated as constants).
        beta: KL-strength / reward scale.
        loss_type: a key of `LOSSES`.
        label_smoothing: eps, the assumed preference-label noise (sigmoid, robust).
        nll_alpha: weight of the chosen-answer NLL term (RPO, Pang et al. 2024),
            which keeps chosen likelihood from falling and counters collapse.
        chosen_nll: (B,) per-token-mean NLL of the chosen answer; required if
            ``nll_alpha != 0``.

    Returns:
        loss: scalar, ``mean(LOSSES[loss_type](h)) + nll_alpha * mean(chosen_nll)``.
        metrics: scalars (no gradient) -- ``rewards/chosen``, ``rewards/rejected``
            (batch means of ``beta * (policy - ref)``), ``rewards/accuracies`` (share
            with chosen reward > rejected reward), ``rewards/margins``,
            ``logps/chosen``, ``logps/rejected`` (mean policy log-probs),
            ``loss/dpo`` and ``loss/nll`` (the two unweighted terms; 0 if no NLL).
    """
    if loss_type not in LOSSES:
        raise ValueError(f"unknown loss_type {loss_type!r}; known: {sorted(LOSSES)}")
    if not 0.0 <= label_smoothing <= 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5], got {label_smoothing}")
    if nll_alpha != 0.0 and chosen_nll is None:
        raise ValueError("nll_alpha != 0 requires chosen_nll")

    chosen_logratio = policy_chosen - ref_chosen
    rejected_logratio = policy_rejected - ref_rejected
    h = chosen_logratio - rejected_logratio
    dpo_term = mx.mean(LOSSES[loss_type](h, beta, label_smoothing))
    nll_term = mx.mean(chosen_nll) if chosen_nll is not None else mx.array(0.0)
    loss = dpo_term + nll_alpha * nll_term

    sg = mx.stop_gradient
    r_c = sg(beta * chosen_logratio)
    r_r = sg(beta * rejected_logratio)
    metrics = {
        "rewards/chosen": mx.mean(r_c),
        "rewards/rejected": mx.mean(r_r),
        "rewards/accuracies": mx.mean((r_c > r_r).astype(mx.float32)),
        "rewards/margins": mx.mean(r_c - r_r),
        "logps/chosen": mx.mean(sg(policy_chosen)),
        "logps/rejected": mx.mean(sg(policy_rejected)),
        "loss/dpo": sg(dpo_term),
        "loss/nll": sg(nll_term),
    }
    return loss, metrics


def sequence_logps(
    logits: mx.array, targets: mx.array, mask: mx.array
) -> tuple[mx.array, mx.array]:
    """Summed log-probs of `targets` over masked (completion) positions.

    Args:
        logits: (B, T, V) next-token logits, already aligned with `targets`
            (i.e. ``model(tokens)[:, :-1]`` against ``tokens[:, 1:]``).
        targets: (B, T) int token ids; values under ``mask == 0`` are ignored.
        mask: (B, T), 1 on completion tokens, 0 on prompt and padding.

    Returns:
        sum_logps: (B,) float32, ``sum_t mask * log_softmax(logits)[t, targets[t]]``.
        n_tokens: (B,) float32, ``sum_t mask`` (divide for per-token means).
    """
    # float32: summing hundreds of bf16 log-probs loses the small margins DPO uses.
    logits = logits.astype(mx.float32)
    # Masked-out targets may be ignore ids (e.g. -100); any valid id works there.
    targets = mx.where(mask.astype(mx.bool_), targets, 0)
    # logit[target] - logsumexp avoids materializing a full (B, T, V) log-softmax (one fused CPU kernel).
    token_logps = kernels.token_logprobs(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    token_logps = token_logps.reshape(targets.shape)
    m = mask.astype(mx.float32)
    return mx.sum(token_logps * m, axis=-1), mx.sum(m, axis=-1)
