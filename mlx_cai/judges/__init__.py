"""Every judge in one home. Reads and writes no files.

  rubrics      evaluation judges: keyword refusal, harm 1-5, MT-Bench-style helpfulness 1-10 (`mlx-cai eval`)
  preference   the pairwise comparison of the feedback stage: principles, question, option tokens, verdicts

The rubric names are importable from here too (`from mlx_cai import judges; judges.KeywordJudge`).
"""

from mlx_cai.judges.rubrics import (HARM_SYSTEM, HARM_TEMPLATE, HELP_MULTI, HELP_SINGLE, HELP_SYSTEM,
                                    REFERENCE_CATEGORIES, RETRY_TEMPERATURE, RUBRICS, Case, Judge, JudgeParseError,
                                    KeywordJudge, LLMJudge, Verdict, harm_messages, helpfulness_messages, llm_judges,
                                    parse_harm_score, parse_mtbench_rating)

__all__ = ["HARM_SYSTEM", "HARM_TEMPLATE", "HELP_MULTI", "HELP_SINGLE", "HELP_SYSTEM", "REFERENCE_CATEGORIES",
           "RETRY_TEMPERATURE", "RUBRICS", "Case", "Judge", "JudgeParseError", "KeywordJudge", "LLMJudge", "Verdict",
           "harm_messages", "helpfulness_messages", "llm_judges", "parse_harm_score", "parse_mtbench_rating"]
