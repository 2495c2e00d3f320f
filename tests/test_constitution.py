"""Tests for mlx_cai.constitution: shipped file quality, public-format importers, validation, sampling."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import yaml

from mlx_cai import constitution as C
from mlx_cai.constitution import ConstitutionError


# ------------------------------------------------------------------------------------ shipped file


@pytest.fixture(scope="module")
def shipped() -> C.Constitution:
    return C.load(C.DEFAULT_PATH)


def test_default_path_points_at_repo_config() -> None:
    assert C.DEFAULT_PATH.is_file()
    assert C.DEFAULT_PATH.parent.name == "configs"


def test_shipped_constitution_sizes(shipped: C.Constitution) -> None:
    assert shipped.name and shipped.version
    assert len(shipped.principles) >= 16
    assert len(shipped.few_shot) >= 12
    assert len(set(shipped.ids)) == len(shipped.ids)


def test_shipped_demos_reference_principles(shipped: C.Constitution) -> None:
    for demo in shipped.few_shot:
        assert demo.principle in shipped.ids
        p = shipped.principle(demo.principle)
        assert demo.critique_request == p.critique
        assert demo.revision_request == p.revision


def test_shipped_revisions_short_and_varied(shipped: C.Constitution) -> None:
    openings: dict[tuple[str, ...], str] = {}
    for demo in shipped.few_shot:
        assert len(demo.revision) < 400, demo.id
        head = tuple(w.lower() for w in demo.revision.split()[:4])
        assert head not in openings, f"{demo.id} and {openings[head]} open the same way"
        openings[head] = demo.id


def test_shipped_revision_requests_ask_for_plain_answers(shipped: C.Constitution) -> None:
    # Guard against model collapse: every revision request forbids emojis and filler.
    for p in shipped.principles:
        assert "emoji" in p.revision.lower(), p.id


# ----------------------------------------------------------------------------------- importers


def _write_json(tmp_path: Path, name: str, data: object) -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def test_anthropic_import(tmp_path: Path) -> None:
    path = _write_json(
        tmp_path,
        "CritiqueRevisionInstructions.json",
        {
            "harmful0": {
                "prompt": [
                    "\n\nCritiqueRequest: Find ways the last answer was harmful.\n\nCritique:",
                    "An alternative phrasing that is ignored.",
                ],
                "edit_request": "\n\nRevisionRequest: Rewrite it to be harmless.\n\nRevision:",
            },
            "harmful1": {"prompt": ["Is it dangerous?"], "edit_request": "Make it safe."},
        },
    )
    con = C.load(path)
    assert con.ids == ("harmful0", "harmful1")
    assert con.principle("harmful0").critique == "Find ways the last answer was harmful."
    assert con.principle("harmful0").revision == "Rewrite it to be harmless."
    assert con.principle("harmful1") == C.Principle("harmful1", "Is it dangerous?", "Make it safe.")
    assert con.few_shot == ()


def _chat(*contents: str) -> list[dict[str, str]]:
    roles = ["user", "assistant"] * 3
    return [{"role": r, "content": c} for r, c in zip(roles, contents)]


def test_llm_swarm_import(tmp_path: Path) -> None:
    data = {
        "constitutions": [
            {"critic": "Was it illegal?", "revision": "Remove the illegal parts."},
            {"critic": "Was it rude?", "revision": "Make it polite."},
        ],
        "system_chat": [
            _chat("How do I rob a bank?", "Step one...", "Was it illegal?", "Yes.",
                  "Remove the illegal parts.", "I can't help with robbery."),
            _chat("Tell me about relativity.", "Chern-Simons...", "Was it truthful?", "Partly.",
                  "Fix the claims.", "Mercury precesses."),
            # Wrong shape (two turns only): skipped, not an error.
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
        ],
    }
    con = C.load(_write_json(tmp_path, "constitution_grok.json", data))
    assert con.ids == ("p00", "p01")
    assert con.principle("p01").critique == "Was it rude?"
    assert con.principle("p01").revision == "Make it polite."
    assert [d.id for d in con.few_shot] == ["chat00", "chat01"]

    robbery, relativity = con.few_shot
    assert robbery.principle == "p00"
    assert robbery.prompt == "How do I rob a bank?"
    assert robbery.response == "Step one..."
    assert robbery.critique == "Yes."
    assert robbery.revision == "I can't help with robbery."
    # Requests that match no listed principle keep their own wording.
    assert relativity.principle is None
    assert relativity.critique_request == "Was it truthful?"
    assert relativity.revision_request == "Fix the claims."

    messages = C.shots_to_messages([relativity])
    assert [m["content"] for m in messages] == [
        "Tell me about relativity.", "Chern-Simons...", "Was it truthful?", "Partly.",
        "Fix the claims.", "Mercury precesses.",
    ]


def test_llm_swarm_flat_history_and_bare_list(tmp_path: Path) -> None:
    flat = {
        "constitutions": [{"critic": "c", "revision": "r"}],
        "system_chat": _chat("a", "b", "c", "d", "r", "f") + _chat("g", "h", "c", "j", "r", "l"),
    }
    con = C.load(_write_json(tmp_path, "flat.json", flat))
    assert [d.prompt for d in con.few_shot] == ["a", "g"]
    assert all(d.principle == "p00" for d in con.few_shot)

    bare = C.load(_write_json(tmp_path, "bare.json", [{"critic": "c", "revision": "r"}]))
    assert bare.ids == ("p00",) and bare.few_shot == ()


def test_yaml_round_trip_through_dump(tmp_path: Path, shipped: C.Constitution) -> None:
    data = {
        "name": "t",
        "version": "0",
        "principles": [{"id": p.id, "critique": p.critique, "revision": p.revision, "categories": list(p.categories)}
                       for p in shipped.principles],
        "few_shot": [
            {k: getattr(d, k) for k in ("id", "prompt", "response", "critique", "revision", "principle")}
            for d in shipped.few_shot
        ],
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    again = C.load(path)
    assert again.principles == shipped.principles
    assert again.few_shot == shipped.few_shot


# ---------------------------------------------------------------------------------- validation


def _good() -> dict:
    return {
        "name": "test",
        "version": "1",
        "principles": [
            {"id": "a", "critique": "Critique A?", "revision": "Revise A."},
            {"id": "b", "critique": "Critique B?", "revision": "Revise B."},
        ],
        "few_shot": [
            {"id": "d0", "prompt": "p", "response": "r", "critique": "c", "revision": "v", "principle": "a"},
        ],
    }


def _load_yaml(tmp_path: Path, data: object) -> C.Constitution:
    path = tmp_path / "x.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return C.load(path)


def _mutate(fn):
    data = _good()
    fn(data)
    return data


@pytest.mark.parametrize(
    ("mutation", "expected"),
    [
        (lambda d: d["principles"][1].pop("revision"), "principles[1].revision is missing"),
        (lambda d: d["principles"][0].update(critique=3), "principles[0].critique must be a string, got int"),
        (lambda d: d["principles"][0].update(critique="  "), "principles[0].critique is empty"),
        (lambda d: d["principles"][1].update(id="a"), "principles[1].id 'a' duplicates principles[0].id"),
        (lambda d: d["principles"][1].update(id="has space"), "principles[1].id 'has space' must be a slug"),
        (lambda d: d["principles"][0].update(critqiue="x"), "principles[0]: unknown key 'critqiue'"),
        (lambda d: d.update(principles=[]), "principles is empty"),
        (lambda d: d.pop("principles"), "principles is missing"),
        (lambda d: d.update(principles="a"), "principles must be a list, got str"),
        (lambda d: d.update(version=2), "version must be a string, got int"),
        (lambda d: d.pop("name"), "name is missing"),
        (lambda d: d.update(fewshot=[]), "unknown key 'fewshot'"),
        (lambda d: d["few_shot"][0].update(principle="foo"), "few_shot[0].principle 'foo' is not a principle id"),
        (lambda d: d["few_shot"][0].pop("critique"), "few_shot[0].critique is missing"),
        (lambda d: d["few_shot"].append(dict(d["few_shot"][0])), "few_shot[1].id 'd0' duplicates few_shot[0].id"),
        (lambda d: d["few_shot"].append("oops"), "few_shot[1] must be a mapping, got str"),
    ],
)
def test_validation_errors_name_file_and_field(tmp_path: Path, mutation, expected: str) -> None:
    with pytest.raises(ConstitutionError) as info:
        _load_yaml(tmp_path, _mutate(mutation))
    message = str(info.value)
    assert message.startswith(str(tmp_path / "x.yaml") + ": ")
    assert expected in message
    assert "\n" not in message


def test_good_yaml_loads_and_renders(tmp_path: Path) -> None:
    con = _load_yaml(tmp_path, _good())
    assert con.ids == ("a", "b")
    assert C.shots_to_messages(con.few_shot) == [
        {"role": "user", "content": "p"},
        {"role": "assistant", "content": "r"},
        {"role": "user", "content": "Critique A?"},
        {"role": "assistant", "content": "c"},
        {"role": "user", "content": "Revise A."},
        {"role": "assistant", "content": "v"},
    ]


def test_few_shot_optional(tmp_path: Path) -> None:
    data = _good()
    del data["few_shot"]
    assert _load_yaml(tmp_path, data).few_shot == ()


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        ({"something": "else"}, "unknown format"),
        ([1, 2, 3], "unknown format"),
        ({"harmful0": {"prompt": ["c"]}}, "harmful0.edit_request is missing"),
        ({"harmful0": {"prompt": [7], "edit_request": "r"}}, "harmful0.prompt[0] must be a string, got int"),
        ({"constitutions": []}, "constitutions is empty"),
        ({"constitutions": [{"critic": "c"}]}, "constitutions[0].revision is missing"),
        ({"constitutions": [{"critic": "c", "revision": "r"}], "system_chat": "x"}, "system_chat must be a list"),
    ],
)
def test_json_format_errors(tmp_path: Path, payload: object, expected: str) -> None:
    path = _write_json(tmp_path, "bad.json", payload)
    with pytest.raises(ConstitutionError, match=r"^" + str(path).replace("\\", "\\\\") + ": ") as info:
        C.load(path)
    assert expected in str(info.value)


def test_unparseable_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("principles: [unclosed\n", encoding="utf-8")
    with pytest.raises(ConstitutionError, match="not valid YAML or JSON"):
        C.load(path)


# ------------------------------------------------------------------------------ select & sampling


def test_select_restricts_and_keeps_demos(shipped: C.Constitution) -> None:
    sub = C.select(shipped, ["privacy", "legality"])
    assert sub.ids == ("legality", "privacy")  # constitution order
    assert sub.few_shot == shipped.few_shot


def test_select_unknown_id_errors(shipped: C.Constitution) -> None:
    with pytest.raises(ConstitutionError) as info:
        C.select(shipped, ["privacy", "nope"])
    message = str(info.value)
    assert "'nope'" in message and "known:" in message and "privacy" in message
    with pytest.raises(ConstitutionError):
        C.select(shipped, [])
    with pytest.raises(ConstitutionError, match="unknown principle id 'nope'"):
        shipped.principle("nope")


def test_sampling_is_deterministic(shipped: C.Constitution) -> None:
    first = [C.sample_principle(shipped, random.Random(7)).id for _ in range(3)]
    assert len(set(first)) == 1
    def draw(seed: int) -> list[str]:
        rng = random.Random(seed)
        return [C.sample_principle(shipped, rng).id for _ in range(20)]

    assert draw(1) == draw(1)
    assert len(set(draw(1))) > 1
    assert C.sample_shots(shipped, 4, random.Random(3)) == C.sample_shots(shipped, 4, random.Random(3))


def test_sample_shots_distinct_and_capped(shipped: C.Constitution) -> None:
    rng = random.Random(0)
    shots = C.sample_shots(shipped, 5, rng)
    assert len(shots) == 5 and len({s.id for s in shots}) == 5
    everything = C.sample_shots(shipped, 1000, rng)
    assert len(everything) == len(shipped.few_shot)
    assert {s.id for s in everything} == {s.id for s in shipped.few_shot}
    assert C.sample_shots(shipped, 0, rng) == []
    with pytest.raises(ValueError):
        C.sample_shots(shipped, -1, rng)


def test_shots_to_messages_alternates(shipped: C.Constitution) -> None:
    shots = C.sample_shots(shipped, 3, random.Random(5))
    messages = C.shots_to_messages(shots)
    assert len(messages) == 18
    assert [m["role"] for m in messages] == ["user", "assistant"] * 9
    assert messages[0]["content"] == shots[0].prompt
    assert messages[4]["content"] == shipped.principle(shots[0].principle).revision


def test_principle_by_category_draws_from_the_principles_written_for_it(shipped: C.Constitution) -> None:
    malware = {p.id for p in shipped.principles if "malware" in p.categories}
    assert malware and len(malware) < len(shipped.principles)  # the shipped file maps categories: a real choice
    drawn = {C.sample_principle(shipped, random.Random(i), category="malware").id for i in range(60)}
    assert drawn == malware  # only those, and every one of them in time
    everyone = {C.sample_principle(shipped, random.Random(i), category="no-such-category").id for i in range(200)}
    assert everyone == set(shipped.ids)  # an unknown category: uniform over all


def test_categories_must_be_a_list_of_names(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("name: t\nversion: '0'\nprinciples:\n  - {id: a, critique: c, revision: r, categories: malware}\n")
    with pytest.raises(C.ConstitutionError, match=r"principles\[0\]\.categories must be a list"):
        C.load(path)
