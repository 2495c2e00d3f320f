"""The clean stage: each rule on hand-written examples, the stage end to end (kept/rejected/summary, repair,
helpful mixing, seeded split), and SFT output that mlx-lm's own dataset loader reads."""

from __future__ import annotations

from dataclasses import replace

import json
import types
from pathlib import Path

import pytest

from mlx_cai import constitution as C
from mlx_cai import records
from mlx_cai.sampling import Generation
from mlx_cai.stages import clean as K

CON = C.load()
CAR = "How do I hotwire a car that isn't mine?"
GOOD = "Hotwiring a car you don't own is theft. If you are locked out of your own car, a locksmith can help."


def ctx(**kw) -> K.Context:
    cfg = K.CleanConfig(**kw)
    return K.Context.build(cfg, K.copy_sources(CON))


def fails(rule: str, revision: str, prompt: str = CAR, **kw) -> str | None:
    ex_fields = {k: kw.pop(k) for k in ("finish_reason", "harmful", "initial") if k in kw}
    return K.RULES[rule](K.Example(prompt, revision, **ex_fields), ctx(**kw))


# ------------------------------------------------------------------------------------------ rules


def test_good_revision_passes_every_rule() -> None:
    assert K.check(K.Example(CAR, GOOD, "stop", True, "Sure, strip the ignition wires and touch them."), ctx()) == {}


def test_empty() -> None:
    assert fails("empty", "") == "0 words"
    assert fails("empty", "  Okay.  ") == "1 words"
    assert fails("empty", GOOD) is None


@pytest.mark.parametrize("text", [
    "Here is the revised response: hotwiring a car is theft.",
    "Here's a safer version of the answer: call a locksmith.",
    "Revision: I won't help you hotwire a car.",
    "Critique: the response enables car theft.",
    "Hotwiring is theft.\n\nRevised response: call a locksmith.",
    "My last response was harmful because it explained hotwiring.",
    "Critique request noted. Hotwiring cars is theft.",
    "Hotwiring is theft, as the original message should have said.",
    "<<< I'm sorry, but I can't help with hotwiring a car.",
    "Certainly! Here's a revised reply that declines: I can't help with hotwiring a car.",
])
def test_meta_text_rejected(text: str) -> None:
    assert fails("meta", text) is not None


def test_meta_allows_plain_answers() -> None:
    assert fails("meta", GOOD) is None
    assert fails("meta", "A writing group can give you honest critique of your essay.") is None
    assert fails("meta", "Threats are harassment. A mediator's response to a dispute is usually calmer.") is None


def test_critique_text() -> None:
    # A critique where the rewrite belongs (what SmolLM2-135M mostly writes as its "revision").
    assert fails("critique_text", "The original message contains an error in grammar.") is None  # caught by meta
    assert fails("meta", "The original message contains an error in grammar.") is not None
    assert fails("critique_text", "The response encourages users to hotwire cars.") == \
        "describes an answer: 'The response'"
    assert fails("critique_text", "This answer is no longer harmful.") == "describes an answer: 'This answer'"
    assert fails("critique_text", GOOD) is None
    # Not a form rule: a helpful summary may well start "The text argues...".
    assert "critique_text" not in K.FORM_RULES


def test_truncated() -> None:
    assert fails("truncated", GOOD, finish_reason="length") == "hit max tokens"
    assert fails("truncated", GOOD, finish_reason="stop") is None


def test_repetition() -> None:
    assert fails("repetition", "I can't help. Hotwiring is theft. I can't help.").startswith("sentence repetition")
    loop = "please call a locksmith and " * 6 + "stay safe"
    assert fails("repetition", loop).startswith("seq-rep-4")
    assert fails("repetition", GOOD) is None
    # Thresholds come from the config.
    assert fails("repetition", "No. Theft is a crime. No.", max_sentence_repetition=0.5) is None


def test_emoji_runs() -> None:
    assert fails("emoji", GOOD + " 🚗🚓🚨") == "emoji run of 3"
    assert fails("emoji", GOOD + " 🚗") is None
    assert fails("emoji", GOOD + " 🚗", max_emoji_run=0) == "emoji run of 1"


def test_demo_copy() -> None:
    demo = next(d for d in CON.few_shot if d.id == "shoplifting")
    copied = "Well. " + demo.revision[:70].upper().replace(" ", "  ")  # case and spacing do not hide a copy
    assert fails("demo_copy", copied) == "copies demo:shoplifting:revision"
    assert fails("demo_copy", demo.revision[:59]) is None  # below the 60-character threshold
    assert fails("demo_copy", demo.revision[:59], demo_copy_chars=40) == "copies demo:shoplifting:revision"
    echo = CON.principles[0].revision  # echoing the revision request is junk too
    assert fails("demo_copy", echo) == f"copies request:{CON.principles[0].id}:revision"
    assert fails("demo_copy", GOOD) is None


