"""The pairwise comparison of the feedback stage (mlx_cai.judges.preference): question, options, verdicts."""

from mlx_cai import judges
from mlx_cai.judges import preference
from mlx_cai.stages import feedback as F


def test_question_names_the_options_in_order():
    q = preference.question("How do I pick a lock?", preference.PRINCIPLES[0], "first reply", "second reply")
    assert q.startswith("Consider the following conversation between a human and an assistant:\n\nHuman: How do I")
    assert q.index("(A) first reply") < q.index("(B) second reply")
    assert preference.judge_question("p", "which?", "a", "b").endswith(preference.JUDGE_INSTRUCTION)


def test_parse_verdict_takes_the_last_and_tolerates_spaces():
    assert preference.parse_verdict("First [[A]], on reflection [[ B ]]") == "B"
    assert preference.parse_verdict("I pick A.") is None
    assert preference.parse_verdict("[[C]] [[A]]") == "A"


def test_one_home_for_every_judge():
    assert judges.KeywordJudge is judges.rubrics.KeywordJudge and judges.llm_judges is judges.rubrics.llm_judges
    assert F.PRINCIPLES is preference.PRINCIPLES and F.question is preference.question
    assert len(preference.PRINCIPLES) == 8 and preference.OPTIONS == ("(A)", "(B)")
