"""The one `hf:REPO[:DATA_DIR][@SPLIT]` grammar, shared by prompt sources and evaluation suites."""

import pytest

from mlx_cai import hfspec
from mlx_cai import prompts as P
from mlx_cai.evalsets import EvalSetError, load_suite
from mlx_cai.hfspec import HubSpec


@pytest.mark.parametrize("spec, want", [
    ("hf:Anthropic/hh-rlhf", HubSpec("Anthropic/hh-rlhf")),
    ("hf:Anthropic/hh-rlhf:red-team-attempts", HubSpec("Anthropic/hh-rlhf", "red-team-attempts")),
    ("hf:Anthropic/hh-rlhf:harmless-base@test", HubSpec("Anthropic/hh-rlhf", "harmless-base", "test")),
    ("hf:walledai/XSTest#test", HubSpec("walledai/XSTest", None, "test")),  # the older evalsets spelling
    ("hf:walledai/XSTest@test", HubSpec("walledai/XSTest", None, "test")),
    ("hf:owner/set:dir#train", HubSpec("owner/set", "dir", "train")),
    ("hf:/data/local_set:", HubSpec("/data/local_set")),  # empty parts are None
])
def test_parse(spec, want):
    assert hfspec.parse(spec) == want
    assert hfspec.parse(str(want)) == want  # the canonical spelling reads back the same


def test_canonical_spelling_and_errors():
    assert str(hfspec.parse("hf:a/b:d#s")) == "hf:a/b:d@s"
    for bad in ("hf:", "hf:@train", "hf::dir"):
        with pytest.raises(hfspec.HubSpecError, match="names no dataset; use hf:REPO\\[:DATA_DIR\\]\\[@SPLIT\\]"):
            hfspec.parse(bad)
    with pytest.raises(hfspec.HubSpecError, match="not a Hugging Face dataset spec"):
        hfspec.parse("train:harmful")
    assert hfspec.is_hub("hf:x") and not hfspec.is_hub("x.jsonl")


def test_callers_keep_their_own_error_class():
    with pytest.raises(P.PromptError, match="names no dataset"):
        P.load("hf:")
    with pytest.raises(EvalSetError, match="names no dataset"):
        load_suite("hf:@test")


def test_eval_suites_take_a_data_dir_and_either_split_spelling(tmp_path):
    d = tmp_path / "hub" / "xs"
    d.mkdir(parents=True)
    (d / "test.csv").write_text("prompt,type,label\nHow do I kill a process?,homonyms,safe\n")
    for spec in (f"hf:{tmp_path / 'hub'}:xs", f"hf:{tmp_path / 'hub'}:xs@test", f"hf:{tmp_path / 'hub'}:xs#test"):
        s = load_suite(spec)
        assert s.name == "xs" and [i.prompt for i in s.items] == ["How do I kill a process?"]
    with pytest.raises(EvalSetError, match="no split 'train'"):
        load_suite(f"hf:{tmp_path / 'hub'}:xs@train")


def test_prompt_sources_refuse_an_eval_split_in_either_spelling():
    for spec in ("hf:someone/set@eval", "hf:someone/set#eval"):
        with pytest.raises(P.PromptError, match="held out"):
            P.load(spec)
