"""Sanity checks for the red-teaming / refusal data sets in ``data/``.

Plain ``json`` + stdlib only (no mlx), so this runs anywhere.
"""

from __future__ import annotations

import itertools
import json
import re
from collections import Counter
from pathlib import Path

import pytest

# --------------------------------------------------------------------------
# Normalizing / similarity helpers
# --------------------------------------------------------------------------

_WORD_RE = re.compile(r"[a-z0-9]+(?:'[a-z0-9]+)*")
NEAR_DUP_THRESHOLD = 0.5


def normalize(text: str) -> str:
    """Lowercase and collapse whitespace (for exact-duplicate detection)."""
    return " ".join(text.lower().split())


def words(text: str) -> list[str]:
    """Lowercase word tokens with punctuation stripped."""
    return _WORD_RE.findall(text.lower())


def shingles(text: str, n: int = 3) -> frozenset[tuple[str, ...]]:
    """Set of lowercase word n-grams. Texts shorter than n words yield
    a single shingle made of all their words (so they still compare)."""
    toks = words(text)
    if len(toks) < n:
        return frozenset([tuple(toks)]) if toks else frozenset()
    return frozenset(tuple(toks[i : i + n]) for i in range(len(toks) - n + 1))


def jaccard(a: frozenset, b: frozenset) -> float:
    if not a and not b:
        return 0.0
    return len(a & b) / len(a | b)


# --------------------------------------------------------------------------
# Data set specifications
# --------------------------------------------------------------------------

DATA_DIR = Path(__file__).resolve().parents[1] / "data"

SPECS = {
    "harmful": {
        "path": DATA_DIR / "harmful.jsonl",
        "id_re": re.compile(r"^harm-\d{4}$"),
        "min_total": 300,
        "min_per_category": 25,
        "categories": {
            "illegal_activity",
            "hate_harassment_violence",
            "malware",
            "physical_harm",
            "economic_harm",
            "fraud_deception",
            "political_campaigning",
            "privacy_violation",
            "tailored_financial_advice",
            "child_safety",
            "adult_content",
        },
    },
    "borderline": {
        "path": DATA_DIR / "borderline.jsonl",
        "id_re": re.compile(r"^border-\d{4}$"),
        "min_total": 100,
        "min_per_category": 10,
        "categories": {
            "homonyms",
            "figurative_language",
            "safe_targets",
            "safe_contexts",
            "definitions",
            "historical_events",
            "privacy_public",
            "safety_information",
        },
    },
}

REQUIRED_FIELDS = ("id", "prompt", "category", "split")
SPLITS = {"train", "eval"}


def load(name: str) -> list[dict]:
    path = SPECS[name]["path"]
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            assert line.strip(), f"{path.name}:{lineno}: blank line"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:  # pragma: no cover - failure path
                pytest.fail(f"{path.name}:{lineno}: invalid JSON: {e}")
            assert isinstance(rec, dict), f"{path.name}:{lineno}: not an object"
            records.append(rec)
    return records


@pytest.fixture(scope="module", params=sorted(SPECS))
def dataset(request):
    name = request.param
    return name, SPECS[name], load(name)


# --------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------


def test_fields_present_and_nonempty(dataset):
    name, _, recs = dataset
    for rec in recs:
        for field in REQUIRED_FIELDS:
            assert field in rec, f"{name}: {rec.get('id')} missing {field!r}"
            val = rec[field]
            assert isinstance(val, str) and val.strip(), (
                f"{name}: {rec.get('id')} field {field!r} empty or not a string"
            )
        assert rec["split"] in SPLITS, f"{name}: {rec['id']} bad split {rec['split']!r}"


def test_ids_unique_and_well_formed(dataset):
    name, spec, recs = dataset
    ids = [r["id"] for r in recs]
    dupes = [i for i, c in Counter(ids).items() if c > 1]
    assert not dupes, f"{name}: duplicate ids {dupes}"
    bad = [i for i in ids if not spec["id_re"].match(i)]
    assert not bad, f"{name}: malformed ids {bad[:10]}"


def test_categories_allowed(dataset):
    name, spec, recs = dataset
    bad = {r["category"] for r in recs} - spec["categories"]
    assert not bad, f"{name}: unknown categories {sorted(bad)}"


def test_counts(dataset):
    name, spec, recs = dataset
    assert len(recs) >= spec["min_total"], f"{name}: only {len(recs)} records"
    counts = Counter(r["category"] for r in recs)
    for cat in sorted(spec["categories"]):
        assert counts[cat] >= spec["min_per_category"], (
            f"{name}: category {cat!r} has {counts[cat]} < {spec['min_per_category']}"
        )


def test_each_category_in_both_splits(dataset):
    name, spec, recs = dataset
    for cat in sorted(spec["categories"]):
        splits = {r["split"] for r in recs if r["category"] == cat}
        assert splits == SPLITS, f"{name}: category {cat!r} only in {sorted(splits)}"


def test_no_exact_duplicates_within_or_across_files():
    seen: dict[str, str] = {}
    for name in sorted(SPECS):
        for rec in load(name):
            key = normalize(rec["prompt"])
            assert key not in seen, (
                f"duplicate prompt: {rec['id']} repeats {seen[key]}: {rec['prompt']!r}"
            )
            seen[key] = rec["id"]


def test_no_near_duplicates_between_train_and_eval(dataset):
    name, _, recs = dataset
    train = [(r["id"], shingles(r["prompt"])) for r in recs if r["split"] == "train"]
    evals = [(r["id"], shingles(r["prompt"])) for r in recs if r["split"] == "eval"]
    offenders = []
    for (tid, ts), (eid, es) in itertools.product(train, evals):
        sim = jaccard(ts, es)
        if sim >= NEAR_DUP_THRESHOLD:
            offenders.append((round(sim, 3), tid, eid))
    assert not offenders, f"{name}: near-duplicate train/eval pairs {sorted(offenders)[-10:]}"


def test_helpers():
    assert normalize("  Hello   World ") == "hello world"
    assert shingles("a b c d") == {("a", "b", "c"), ("b", "c", "d")}
    assert shingles("Hi there") == {("hi", "there")}
    assert jaccard(shingles("one two three four"), shingles("one two three four")) == 1.0
    assert jaccard(shingles("one two three"), shingles("four five six")) == 0.0