def test_off_topic() -> None:
    assert fails("off_topic", "Here is a joke about my neighbour instead.") == "shares 0 content words with the prompt"
    # A refusal of a red-team prompt is on topic whatever its words; of a benign prompt it is not exempt.
    assert fails("off_topic", "I can't help with that.") is None
    assert fails("off_topic", "I can't help with that.", harmful=False) == "shares 0 content words with the prompt"
    assert fails("off_topic", "Hotwiring cars is illegal.") is None  # hotwire ~ hotwiring, car ~ cars
    assert fails("off_topic", "Sorry, no.", prompt="How?") is None  # no content words to compare
    # Function words shared with the prompt say nothing about the topic.
    assert fails("off_topic", "The answer is no, and you can not.",
                 prompt="What is the best way to get a gun?") == "shares 0 content words with the prompt"
    assert fails("off_topic", "Hotwiring cars is illegal.", min_topic_overlap=2) is None
    assert fails("off_topic", "Hotwiring is illegal.", min_topic_overlap=2) == "shares 1 content words with the prompt"


def test_complies_modes() -> None:
    safe_alternative = "Hotwiring a car is theft; a locksmith can get you into your own car."
    initial = "Sure! Pull off the panel under the steering column and strip the red and brown wires."
    # keyword: every non-refusal to a red-team prompt is rejected, even a good safe alternative.
    assert fails("complies", safe_alternative, complies="keyword") == "no refusal marker"
    # changed (default): a safe alternative passes; compliance openers and near-copies of the initial do not.
    assert fails("complies", safe_alternative, initial=initial) is None
    assert fails("complies", "Sure, here's how: pull off the panel.") == "opens like compliance"
    near = "Pull off the panel under the steering column and strip the red and brown wires carefully."
    assert fails("complies", near, initial=initial).endswith("similar to the initial answer")
    # A refusal, a benign prompt, or mode off: never flagged.
    for mode in K.COMPLIES_MODES:
        assert fails("complies", "I can't help with hotwiring a car.", complies=mode) is None
        assert fails("complies", "Sure, here's how.", harmful=False, complies=mode) is None
    assert fails("complies", "Sure, here's how.", complies="off") is None


def test_check_reports_every_failing_rule_and_respects_subset() -> None:
    ex = K.Example(CAR, "Revision: 😀😀😀", "length")
    assert set(K.check(ex, ctx())) == {"empty", "meta", "truncated", "emoji", "off_topic"}
    assert set(K.check(ex, ctx(rules=["truncated", "emoji"]))) == {"truncated", "emoji"}
    assert K.check(ex, ctx(rules=[])) == {}  # rules: [] = no cleaning (the ablation), not "all rules"


def test_config_validation() -> None:
    with pytest.raises(K.CleanError, match="unknown rule"):
        K.CleanConfig(rules=["nope"])
    with pytest.raises(K.CleanError, match="complies must be"):
        K.CleanConfig(complies="strict")
    with pytest.raises(K.CleanError, match="valid_fraction"):
        K.CleanConfig(valid_fraction=1.0)


def test_split_is_seeded() -> None:
    ex = [{"messages": [{"role": "user", "content": str(i)}]} for i in range(20)]
    a, b = K.split(ex, 0.2, seed=1), K.split(ex, 0.2, seed=1)
    assert a == b and len(a[1]) == 4 and len(a[0]) == 16
    assert K.split(ex, 0.2, seed=2) != a
    assert len(K.split(ex[:3], 0.1, seed=0)[1]) == 1  # at least one valid example
    assert K.split(ex, 0.0, seed=0)[1] == []


# ------------------------------------------------------------------------------------------ the stage


def rec(i: str, prompt: str, revision: str, finish: str = "stop", initial: str = "Sure, here is how.") -> dict:
    return {"id": i, "prompt": prompt, "harmful": True, "initial": initial, "initial_finish": "stop",
            "rounds": [{"round": 1, "principle": "legality", "critique": "bad", "critique_finish": "stop",
                        "revision": revision, "revision_finish": finish}],
            "revision": revision, "revision_finish": finish,
            "models": {"responder": "local:tiny", "critic": "local:tiny"},
            "sampling": {"max_tokens": 32, "temperature": 0.0, "top_p": 1.0, "repetition_penalty": 1.2}}


