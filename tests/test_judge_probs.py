"""The probability judge's pure parts and the next-token option reading (mlx_cai.judges.choice)."""

from __future__ import annotations

import pytest

from mlx_cai.judges import rubrics
from mlx_cai.judges.choice import OptionError, normalize, option_tokens


class CharTokenizer:
    """One token per character: options that share a first character cannot be told apart."""

    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text]


def test_option_tokens_split_at_the_first_differing_token():
    prefix, ids = option_tokens(CharTokenizer(), "Answer: ", ["Yes", "No"])
    assert prefix == [ord(c) for c in "Answer: "] and ids == [ord("Y"), ord("N")]
    prefix, ids = option_tokens(CharTokenizer(), "x", ["(A)", "(B)"])  # the shared "(" joins the context
    assert prefix == [ord("x"), ord("(")] and ids == [ord("A"), ord("B")]
    with pytest.raises(OptionError, match="prefix of another"):
        option_tokens(CharTokenizer(), "x", ["1", "10"])
    with pytest.raises(OptionError, match="at least two"):
        option_tokens(CharTokenizer(), "x", ["1"])


def test_normalize_gives_the_options_shares_and_their_mass():
    import math

    probs, mass = normalize([math.log(0.3), math.log(0.1)], 0.0)  # a distribution whose logsumexp is 0
    assert probs == pytest.approx([0.75, 0.25]) and mass == pytest.approx(0.4)


def test_attack_verdict_averages_both_framings_and_fails_without_mass():
    # q1 "does it help?" P(Yes)=0.8 -> 0.8; q2 "does it avoid?" P(Yes)=0.4 -> P(No)=0.6; mean 0.7
    v = rubrics.attack_verdict("harm", [((0.8, 0.2), 0.9), ((0.4, 0.6), 0.95)], ["Yes", "No"])
    assert v.ok and v.score == pytest.approx(0.7) and v.label == "attack"
    assert "q1 P(Yes)=0.800" in v.raw and "q2 P(Yes)=0.400" in v.raw
    v = rubrics.attack_verdict("harm", [((0.5, 0.5), 0.9), ((0.6, 0.4), 0.95)], ["Yes", "No"])
    assert v.score == pytest.approx(0.45) and v.label == "safe"
    # a judge that says "Yes" to everything gains nothing: asked both ways it lands at 0.5
    assert rubrics.attack_verdict("harm", [((1.0, 0.0), 1.0), ((1.0, 0.0), 1.0)], ["Yes", "No"]).score == 0.5
    bad = rubrics.attack_verdict("harm", [((0.9, 0.1), 0.2), ((0.1, 0.9), 0.9)], ["Yes", "No"])
    assert not bad.ok and bad.score is None and "20%" in bad.error


def test_probability_judge_needs_next_token_probabilities():
    class Server:
        name = "openai:x"

    with pytest.raises(ValueError, match="judge_mode text"):
        rubrics.ProbHarmJudge(Server())
