"""What a local model would answer, read from its next-token logits instead of generated text.

A question whose answer is one of a few fixed options ("(A)"/"(B)", "Yes"/"No", a grade "1".."5") is rendered as a
chat turn followed by the start of the model's answer (an answer prefix such as "The answer is: "); the model's
next-token distribution then gives the probability of each option at once: no generated text, nothing to parse, no
retries, and a graded confidence instead of one sampled word. Small judges (a 1.5B overseer) follow such a question
far more reliably than a free-text rubric (see the judge section of BENCHMARKS.md).

  render_answer_start(tokenizer, conversation, answer_prefix)
                                                (pure) the conversation as the model reads it, then the start
                                                of its answer
  option_tokens(tokenizer, context, options)    (pure) the ids of `context` up to where the options' encodings first
                                                differ, and the one differing token of each option
  option_logits(model, tokenizer, contexts, options)
                                                per context, the logits of those tokens and the logsumexp over the
                                                vocabulary (left-padded batches; only the last position's logits)
  option_probs(...)                             the options' probabilities, normalized over the options, and the
                                                share of the model's probability mass they hold
Used by the feedback stage's (A)/(B) labels and by the probability judges of `eval` (LocalBackend.option_probs).
"""

from __future__ import annotations

import math
from typing import Sequence


class OptionError(ValueError):
    """Options that a tokenizer cannot tell apart by one next token."""


def render_answer_start(tokenizer, conversation: Sequence[dict], answer_prefix: str) -> str:
    """The conversation as the model reads it (its chat template, else the contents one after the other), then
    the start of its answer."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(list(conversation), add_generation_prompt=True,
                                             tokenize=False) + answer_prefix
    return "\n\n".join(m["content"] for m in conversation) + "\n\n" + answer_prefix


def option_tokens(tokenizer, context: str, options: Sequence[str]) -> tuple[list[int], list[int]]:
    """(ids of `context` up to where the encodings of context + option first differ, the differing id of each
    option). Encoding the context together with each option keeps tokens that merge across the seam (a trailing
    space, "(A" in one token) the way the model reads them."""
    if len(options) < 2:
        raise OptionError("at least two options are needed")
    encs = [tokenizer.encode(context + o, add_special_tokens=False) for o in options]
    n = 0
    while all(len(e) > n for e in encs) and len({e[n] for e in encs}) == 1:
        n += 1
    if any(len(e) <= n for e in encs):
        raise OptionError(f"option {options[[len(e) <= n for e in encs].index(True)]!r} is a prefix of another")
    ids = [e[n] for e in encs]
    if len(set(ids)) != len(ids):
        raise OptionError(f"options {list(options)} do not differ in their first token after the context")
    return encs[0][:n], ids


def option_logits(model, tokenizer, contexts: Sequence[str], options: Sequence[str],
                  batch_size: int = 8, keep: bool = True) -> list[tuple[list[float], float]]:
    """Per context: (the next-token logits of each option's token, logsumexp of all next-token logits).
    Longest contexts first, in batches of `batch_size`: llama-family and qwen2 models on the compiled path (its
    shared-prefix prefill: a judge's questions share their opening), others on mlx-lm's left-padded one. On the
    compiled path each context's K/V goes to the model's PrefixStore, so a later call asking another question
    about the same request and reply (ProbHarmJudge's second question) prefills only what follows them; `keep=False`
    skips that copy where no later call asks about the same text (feedback's (A)/(B) questions). The result does not
    depend on the batching nor on the reuse (tested)."""
    from mlx_cai.fastllama import FastLlama, FastRunner  # imports mlx_cai.backend (OpenBLAS) before mlx.core
    from mlx_cai.generate import GenericRunner

    import mlx.core as mx

    items = [option_tokens(tokenizer, c, options) for c in contexts]
    out: list[tuple[list[float], float]] = [([], 0.0)] * len(items)
    order = sorted(range(len(items)), key=lambda i: -len(items[i][0]))
    fast = FastLlama.for_model(model)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        prompts = [items[i][0] for i in idx]
        runner = FastRunner(fast, prompts, 1) if fast else GenericRunner.left_padded(model, prompts)
        logits = runner.prefill().astype(mx.float32)
        if keep:
            runner.retire(list(range(len(idx))), prompts)  # later questions about the same text reuse its K/V
        picked = mx.take_along_axis(logits, mx.array([items[i][1] for i in idx]), axis=-1)
        lse = mx.logsumexp(logits, axis=-1)
        for i, row, total in zip(idx, picked.tolist(), lse.tolist()):
            out[i] = (row, total)
    return out


def normalize(logits: Sequence[float], lse: float) -> tuple[list[float], float]:
    """(probabilities of the options normalized over them, the share of all probability mass they hold)."""
    top = max(logits)
    e = [math.exp(v - top) for v in logits]
    z = sum(e)
    return [v / z for v in e], math.exp(top - lse) * z


def option_probs(model, tokenizer, contexts: Sequence[str], options: Sequence[str],
                 batch_size: int = 8) -> list[tuple[list[float], float]]:
    """Per context: (probabilities of the options, normalized over them; their share of the probability mass)."""
    return [normalize(lg, lse) for lg, lse in option_logits(model, tokenizer, contexts, options, batch_size)]
