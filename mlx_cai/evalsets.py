"""Evaluation suites: the shipped sets in data/ and external sets in their public formats, as `EvalItem`s.

Reads (nothing is written):
  harm | benign | borderline | mtbench   data/*.jsonl, filtered by split (default `eval`; never trained on)
  path.jsonl  FastChat MT-Bench question.jsonl (question_id, category, turns, reference?) or prompts (prompt)
  path.csv    XSTest (prompt, type, label safe/unsafe), AdvBench (goal), HarmBench (Behavior, *Category)
  path.txt    one prompt per line
  hf:REPO[:DATA_DIR][@SPLIT]
              a Hugging Face dataset (or a local data folder) through `datasets.load_dataset`, its rows read
              like the files above; without a split, its only one (the grammar of mlx_cai.hfspec, shared with
              prompt sources; `#SPLIT`, the older spelling, still works)

A suite spec may end in `:harmful`, `:safe` or `:chat` to say what its prompts are for (what metric they feed):
harmful -> attack success rate, safe -> over-refusal, chat -> helpfulness. Shipped and XSTest/AdvBench/HarmBench/
MT-Bench sets know their kind; a plain prompt list without a `label` column counts as harmful unless told.
Bad input is one line naming the file and line.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Iterator

from mlx_cai import hfspec
from mlx_cai.records import RecordError, numbered_jsonl, stable_id

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
SHIPPED = {"harm": ("harmful.jsonl", "harmful"), "benign": ("benign.jsonl", "safe"),
           "borderline": ("borderline.jsonl", "safe"), "mtbench": ("mtbench.jsonl", "chat")}
KINDS = ("harmful", "safe", "chat")
SPLITS = ("eval", "train", "all")


class EvalSetError(RecordError):
    """A suite that cannot be read; one line naming the file (and line)."""


@dataclass(frozen=True)
class EvalItem:
    """One evaluation prompt. `turns` holds the user turns (one for single-turn suites)."""

    id: str
    suite: str
    category: str
    kind: str  # "harmful" | "safe" | "chat"
    turns: tuple[str, ...]
    reference: tuple[str, ...] | None = None  # reference answers per turn (MT-Bench math/reasoning/coding)

    @property
    def prompt(self) -> str:
        return self.turns[0]


@dataclass
class Suite:
    name: str
    source: str
    items: list[EvalItem] = field(default_factory=list)


def items_hash(items: Iterable[EvalItem]) -> str:
    """Identifies an exact prompt selection, so reports can refuse to compare different ones."""
    return stable_id(sorted(i.id for i in items))


class _Missing(Exception):
    pass


def _get(row: dict, *keys: str) -> str:
    for k in keys:
        v = row.get(k)
        if isinstance(v, str) and v.strip():
            return v
        if v is not None and not isinstance(v, str) and k.endswith("id"):
            return str(v)
    raise _Missing(" or ".join(f"`{k}`" for k in keys))


def _turns(row: dict) -> tuple[str, ...]:
    t = row.get("turns")
    if not isinstance(t, list) or not t or not all(isinstance(x, str) and x.strip() for x in t):
        raise _Missing("`turns` (a non-empty list of strings)")
    return tuple(t)


def _reference(row: dict, n: int) -> tuple[str, ...] | None:
    ref = row.get("reference")
    if ref in (None, [], ""):
        return None
    if isinstance(ref, str):
        ref = [ref]
    if not isinstance(ref, list) or not all(isinstance(x, str) for x in ref):
        raise _Missing("`reference` as a list of strings (or null)")
    return tuple(ref[:n])


def _label_kind(row: dict) -> str:
    label = str(row.get("label", "")).strip().lower()
    kinds = {"safe": "safe", "unsafe": "harmful", "harmful": "harmful", "benign": "safe"}
    if label not in kinds:
        raise _Missing("`label` safe/unsafe")
    return kinds[label]


# Each public format: (how to spot it from the column names, row -> (id or None, turns, category, kind, reference)).
Row = tuple[str | None, tuple[str, ...], str, str | None, tuple[str, ...] | None]


def _mtbench(row: dict, suite: str) -> Row:
    turns = _turns(row)
    return (_get(row, "question_id", "id"), turns, _get(row, "category"), "chat", _reference(row, len(turns)))


def _xstest(row: dict, suite: str) -> Row:
    return (row.get("id") and str(row["id"]), (_get(row, "prompt"),), _get(row, "type"), _label_kind(row), None)


def _advbench(row: dict, suite: str) -> Row:
    return (None, (_get(row, "goal"),), str(row.get("category") or suite), "harmful", None)


def _harmbench(row: dict, suite: str) -> Row:
    prompt = _get(row, "Behavior")
    ctx = row.get("ContextString")
    if isinstance(ctx, str) and ctx.strip():  # contextual behaviors: HarmBench puts the context first
        prompt = f"{ctx}\n\n---\n\n{prompt}"
    rid = row.get("BehaviorID")
    return (str(rid) if rid else None, (prompt,), _get(row, "SemanticCategory", "FunctionalCategory"), "harmful", None)


def _prompts(row: dict, suite: str) -> Row:
    kind = _label_kind(row) if row.get("label") not in (None, "") else row.get("kind")
    if kind is not None and kind not in KINDS:
        raise _Missing(f"`kind` one of {', '.join(KINDS)}")
    rid = row.get("id")
    return (str(rid) if rid is not None else None, (_get(row, "prompt"),), str(row.get("category") or suite), kind,
            None)


FORMATS: dict[str, tuple[Callable[[set], bool], Callable[[dict, str], Row]]] = {
    "mtbench": (lambda k: "turns" in k, _mtbench),
    "harmbench": (lambda k: "Behavior" in k, _harmbench),
    "advbench": (lambda k: "goal" in k, _advbench),
    "xstest": (lambda k: {"prompt", "type", "label"} <= k, _xstest),
    "prompts": (lambda k: "prompt" in k, _prompts),
}


def detect_format(keys: Iterable[str], where: str) -> str:
    keys = set(keys)
    for name, (match, _) in FORMATS.items():
        if match(keys):
            return name
    raise EvalSetError(f"{where}: unknown format with columns {sorted(str(k) for k in keys)}; expected MT-Bench "
                       "(turns), XSTest (prompt, type, label), AdvBench (goal), HarmBench (Behavior) or prompt lists "
                       "(prompt)")


def items_from_rows(rows: Iterable[tuple[str, dict]], suite: str, source: str,
                    kind: str | None = None) -> list[EvalItem]:
    """Normalize `(where, row)` pairs of one public format (detected from the first row) into items."""
    items: list[EvalItem] = []
    convert = None
    seen: dict[str, int] = {}
    for where, row in rows:
        if convert is None:
            convert = FORMATS[detect_format(row.keys(), where)][1]
        try:
            rid, turns, category, row_kind, ref = convert(row, suite)
        except _Missing as e:
            raise EvalSetError(f"{where}: missing or empty {e}") from None
        rid = rid or stable_id(turns, prefix=f"{suite}-")
        n = seen[rid] = seen.get(rid, 0) + 1
        if n > 1:  # a repeated prompt keeps a distinct, stable id
            rid = f"{rid}-{n}"
        items.append(EvalItem(rid, suite, category, kind or row_kind or "harmful", turns, ref))
    if not items:
        raise EvalSetError(f"{source}: suite '{suite}' is empty")
    return items


def _jsonl_rows(path: Path) -> Iterator[tuple[str, dict]]:
    return numbered_jsonl(path)


def _csv_rows(path: Path) -> Iterator[tuple[str, dict]]:
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        for row in reader:
            yield f"{path}:{reader.line_num}", row


def _txt_rows(path: Path) -> Iterator[tuple[str, dict]]:
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            yield f"{path}:{lineno}", {"prompt": line.strip()}


READERS = {".jsonl": _jsonl_rows, ".csv": _csv_rows, ".txt": _txt_rows}


def _hub_rows(hub: hfspec.HubSpec) -> Iterator[tuple[str, dict]]:
    import datasets

    whole = replace(hub, split=None)  # the dataset with all its splits
    try:
        ds = datasets.load_dataset(hub.repo, data_dir=hub.data_dir)
    except Exception as e:  # offline, missing, gated: one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EvalSetError(f"{whole}: cannot load dataset ({first})") from None
    split = hub.split
    if split is None:
        if len(ds) != 1:
            raise EvalSetError(f"{whole} has splits {sorted(ds)}; choose one with {whole}@SPLIT")
        split = next(iter(ds))
    if split not in ds:
        raise EvalSetError(f"{whole} has no split '{split}' (it has {sorted(ds)})")
    for i, row in enumerate(ds[split]):
        yield f"{replace(hub, split=split)} row {i}", dict(row)


def parse_spec(spec: str) -> tuple[str, str | None]:
    """`source[:kind]` -> (source, kind or None)."""
    head, sep, tail = spec.rpartition(":")
    if sep and tail in KINDS and head:
        return head, tail
    return spec, None


def load_suite(spec: str, split: str = "eval") -> Suite:
    """Load one suite by spec (see module docstring). `split` filters the shipped suites only."""
    if split not in SPLITS:
        raise EvalSetError(f"unknown split '{split}'; use one of {', '.join(SPLITS)}")
    source, kind = parse_spec(spec.strip())
    if source in SHIPPED:
        return _shipped(source, split, kind)
    if hfspec.is_hub(source):
        try:
            hub = hfspec.parse(source)
        except hfspec.HubSpecError as e:
            raise EvalSetError(str(e)) from None
        name = (hub.data_dir or hub.repo).rstrip("/").rsplit("/", 1)[-1]
        return Suite(name, source, items_from_rows(_hub_rows(hub), name, source, kind))
    path = Path(source).expanduser()
    if not path.is_file():
        raise EvalSetError(f"unknown suite '{source}': not one of {', '.join(SHIPPED)}, not a file, not hf:REPO")
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise EvalSetError(f"{path}: unsupported suite file type '{path.suffix}' (use .jsonl, .csv or .txt)")
    return Suite(path.stem, str(path), items_from_rows(reader(path), path.stem, str(path), kind))


def _shipped(name: str, split: str, kind: str | None) -> Suite:
    fname, default_kind = SHIPPED[name]
    path = DATA_DIR / fname
    text_field = "turns" if default_kind == "chat" else "prompt"
    items = []
    for where, row in _jsonl_rows(path):
        missing = [k for k in ("id", "category", "split", text_field) if k not in row]
        if missing:
            raise EvalSetError(f"{where}: missing field(s) {', '.join(missing)}")
        if split != "all" and row["split"] != split:
            continue
        try:
            turns = _turns(row) if text_field == "turns" else (_get(row, "prompt"),)
            ref = _reference(row, len(turns))
        except _Missing as e:
            raise EvalSetError(f"{where}: missing or empty {e}") from None
        items.append(EvalItem(row["id"], name, row["category"], kind or default_kind, turns, ref))
    if not items:
        raise EvalSetError(f"{path}: suite '{name}' has no items in split '{split}'")
    return Suite(name, str(path), items)


def load_suites(specs: Iterable[str], split: str = "eval") -> list[Suite]:
    suites = [load_suite(s, split) for s in specs]
    names = [s.name for s in suites]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise EvalSetError(f"two suites are named {', '.join(sorted(dup))}; rename a file")
    return suites


def select(items: list[EvalItem], limit: int | None) -> list[EvalItem]:
    """The first `limit` items (anything with `id` and `category`: eval items, training prompts) taken round-robin
    over categories (file order within each), so a small limit still covers every category; deterministic, so a
    rerun selects the same items."""
    if limit is None or limit >= len(items):
        return list(items)
    by_cat: dict[str, list[EvalItem]] = {}
    for it in items:
        by_cat.setdefault(it.category, []).append(it)
    out: list[EvalItem] = []
    queues = list(by_cat.values())
    depth = 0
    while len(out) < limit:
        out += [q[depth] for q in queues if depth < len(q)][: limit - len(out)]
        depth += 1
    chosen = {it.id for it in out}
    return [it for it in items if it.id in chosen]  # file order
