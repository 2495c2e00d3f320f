"""Plain generation over a prompts file: reads .txt/.jsonl prompts, appends one record per prompt to JSONL.

Reads: PROMPTS (.txt one per line, or .jsonl with `prompt` or `messages`, optional `id`).
Writes: OUT.jsonl records {id, prompt, response, finish_reason, prompt_tokens, completion_tokens, ...}.
Ids come from the prompt content (or the input's `id`), so a rerun skips what is done and never duplicates.
With several processes (mlx.launch), each generates its strided share of the prompts and rank 0 appends the
records of every process's batch k together; rank 0's OUT decides what is done.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Callable

from mlx_cai import distributed
from mlx_cai import records
from mlx_cai.sampling import SamplingConfig
from mlx_cai.generate import generate_iter


@dataclass
class PromptItem:
    id: str
    messages: list[dict]

    @property
    def prompt(self) -> str:
        return next((m["content"] for m in reversed(self.messages) if m["role"] == "user"), "")


def _messages_from(obj: dict, where: str) -> list[dict]:
    if "messages" in obj:
        return records.check_messages(obj["messages"], where)
    if isinstance(obj.get("prompt"), str) and obj["prompt"].strip():
        return [{"role": "user", "content": obj["prompt"]}]
    raise records.RecordError(f"{where}: needs a non-empty `prompt` string or a `messages` list")


def read_prompts(path: str | Path) -> list[PromptItem]:
    """Prompts with stable ids; one-line errors name the file and line."""
    path = Path(path)
    if not path.exists():
        raise records.RecordError(f"{path}: file not found")
    items: list[PromptItem] = []
    if path.suffix == ".jsonl":
        lineno = 0
        with path.open(encoding="utf-8") as f:
            lines = [(i, ln) for i, ln in enumerate(f, 1) if ln.strip()]
        for obj, (lineno, _) in zip(records.read_jsonl(path), lines):
            msgs = _messages_from(obj, f"{path}:{lineno}")
            items.append(PromptItem(str(obj["id"]) if "id" in obj else records.stable_id(msgs), msgs))
    elif path.suffix in (".txt", ""):
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                msgs = [{"role": "user", "content": line.strip()}]
                items.append(PromptItem(records.stable_id(msgs), msgs))
    else:
        raise records.RecordError(f"{path}: unsupported prompts file type '{path.suffix}' (use .txt or .jsonl)")
    if not items:
        raise records.RecordError(f"{path}: no prompts in file")
    seen: dict[str, int] = {}
    for it in items:  # the same prompt twice gets -2, -3 ... so ids stay unique and stable
        n = seen.get(it.id, 0) + 1
        seen[it.id] = n
        if n > 1:
            it.id = f"{it.id}-{n}"
    return items


def pending(items: list[PromptItem], output: str | Path) -> tuple[list[PromptItem], set[str]]:
    done = set(distributed.on_main(lambda: sorted(records.done_ids(output))))
    return [it for it in items if it.id not in done], done


def run(model, tokenizer, items: list[PromptItem], output: str | Path, config: SamplingConfig, *,
        batch_size: int = 32, seed: int = 0, on_record: Callable[[dict], None] | None = None,
        on_tokens: Callable[[int], None] | None = None, extra: dict | None = None) -> Path:
    """Generate for `items` and append records to `output` as each batch finishes (every process's batch k)."""
    info = getattr(model, "mlx_cai_info", None)
    provenance = {"model": getattr(info, "spec", None), "adapter": getattr(info, "adapter", None),
                  "dequantized": getattr(info, "dequantized", None),
                  "temperature": config.temperature, "top_p": config.top_p, "max_tokens": config.max_tokens,
                  "repetition_penalty": config.repetition_penalty, "seed": seed, **(extra or {})}
    mine = distributed.shard(items)
    stream = generate_iter(model, tokenizer, [it.messages for it in mine], config, batch_size=batch_size,
                           seeds=[records.row_seed(seed, it.id) for it in mine], on_tokens=on_tokens)
    batches = math.ceil(len(items[:: distributed.size()]) / batch_size)  # of rank 0, which has the largest share
    with records.writer(output, distributed.is_main()) as w:
        for _ in range(batches):
            recs = [_record(mine[i], g, provenance) for i, g in islice(stream, batch_size)]
            for rec in (r for share in distributed.gather(recs) for r in share):
                w.write(rec)
                if on_record:
                    on_record(rec)
    return Path(output)


def _record(it: PromptItem, g, provenance: dict) -> dict:
    rec = {"id": it.id, "prompt": it.prompt, "response": g.text, "finish_reason": g.finish_reason,
           "prompt_tokens": g.prompt_tokens, "completion_tokens": g.completion_tokens}
    if len(it.messages) > 1:
        rec["messages"] = it.messages
    if g.truncated:
        rec["truncated_prompt_tokens"] = g.truncated
    rec.update(provenance)
    return rec
