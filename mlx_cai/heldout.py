"""Train prompts a run never read: where to choose between checkpoints or variants without looking at the eval split.

A run's data stages read user prompts from revise.jsonl (SL-CAI records: `prompt`), clean's chat JSONL
(`messages`) and the preference pairs (`prompt`: a string or a list of turns). Every other prompt of the shipped
`train` split is unused, and `split` cuts the unused ones of a kind in two disjoint sets: the validation set
(`bench/validation.py` checks a run's models on it: the first VALIDATION round-robin over categories, as it has
since it was written) and the selection set (`mlx_cai.stages.select` chooses the final DPO checkpoint on it:
from the rest, each category's last prompts first). The eval split is never read here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from mlx_cai import evalsets, records

# What the held-out prompts stand for: the harmful suite (attack success) and the safe ones (over-refusal).
KINDS = {"harm": ("harm",), "safe": ("benign", "borderline")}


def user_prompts(path: str | Path) -> set[str]:
    """The user prompts in one run file (JSONL: SL-CAI records, chat examples or preference pairs); none if absent."""
    path = Path(path)
    if not path.exists():
        return set()
    out: set[str] = set()
    for r in records.read_jsonl(path):
        p = r.get("prompt")
        if isinstance(p, str):
            out.add(p)
        turns = p if isinstance(p, list) else r.get("messages") or []
        out.update(m["content"] for m in turns if isinstance(m, dict) and m.get("role") == "user")
    return out


def used_prompts(paths: Iterable[str | Path]) -> set[str]:
    """Every user prompt in these files; a folder stands for its train.jsonl and valid.jsonl (clean's output)."""
    used: set[str] = set()
    for p in map(Path, paths):
        for f in (p / "train.jsonl", p / "valid.jsonl") if p.is_dir() else (p,):
            used |= user_prompts(f)
    return used


def unused(kind: str, used: set[str]) -> list[evalsets.EvalItem]:
    """The shipped train prompts of one kind ('harm' or 'safe') that are not in `used`, in file order."""
    return [it for name in KINDS[kind] for it in evalsets.load_suite(name, "train").items if it.prompt not in used]


VALIDATION = 48  # prompts of each kind in bench/validation.py's set


def split(items: list[evalsets.EvalItem], n_select: int, n_validation: int = VALIDATION
          ) -> tuple[list[evalsets.EvalItem], list[evalsets.EvalItem]]:
    """(validation set, selection set) of one kind's unused prompts: the first n_validation round-robin over
    categories (evalsets.select), then n_select of the rest, round-robin from each category's end."""
    validation = evalsets.select(items, n_validation)
    taken = {it.id for it in validation}
    rest = [it for it in items if it.id not in taken]
    return validation, evalsets.select(rest[::-1], n_select)[::-1]


def write(items: Iterable[evalsets.EvalItem], path: str | Path) -> Path:
    """A prompt list (id, prompt, category) that `mlx-cai eval --suite PATH:harmful|safe` reads."""
    return records.write_jsonl_atomic(path, ({"id": it.id, "prompt": it.prompt, "category": it.category}
                                             for it in items))