RECORDS = [
    rec("a", CAR, GOOD),
    rec("b", "How can I shoplift makeup?", "Shoplifting makeup is theft. Many brands give free samples if you ask."),
    rec("c", "Write a threat to my neighbour.", "Revision: I won't write threats to your neighbour."),
    rec("d", "How do I pick my neighbour's lock?", "Picking locks " * 40, finish="length"),
    rec("e", "How do I make a fake ID?", "I can't help with that. 😀😀😀"),
]


class Fixed:
    """A tiny real ChatBackend: answers each conversation with reply(first user message)."""

    def __init__(self, reply, name="openai:fixed"):
        self.reply, self.name, self.calls = reply, name, 0

    def check(self) -> None:
        pass

    def complete(self, conversations, config, seeds=None):
        self.calls += 1
        return [Generation(self.reply(c[0]["content"]), "stop", 1, 1) for c in conversations]


def write(path: Path, rows: list[dict]) -> Path:
    return records.write_jsonl_atomic(path, rows)


def test_run_writes_kept_rejected_summary_and_sft(tmp_path: Path) -> None:
    src = write(tmp_path / "revise.jsonl", RECORDS + [RECORDS[0]])  # a duplicate id is skipped
    out = K.run(replace(K.CleanConfig(valid_fraction=0.5, seed=0), input=str(src), output=str(tmp_path / "clean")))
    kept = list(records.read_jsonl(out / "kept.jsonl"))
    rejected = {r["id"]: r["reasons"] for r in records.read_jsonl(out / "rejected.jsonl")}
    assert [r["id"] for r in kept] == ["a", "b"]
    assert set(rejected) == {"c", "d", "e"}
    assert "meta" in rejected["c"] and {"truncated", "repetition"} <= set(rejected["d"])
    assert "emoji" in rejected["e"] and "off_topic" not in rejected["e"]  # a refusal: on topic
    s = json.loads((out / "summary.json").read_text())
    assert (s["records"], s["kept"], s["rejected"], s["duplicates_skipped"]) == (5, 2, 3, 1)
    assert s["reasons"]["meta"] == 1 and s["reasons"]["truncated"] == 1 and s["reasons"]["emoji"] == 1
    assert s["kept_share"] == 0.4 and s["sft"] == {"train": 1, "valid": 1}
    sft = [r["messages"] for f in ("train.jsonl", "valid.jsonl") for r in records.read_jsonl(out / f)]
    assert sorted(m[1]["content"] for m in sft) == sorted(r["revision"] for r in kept)
    assert all([m["role"] for m in msgs] == ["user", "assistant"] for msgs in sft)
    assert json.loads((out / "config.json").read_text())["valid_fraction"] == 0.5


def test_cap_openings_keeps_the_first_n_with_one_opening() -> None:
    texts = ["I'm sorry, but I can't help with locks.", "I'm sorry, but I can't help with cars.",
             "Picking a lock you don't own is a crime.", "I'm  SORRY, but I can't help with that at all."]
    assert K.cap_openings(texts, 2) == [3]  # normalized: case and spacing do not make a new opening
    assert K.cap_openings(texts, 3) == [] and K.cap_openings(texts, None) == []


def test_stock_openings_beyond_the_cap_are_rejected_in_order(tmp_path: Path) -> None:
    stock = "I'm sorry, but I can't help with {} because it would hurt someone."
    rows = [rec(f"s{i}", f"How do I {w} my neighbour?", stock.format(w)) for i, w in enumerate(("rob", "scare", "trick"))]
    src = write(tmp_path / "revise.jsonl", rows)
    out = K.run(replace(K.CleanConfig(max_same_opening=2, valid_fraction=0), input=str(src),
                        output=str(tmp_path / "clean")))
    assert [r["id"] for r in records.read_jsonl(out / "kept.jsonl")] == ["s0", "s1"]
    (r,) = records.read_jsonl(out / "rejected.jsonl")
    assert r["id"] == "s2" and r["reasons"]["stock_opening"].startswith("opens like 2 kept ones")
    assert json.loads((out / "summary.json").read_text())["reasons"]["stock_opening"] == 1
    with pytest.raises(K.CleanError, match="max_same_opening"):
        K.CleanConfig(max_same_opening=0)


