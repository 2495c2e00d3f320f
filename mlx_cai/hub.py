"""Hugging Face Hub export: an SFT folder or a pairs file as a `datasets.DatasetDict`, and `--push-to-hub REPO`.

Reads an SFT folder (train.jsonl / valid.jsonl / test.jsonl, each line {"messages": [...]}, as the clean
stage writes it) or one JSONL file of preference pairs {"prompt", "chosen", "rejected"} (or of chat
records {"messages"}). Split names stay train/valid/test, the names `mlx_lm.lora --data REPO` looks for,
so the pushed dataset trains exactly like the local folder. Writes nothing locally.

The token is read from $HF_TOKEN at push time and never stored in configs, records or logs.
"""

from __future__ import annotations

import os
from pathlib import Path

from mlx_cai import records

SFT_SPLITS = ("train", "valid", "test")
PAIR_FIELDS = ("prompt", "chosen", "rejected")


class HubError(ValueError):
    """Nothing to export, a malformed record, or no token; one line."""


def _check_messages(rec: dict, where: str) -> None:
    try:
        records.check_messages(rec.get("messages"), where)
    except records.RecordError as e:  # the same one line, as a HubError
        raise HubError(str(e)) from None


def _sft_rows(path: Path) -> list[dict]:
    rows = list(records.read_jsonl(path, required=("messages",)))
    for i, r in enumerate(rows):
        _check_messages(r, f"{path} record {i + 1}")
    return [{"messages": [{"role": m["role"], "content": m["content"]} for m in r["messages"]]} for r in rows]


def _file_rows(path: Path) -> list[dict]:
    rows = list(records.read_jsonl(path))
    if not rows:
        raise HubError(f"{path}: no records")
    if all(k in rows[0] for k in PAIR_FIELDS):
        keep = PAIR_FIELDS + (("id",) if all("id" in r for r in rows) else ())
        missing = next((i for i, r in enumerate(rows) if not all(k in r for k in PAIR_FIELDS)), None)
        if missing is not None:
            raise HubError(f"{path} record {missing + 1}: needs prompt, chosen and rejected")
        return [{k: r[k] for k in keep} for r in rows]
    if "messages" in rows[0]:
        return _sft_rows(path)
    raise HubError(f"{path}: records need prompt/chosen/rejected (pairs) or messages (SFT)")


def to_dataset_dict(path: str | Path):
    """A DatasetDict of an SFT folder (one split per non-empty file) or of one pairs/SFT file (split 'train')."""
    from datasets import Dataset, DatasetDict

    path = Path(path)
    if path.is_dir():
        splits = {s: _sft_rows(path / f"{s}.jsonl") for s in SFT_SPLITS if (path / f"{s}.jsonl").is_file()}
        splits = {s: rows for s, rows in splits.items() if rows}
        if "train" not in splits:
            raise HubError(f"{path}: no non-empty train.jsonl to export")
    elif path.is_file():
        splits = {"train": _file_rows(path)}
    else:
        raise HubError(f"{path}: no such file or folder")
    try:
        return DatasetDict({s: Dataset.from_list(rows) for s, rows in splits.items()})
    except Exception as e:  # noqa: BLE001 - arrow type clashes between records: a bad input file
        raise HubError(f"{path}: records do not share one schema ({str(e).splitlines()[0]})") from None


def push(path: str | Path, repo: str, *, private: bool = False, token_env: str = "HF_TOKEN") -> str:
    """Convert `path` and push it to the dataset repo `repo`; returns the dataset URL."""
    token = os.environ.get(token_env)
    if not token:
        raise HubError(f"pushing to the Hub needs a write token in ${token_env}")
    if repo.count("/") != 1:
        raise HubError(f"'{repo}' is not a dataset repo id; use OWNER/NAME")
    dd = to_dataset_dict(path)
    try:
        dd.push_to_hub(repo, token=token, private=private)
    except Exception as e:  # noqa: BLE001 - network, auth, permissions: one line for the user
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise HubError(f"push to {repo} failed: {first}") from None
    return f"https://huggingface.co/datasets/{repo}"
