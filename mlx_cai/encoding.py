"""One chat encoding for generation and training: token ids of a chat with the model's chat template (or,
for a base model without one, the turns joined by blank lines), and the prompt offset of a chat that ends
with the assistant's answer (training masks the prompt out of the loss). Pure.

Tokenizers are mlx-lm's TokenizerWrapper (mlx_cai.models.load, mlx_lm.load): its apply_chat_template returns
plain ids (it sets return_dict=False for a Hugging Face template; custom renderers take no such argument).
"""

from __future__ import annotations

from typing import Sequence

from mlx_cai.train.config import TrainingError


def chat_tokens(tokenizer, messages: Sequence[dict], add_generation_prompt: bool) -> list[int]:
    if getattr(tokenizer, "chat_template", None):
        return list(tokenizer.apply_chat_template(list(messages), add_generation_prompt=add_generation_prompt))
    # A base model without a template: turns joined by blank lines, the answer closed by the end token.
    text = "\n\n".join(m["content"] for m in messages) + ("\n\n" if add_generation_prompt else "")
    ids = list(tokenizer.encode(text))
    if not add_generation_prompt and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return ids


def encode_prompt(tokenizer, prompt: Sequence[dict]) -> list[int]:
    """Token ids of the prompt turns plus the assistant generation prompt."""
    return chat_tokens(tokenizer, prompt, add_generation_prompt=True)


def encode_chat(tokenizer, messages: list[dict], prompt_ids: list[int] | None = None) -> tuple[list[int], int]:
    """Token ids of a chat that ends with the assistant's answer, and the prompt length: the loss covers
    ids[offset:] (the answer and its end-of-turn tokens). `prompt_ids`: encode_prompt of messages[:-1], when
    the caller has it already (DPO encodes two answers to one prompt)."""
    if not messages or messages[-1].get("role") != "assistant":
        raise TrainingError("a training chat must end with an assistant message")
    prompt = encode_prompt(tokenizer, messages[:-1]) if prompt_ids is None else prompt_ids
    full = chat_tokens(tokenizer, messages, add_generation_prompt=False)
    if full[: len(prompt)] != prompt:
        raise TrainingError("the chat template does not render the prompt as a prefix of the full chat, "
                            "so prompt tokens cannot be masked")
    return full, len(prompt)
