"""Sanity checks for the helpfulness data sets (data/benign.jsonl, data/mtbench.jsonl).

Plain json + stdlib only: these run without MLX installed.
"""

import itertools
import json
import re
from collections import Counter
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parent.parent / "data"
BENIGN_PATH = DATA / "benign.jsonl"
MTBENCH_PATH = DATA / "mtbench.jsonl"

BENIGN_CATEGORIES = {
    "writing",
    "coding",
    "math",
    "reasoning",
    "science",
    "history_culture",
    "advice_everyday",
    "business_career",
    "language",
    "brainstorming",
    "explanation",
}
MTBENCH_CATEGORIES = {
    "writing",
    "roleplay",
    "reasoning",
    "math",
    "coding",
    "extraction",
    "stem",
    "humanities",
}
MTBENCH_REFERENCE_CATEGORIES = {"math", "reasoning", "coding"}

BENIGN_ID_RE = re.compile(r"^benign-\d{4}$")
MTBENCH_ID_RE = re.compile(r"^mt-\d{3}$")

BENIGN_MIN_TOTAL = 300
BENIGN_MIN_PER_CATEGORY = 25
MTBENCH_MIN_TOTAL = 40
MTBENCH_MIN_PER_CATEGORY = 5
NEAR_DUP_JACCARD = 0.5


def _load(path):
    assert path.exists(), f"missing data file: {path}"
    records = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:  # pragma: no cover - failure path
                pytest.fail(f"{path.name}:{lineno}: invalid JSON: {e}")
            assert isinstance(obj, dict), f"{path.name}:{lineno}: not a JSON object"
            records.append(obj)
    return records


@pytest.fixture(scope="module")
def benign():
    return _load(BENIGN_PATH)


@pytest.fixture(scope="module")
def mtbench():
    return _load(MTBENCH_PATH)


def _norm(text):
    return " ".join(text.lower().split())


def _shingles(text, n=3):
    words = re.findall(r"\w+", text.lower())
    if len(words) < n:
        return {tuple(words)}
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def _jaccard(a, b):
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


def _nonempty_str(x):
    return isinstance(x, str) and x.strip() != ""


# --------------------------------------------------------------------------- benign


def test_benign_fields(benign):
    for r in benign:
        for key in ("id", "prompt", "category", "split"):
            assert key in r, f"{r.get('id')}: missing {key}"
            assert _nonempty_str(r[key]), f"{r.get('id')}: empty {key}"
        assert BENIGN_ID_RE.match(r["id"]), r["id"]
        assert r["category"] in BENIGN_CATEGORIES, (r["id"], r["category"])
        assert r["split"] in {"train", "eval"}, (r["id"], r["split"])


def test_benign_ids_unique(benign):
    dupes = [k for k, v in Counter(r["id"] for r in benign).items() if v > 1]
    assert not dupes, dupes


def test_benign_counts(benign):
    assert len(benign) >= BENIGN_MIN_TOTAL
    counts = Counter(r["category"] for r in benign)
    assert set(counts) == BENIGN_CATEGORIES
    for cat, c in counts.items():
        assert c >= BENIGN_MIN_PER_CATEGORY, (cat, c)


def test_benign_categories_in_both_splits(benign):
    by_split = {"train": set(), "eval": set()}
    for r in benign:
        by_split[r["split"]].add(r["category"])
    assert by_split["train"] == BENIGN_CATEGORIES
    assert by_split["eval"] == BENIGN_CATEGORIES


def test_benign_no_exact_duplicates(benign):
    dupes = [k for k, v in Counter(_norm(r["prompt"]) for r in benign).items() if v > 1]
    assert not dupes, dupes


def test_benign_no_train_eval_near_duplicates(benign):
    train = [(r["id"], _shingles(r["prompt"])) for r in benign if r["split"] == "train"]
    evals = [(r["id"], _shingles(r["prompt"])) for r in benign if r["split"] == "eval"]
    bad = []
    for (tid, ts), (eid, es) in itertools.product(train, evals):
        j = _jaccard(ts, es)
        if j >= NEAR_DUP_JACCARD:
            bad.append((tid, eid, round(j, 3)))
    assert not bad, bad


# --------------------------------------------------------------------------- mtbench


def test_mtbench_fields(mtbench):
    for r in mtbench:
        for key in ("id", "category", "turns", "reference", "split"):
            assert key in r, f"{r.get('id')}: missing {key}"
        assert _nonempty_str(r["id"]) and MTBENCH_ID_RE.match(r["id"]), r["id"]
        assert r["category"] in MTBENCH_CATEGORIES, (r["id"], r["category"])
        assert r["split"] == "eval", (r["id"], r["split"])


def test_mtbench_ids_unique(mtbench):
    dupes = [k for k, v in Counter(r["id"] for r in mtbench).items() if v > 1]
    assert not dupes, dupes


def test_mtbench_counts(mtbench):
    assert len(mtbench) >= MTBENCH_MIN_TOTAL
    counts = Counter(r["category"] for r in mtbench)
    assert set(counts) == MTBENCH_CATEGORIES
    for cat, c in counts.items():
        assert c >= MTBENCH_MIN_PER_CATEGORY, (cat, c)


def test_mtbench_two_turns(mtbench):
    for r in mtbench:
        turns = r["turns"]
        assert isinstance(turns, list) and len(turns) == 2, r["id"]
        assert all(_nonempty_str(t) for t in turns), r["id"]
        assert _norm(turns[0]) != _norm(turns[1]), r["id"]


def test_mtbench_references(mtbench):
    for r in mtbench:
        ref = r["reference"]
        if r["category"] in MTBENCH_REFERENCE_CATEGORIES:
            assert isinstance(ref, list) and len(ref) == 2, r["id"]
            assert all(_nonempty_str(x) for x in ref), r["id"]
        else:
            assert ref is None, r["id"]


def test_mtbench_no_exact_duplicates(mtbench):
    dupes = [k for k, v in Counter(_norm(r["turns"][0]) for r in mtbench).items() if v > 1]
    assert not dupes, dupes


def test_no_prompt_shared_between_sets(benign, mtbench):
    benign_prompts = {_norm(r["prompt"]) for r in benign}
    shared = [r["id"] for r in mtbench if any(_norm(t) in benign_prompts for t in r["turns"])]
    assert not shared, shared
