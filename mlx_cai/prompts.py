"""Prompt sources for the SL-CAI stage, each prompt with a stable id. Reads only; writes nothing.

Specs accepted by `load(spec)`:

  train:harmful | train:benign | train:borderline   the shipped data/*.jsonl, `train` split only
  SPEC,SPEC,...                                     several sources in turn (e.g. train:benign,train:borderline)
  hf:REPO[:DATA_DIR][@SPLIT]                        datasets.load_dataset(REPO, data_dir=DATA_DIR, split=SPLIT or train)
  PATH                                              .jsonl .json .parquet .csv .txt (each also as .gz)

`hf:` specs follow the one grammar of mlx_cai.hfspec (`#SPLIT` is read as `@SPLIT`).

Row formats, detected per row from its fields (first match wins):

  hh-rlhf red-team-attempts   `transcript`            -> the first "Human:" turn
  hh-rlhf harmless/helpful    `chosen` (a string)     -> the first "Human:" turn
  cai-conversation-harmless   `init_prompt`           -> as is
  Alpaca / Alpaca-GPT4        `instruction`, `input`  -> instruction, then input after a blank line
  plain                       `prompt` (a string), or `messages` (first user turn), or one .txt line

A row's own `id` is kept; otherwise the id is a hash of the prompt text, so the same prompt gets the same
id from any file. Our held-out `eval` split is never read for training: an `eval:` spec or a row marked
`split: eval` raises PromptError, and any prompt whose text equals a shipped eval prompt is dropped (counted
in `PromptSet.dropped_eval`), so a Hub set that happens to contain one cannot leak it into training.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from mlx_cai import hfspec
from mlx_cai.records import RecordError, stable_id

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
# Shipped sets usable for training, and whether their prompts are red-team prompts.
SHIPPED = {"harmful": True, "benign": False, "borderline": False}
SPEC_FORMS = ("train:harmful|benign|borderline, hf:REPO[:DATA_DIR][@SPLIT], a .jsonl/.json/.parquet/.csv/.txt file, "
              "or several of them joined by commas")
_FILE_TYPES = (".jsonl", ".json", ".parquet", ".csv", ".txt")


class PromptError(RecordError):
    """A prompt source that cannot be used; one line naming the source (and row, where there is one)."""


@dataclass(frozen=True)
class Prompt:
    id: str
    prompt: str
    source: str  # the spec it came from
    category: str | None = None
    harmful: bool | None = None  # True: a red-team prompt; None: unknown (cleaning treats it as red-team)


@dataclass
class PromptSet:
    """Prompts in source order, with what was left out and why."""

    prompts: list[Prompt]
    source: str
    dropped_eval: int = 0  # equal to a shipped eval prompt
    duplicates: int = 0  # same text as an earlier row
    empty: int = 0  # recognised format but no text

    def __len__(self) -> int:
        return len(self.prompts)

    def __iter__(self) -> Iterator[Prompt]:
        return iter(self.prompts)

    def __getitem__(self, i):
        return self.prompts[i]


# ------------------------------------------------------------------------------------------ row formats

_HUMAN_RE = re.compile(r"(?:^|\n\n)Human:[ \t]*(.*?)(?=\n\nAssistant:|\n\nHuman:|\Z)", re.S)


def first_human_turn(transcript: str) -> str:
    """The first `Human:` turn of an Anthropic-style transcript ('\\n\\nHuman: ...\\n\\nAssistant: ...')."""
    m = _HUMAN_RE.search(transcript)
    return m.group(1).strip() if m else ""


def _alpaca(row: Mapping[str, Any]) -> str:
    extra = str(row.get("input") or "").strip()
    return str(row["instruction"]).strip() + (f"\n\n{extra}" if extra else "")


def _first_user(row: Mapping[str, Any]) -> str:
    users = (m for m in row["messages"] if isinstance(m, Mapping) and m.get("role") == "user")
    return next((str(m.get("content", "")) for m in users), "")


# name -> (detector, extractor, harmful by default). Order matters: cai-conversation rows also carry
# `prompt` and `chosen`, so the specific formats come before the plain one.
FORMATS: dict[str, tuple[Callable[[Mapping], bool], Callable[[Mapping], str], bool | None]] = {
    "hh-red-team": (lambda r: isinstance(r.get("transcript"), str), lambda r: first_human_turn(r["transcript"]), True),
    "hh-preference": (lambda r: isinstance(r.get("chosen"), str) and "Human:" in r["chosen"],
                      lambda r: first_human_turn(r["chosen"]), True),
    "cai-conversation": (lambda r: isinstance(r.get("init_prompt"), str), lambda r: r["init_prompt"].strip(), True),
    "alpaca": (lambda r: isinstance(r.get("instruction"), str), _alpaca, False),
    "plain": (lambda r: isinstance(r.get("prompt"), str), lambda r: r["prompt"].strip(), None),
    "messages": (lambda r: isinstance(r.get("messages"), list), lambda r: _first_user(r).strip(), None),
}


def extract(row: Mapping[str, Any]) -> tuple[str, str, bool | None]:
    """(format name, prompt text, harmful default) of one row; KeyError if no format matches."""
    for name, (detect, get, harmful) in FORMATS.items():
        if detect(row):
            return name, get(row), harmful
    raise KeyError(", ".join(sorted(row)) or "no fields")


# ------------------------------------------------------------------------------------------ held-out eval


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


@lru_cache(maxsize=1)
def eval_texts() -> frozenset[str]:
    """Normalised texts of every shipped eval prompt (all data/*.jsonl rows with split=eval, all turns)."""
    out: set[str] = set()
    for path in sorted(DATA_DIR.glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            row = json.loads(line)
            if row.get("split") == "eval":
                out.update(_norm(t) for t in ([row["prompt"]] if "prompt" in row else row.get("turns", [])))
    return frozenset(out)


# ------------------------------------------------------------------------------------------ readers


def _open_text(path: Path) -> str:
    raw = path.read_bytes()
    if path.suffix == ".gz":
        raw = gzip.decompress(raw)
    return raw.decode("utf-8")


def _file_type(path: Path) -> str:
    suffixes = path.suffixes[-2:] if path.suffix == ".gz" else path.suffixes[-1:]
    kind = suffixes[0] if suffixes else ""
    if kind not in _FILE_TYPES:
        raise PromptError(f"{path}: unsupported prompts file type '{''.join(suffixes) or '(none)'}'; use {SPEC_FORMS}")
    return kind


def _rows_jsonl(path: Path, text: str) -> Iterator[tuple[str, Any]]:
    if text.lstrip().startswith("["):  # hh-rlhf's red_team_attempts.jsonl is one JSON array
        yield from _rows_json(path, text)
        return
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield f"{path}:{lineno}", json.loads(line)
        except json.JSONDecodeError as e:
            raise PromptError(f"{path}:{lineno}: malformed JSON ({e.msg}); fix or delete that line") from None


def _rows_json(path: Path, text: str) -> Iterator[tuple[str, Any]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise PromptError(f"{path}: malformed JSON at line {e.lineno} ({e.msg})") from None
    if isinstance(data, Mapping):  # {"data": [...]} and similar: the one list inside
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise PromptError(f"{path}: expected a JSON list of rows (or an object holding one list)")
        data = lists[0]
    if not isinstance(data, list):
        raise PromptError(f"{path}: expected a JSON list of rows, got {type(data).__name__}")
    for i, row in enumerate(data):
        yield f"{path} row {i}", row


def _rows_csv(path: Path, text: str) -> Iterator[tuple[str, Any]]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    for row in reader:
        yield f"{path}:{reader.line_num}", dict(row)


def _rows_txt(path: Path, text: str) -> Iterator[tuple[str, Any]]:
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip():
            yield f"{path}:{lineno}", {"prompt": line}


def _rows_parquet(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # noqa: BLE001 - any reader failure is a bad input file
        raise PromptError(f"{path}: not a readable parquet file ({str(e).splitlines()[0]})") from None
    for i, row in enumerate(table.to_pylist()):
        yield f"{path} row {i}", row


_TEXT_READERS = {".jsonl": _rows_jsonl, ".json": _rows_json, ".csv": _rows_csv, ".txt": _rows_txt}


def file_rows(path: str | Path) -> Iterator[tuple[str, Any]]:
    """(location, row) pairs of a local file; the location names file and line (or row)."""
    path = Path(path)
    if not path.is_file():
        raise PromptError(f"{path}: file not found")
    kind = _file_type(path)
    if kind == ".parquet":
        return _rows_parquet(path)
    return _TEXT_READERS[kind](path, _open_text(path))


def hub_rows(spec: str) -> Iterator[tuple[str, Any]]:
    """Rows of a Hub dataset (or a local dataset folder) through `datasets.load_dataset`; the split defaults
    to `train`."""
    import datasets

    try:
        hub = hfspec.parse(spec)
    except hfspec.HubSpecError as e:
        raise PromptError(str(e)) from None
    repo, data_dir, split = hub.repo, hub.data_dir, hub.split or "train"
    if split.startswith("eval"):
        raise PromptError(f"{spec}: the '{split}' split is held out for evaluation; use a train split")
    try:
        ds = datasets.load_dataset(repo, data_dir=data_dir, split=split)
    except Exception as e:  # noqa: BLE001 - offline, missing, bad split: all one-line user errors
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PromptError(f"{spec}: cannot load dataset ({first})") from None
    for i, row in enumerate(ds):
        yield f"{spec} row {i}", row


# ------------------------------------------------------------------------------------------ entry point


def load(spec: str | Path, limit: int | None = None) -> PromptSet:
    """Prompts from a spec (see module docstring), deduplicated, eval prompts excluded, at most `limit`."""
    spec = str(spec)
    if "," in spec and not Path(spec).exists():
        return _union(spec, limit)
    hint: bool | None = None
    if spec.startswith("eval:"):
        raise PromptError(f"'{spec}': the eval split is held out and never used for training; use train:{spec[5:]}")
    if spec.startswith("train:"):
        name = spec[len("train:"):]
        if name not in SHIPPED:
            raise PromptError(f"unknown shipped set '{spec}'; choose one of {', '.join('train:' + n for n in SHIPPED)}")
        rows: Iterator[tuple[str, Any]] = (
            (loc, row) for loc, row in file_rows(DATA_DIR / f"{name}.jsonl") if row.get("split") == "train"
        )
        hint = SHIPPED[name]
    elif hfspec.is_hub(spec):
        rows = hub_rows(spec)
        hint = False if "helpful" in spec.lower() else None  # hh-rlhf helpful-base is not red-team data
    else:
        rows = file_rows(spec)
    return _collect(spec, rows, hint, limit)


def _union(spec: str, limit: int | None) -> PromptSet:
    """SPEC_A,SPEC_B,...: each source's prompts in turn; a prompt already taken (same id or text) is a duplicate."""
    parts = [part.strip() for part in spec.split(",")]
    if not all(parts):
        raise PromptError(f"'{spec}': an empty source in the comma-separated list")
    out = PromptSet([], spec)
    ids: set[str] = set()
    texts: set[str] = set()
    for part in parts:
        got = load(part)
        out.dropped_eval += got.dropped_eval
        out.duplicates += got.duplicates
        out.empty += got.empty
        for p in got:
            if p.id in ids or _norm(p.prompt) in texts:
                out.duplicates += 1
                continue
            if limit is not None and len(out.prompts) >= limit:
                return out
            ids.add(p.id)
            texts.add(_norm(p.prompt))
            out.prompts.append(p)
    return out


def _collect(spec: str, rows: Iterator[tuple[str, Any]], hint: bool | None, limit: int | None) -> PromptSet:
    out = PromptSet([], spec)
    by_id: dict[str, str] = {}
    seen_text: set[str] = set()
    held_out = eval_texts()
    for where, row in rows:
        if limit is not None and len(out.prompts) >= limit:
            break
        if not isinstance(row, Mapping):
            raise PromptError(f"{where}: expected an object, got {type(row).__name__}")
        if row.get("split") == "eval":
            raise PromptError(f"{where}: row is in the held-out eval split; "
                              "use train:<set> or a file without eval rows")
        try:
            _, text, harmful = extract(row)
        except KeyError as e:
            raise PromptError(f"{where}: no prompt field (has {e.args[0]}); expected one of transcript, chosen, "
                              "init_prompt, instruction, prompt, messages") from None
        if not text:
            out.empty += 1
            continue
        norm = _norm(text)
        if norm in held_out:
            out.dropped_eval += 1
            continue
        if norm in seen_text:
            out.duplicates += 1
            continue
        seen_text.add(norm)
        own = row.get("id")
        pid = str(own) if isinstance(own, (str, int)) and str(own).strip() else stable_id(text)
        if pid in by_id:
            raise PromptError(f"{where}: id '{pid}' is used twice for different prompts (first at {by_id[pid]})")
        by_id[pid] = where
        if isinstance(row.get("harmful"), bool):
            harmful = row["harmful"]
        elif hint is not None:
            harmful = hint
        category = row.get("category")
        out.prompts.append(Prompt(pid, text, spec, str(category) if category is not None else None, harmful))
    if not out.prompts:
        raise PromptError(f"{spec}: no usable prompts")
    return out