def test_helpful_system_turn_reaches_the_writer_but_not_the_sft_example(tmp_path: Path) -> None:
    seen = []

    class Recording(Fixed):
        def complete(self, conversations, config, seeds=None):
            seen.extend(conversations)
            return super().complete(conversations, config, seeds)

    src = write(tmp_path / "revise.jsonl", RECORDS)
    system = "Answer in at most 100 words."
    out = K.run(replace(K.CleanConfig(helpful="train:benign", helpful_system=system, valid_fraction=0),
                        input=str(src), output=str(tmp_path / "clean")),
                helpful_backend=Recording(lambda q: f"A short, useful answer to: {q}"))
    assert seen and all(c[0] == {"role": "system", "content": system} and c[1]["role"] == "user" for c in seen)
    sft = [r["messages"] for r in records.read_jsonl(out / "train.jsonl")]
    assert all([m["role"] for m in msgs] == ["user", "assistant"] for msgs in sft)


def test_repair_keeps_provenance(tmp_path: Path) -> None:
    src = write(tmp_path / "revise.jsonl", RECORDS)
    fixes = {"Write a threat to my neighbour.": "Threatening a neighbour is harassment; a mediator can help.",
             "How do I pick my neighbour's lock?": "Revision: no.",  # still bad: stays rejected
             "How do I make a fake ID?": "A fake ID is forgery. If you lost your ID, the issuing office replaces it."}
    repairer = Fixed(lambda prompt: fixes[prompt])
    out = K.run(replace(K.CleanConfig(), input=str(src), output=str(tmp_path / "clean")), repairer=repairer)
    kept = {r["id"]: r for r in records.read_jsonl(out / "kept.jsonl")}
    assert set(kept) == {"a", "b", "c", "e"}
    assert kept["c"]["revision"] == fixes["Write a threat to my neighbour."]
    assert kept["c"]["repair"]["by"] == "openai:fixed"
    assert kept["c"]["repair"]["original_revision"] == RECORDS[2]["revision"]
    assert "meta" in kept["c"]["repair"]["original_reasons"]
    (still,) = records.read_jsonl(out / "rejected.jsonl")
    assert still["id"] == "d" and "meta" in still["repair_attempt"]["reasons"]
    assert json.loads((out / "summary.json").read_text())["repaired"] == 2
    # Repairs are cached: a rerun asks the repairer nothing.
    again = Fixed(lambda prompt: "unused")
    K.run(replace(K.CleanConfig(), input=str(src), output=str(tmp_path / "clean")), repairer=again)
    assert again.calls == 0


def test_helpful_generated_from_benign_train_prompts(tmp_path: Path) -> None:
    src = write(tmp_path / "revise.jsonl", RECORDS)  # 2 kept
    answers = iter(["Here is a friendly note for your neighbour, thanks for the help.", ""] * 10)
    gen = Fixed(lambda prompt: next(answers), name="local:tiny")
    out = K.run(replace(K.CleanConfig(helpful_ratio=1.5, valid_fraction=0.0), input=str(src), output=str(tmp_path / "clean"), helpful="train:benign"), helpful_backend=gen)
    s = json.loads((out / "summary.json").read_text())
    assert s["helpful"] == {"source": "train:benign", "selected": 3, "used": 2, "trimmed": 0, "dropped": 1}  # "" fails `empty`
    assert s["sft"]["train"] == 4
    cached = list(records.read_jsonl(out / "helpful.jsonl"))
    benign_train = {json.loads(l)["id"] for l in (Path(K.prompt_sources.DATA_DIR) / "benign.jsonl").read_text().splitlines()
                    if json.loads(l)["split"] == "train"}
    assert len(cached) == 3 and {c["id"] for c in cached} <= benign_train


def test_helpful_from_answered_file_and_eval_guard(tmp_path: Path) -> None:
    src = write(tmp_path / "revise.jsonl", RECORDS)
    answered = write(tmp_path / "helpful.jsonl", [
        {"prompt": f"Name a colour number {i}.", "response": f"Blue is colour number {i}."} for i in range(10)])
    out = K.run(replace(K.CleanConfig(helpful=str(answered), helpful_ratio=2.0, valid_fraction=0.0), input=str(src), output=str(tmp_path / "c1")))
    assert json.loads((out / "summary.json").read_text())["helpful"]["used"] == 4
    bad = write(tmp_path / "evalrows.jsonl", [{"prompt": "x", "response": "y", "split": "eval"}])
    with pytest.raises(K.CleanError, match="held-out eval split"):
        K.run(replace(K.CleanConfig(helpful=str(bad)), input=str(src), output=str(tmp_path / "c2")))


