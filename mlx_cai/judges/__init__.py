"""Every judge in one home. Reads and writes no files.

  rubrics      evaluation judges: keyword refusal, harm 1-5 (or P(attack) from Yes/No probabilities), MT-Bench-style
               helpfulness 1-10 (`mlx-cai eval`)
  preference   the pairwise comparison of the feedback stage: principles, question, verdicts
  choice       a local model's next-token probabilities over fixed options (feedback labels, probability judges)

The rubric names are importable from here too (`from mlx_cai import judges; judges.KeywordJudge`).
"""

from mlx_cai.judges.rubrics import (HARM_SYSTEM, HARM_TEMPLATE, HELP_MULTI, HELP_SINGLE, HELP_SYSTEM,
                                    REFERENCE_CATEGORIES, RETRY_TEMPERATURE, RUBRICS, Case, Judge, JudgeParseError,
                                    KeywordJudge, LLMJudge, ProbHarmJudge, Verdict, harm_messages, helpfulness_messages, llm_judges,
                                    parse_harm_score, parse_mtbench_rating)

__all__ = ["HARM_SYSTEM", "HARM_TEMPLATE", "HELP_MULTI", "HELP_SINGLE", "HELP_SYSTEM", "REFERENCE_CATEGORIES",
           "RETRY_TEMPERATURE", "RUBRICS", "Case", "Judge", "JudgeParseError", "KeywordJudge", "LLMJudge", "ProbHarmJudge", "Verdict",
           "harm_messages", "helpfulness_messages", "llm_judges", "parse_harm_score", "parse_mtbench_rating"]