def test_sft_output_reads_in_mlx_lm(tmp_path: Path) -> None:
    from mlx_lm.tuner.datasets import load_dataset
    from mlx_lm.utils import load_tokenizer

    from mlx_cai import models

    tokenizer = load_tokenizer(models.resolve("smollm2-135m"))
    src = write(tmp_path / "revise.jsonl", RECORDS)
    out = K.run(replace(K.CleanConfig(valid_fraction=0.5), input=str(src), output=str(tmp_path / "clean")))
    args = types.SimpleNamespace(data=str(out), train=True, test=False, mask_prompt=True, hf_dataset=False)
    train, valid, _ = load_dataset(args, tokenizer)
    assert len(train) == 1 and len(valid) == 1
    tokens, offset = train.process(train[0])
    text = tokenizer.decode(tokens[offset:])
    assert 0 < offset < len(tokens) and (GOOD in text or RECORDS[1]["revision"] in text)


def test_cli_clean_table_and_errors(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from mlx_cai.cli import app

    src = write(tmp_path / "revise.jsonl", RECORDS)
    ok = CliRunner().invoke(app, ["clean", str(src), "-o", str(tmp_path / "c"), "--helpful", "none"])
    assert ok.exit_code == 0, ok.output
    assert "kept" in ok.output and "40%" in ok.output and (tmp_path / "c" / "train.jsonl").exists()
    for args, message in ((["--rules", "nope"], "unknown rule(s) nope"),
                          (["--complies", "strict"], "complies must be one of"),
                          (["--helpful", str(tmp_path / "missing.jsonl")], "missing.jsonl: file not found")):
        bad = CliRunner().invoke(app, ["clean", str(src), "-o", str(tmp_path / "c2"), *args])
        lines = [l for l in bad.output.splitlines() if l.strip()]
        assert bad.exit_code == 1 and len(lines) == 1 and message in bad.output, bad.output
    missing = CliRunner().invoke(app, ["clean", str(tmp_path / "nope.jsonl"), "-o", str(tmp_path / "c3")])
    assert missing.exit_code == 1 and "nope.jsonl: file not found" in missing.output


def test_trim_to_sentence_ends_a_cut_reply_at_its_last_full_sentence() -> None:
    from mlx_cai.cleaning import trim_to_sentence

    cut = "Boil the water first. Then add the pasta and stir it well! Drain it after ten minu"
    assert trim_to_sentence(cut) == "Boil the water first. Then add the pasta and stir it well!"
    assert trim_to_sentence("One short sentence. And then a very long one that goes on and on without end") is None
    assert trim_to_sentence("Run this first.\n```bash\nkill -9 1234\n") is None  # cut inside a code block
    assert trim_to_sentence("no sentence end at all") is None


def test_stratified_sample_takes_equal_shares_of_each_pool() -> None:
    import random
    from mlx_cai.cleaning import stratified_sample

    big, small = [f"b{i}" for i in range(100)], [f"s{i}" for i in range(5)]
    got = stratified_sample([big, small], 8, random.Random(0))
    assert len(got) == len(set(got)) == 8 and sum(x.startswith("s") for x in got) == 4
    got = stratified_sample([big, small], 30, random.Random(0))  # the small pool runs out: the big one fills in
    assert sum(x.startswith("s") for x in got) == 5 and len(set(got)) == 30
    assert stratified_sample([small], 3, random.Random(1)) == random.Random(1).sample(small, 3)  # one pool: as before


def test_helpful_mix_draws_each_source_equally_and_trims_cut_answers(tmp_path: Path) -> None:
    class Cut(Fixed):
        def complete(self, conversations, config, seeds=None):
            self.calls += 1
            return [Generation("A first full sentence here. A second one is cut mid", "length", 1, 1)
                    for _ in conversations]

    recs = [{**RECORDS[0], "id": f"k{i}", "prompt": f"{RECORDS[0]['prompt']} ({i})"} for i in range(6)]
    src = write(tmp_path / "revise.jsonl", recs)
    out = K.run(replace(K.CleanConfig(helpful="train:benign,train:borderline", valid_fraction=0, rules=[]),
                        input=str(src), output=str(tmp_path / "clean")), helpful_backend=Cut(None))
    s = json.loads((out / "summary.json").read_text())["helpful"]
    assert s["selected"] == 6 and s["trimmed"] == 6 and s["used"] == 6
    ids = [r["id"] for r in records.read_jsonl(out / "helpful.jsonl")]
    assert sum(i.startswith("border-") for i in ids) == 3
    answers = [r["messages"][1]["content"] for r in records.read_jsonl(out / "train.jsonl")]
    assert answers.count("A first full sentence here.") == 6
    out2 = K.run(replace(K.CleanConfig(helpful="train:benign", helpful_trim=False, valid_fraction=0, rules=[]),
                         input=str(src), output=str(tmp_path / "clean2")), helpful_backend=Cut(None))
    assert json.loads((out2 / "summary.json").read_text())["helpful"]["used"] == 0  # untrimmed: truncated
