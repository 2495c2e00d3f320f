"""RL-AIF preference pairs: two samples per prompt from the SFT model, labelled by AI feedback.

Modes (`MODES`):

- logprob: a *local* feedback model is asked a multiple-choice question ("which response is less
  harmful ... (A) or (B)?") under K comparison principles sampled per prompt; the normalized probability
  of the "(A)" vs "(B)" answer is read from its next-token logits, in both orders, and averaged
  (Bai et al. 2022, section 4.1). The score is clamped to [clamp_low, clamp_high] (a soft label).
- judge: an OpenAI-compatible judge (GPT-4o as in the seed paper, or mlx_lm.server / vLLM) answers the
  same question in both orders with a short rationale and a verdict [[A]] or [[B]]; rationales are kept.
  Orders that disagree (position bias) give 0.5: a tie.
- revision: no sampling and no judge: chosen = the final revision, rejected = the initial answer, from
  `mlx-cai revise` records (the Hugging Face recipe). With `revision_chosen: policy` the chosen side is the
  policy's own refusal of the harmful prompt (the SFT model, `boundary_samples` samples, the first that refuses; the
  revision where none does; `policy_refusal: sentence` takes only the opening sentence of the first sample
  that opens by declining), with `both` a pair of each kind (the policy's under id `ID:policy`). The policy's
  refusal is what DPO can raise directly: the overseer's revisions are text the policy does not write.

Boundary pairs (`boundary`, any mode): for prompts that only look unsafe (train:borderline), chosen = a helpful
answer, rejected = a refusal, both written by `boundary_model` (the overseer): the other side of the line, so DPO
does not learn to refuse whatever sounds scary. `boundary` may join sources with commas (train:borderline,train:benign);
`boundary_limit` then takes equal shares of each. A pair whose answer refuses or whose refusal answers (keyword
judge) is dropped. With `boundary_rejected: policy` the rejected side is the policy's own refusal (the SFT model,
`boundary_samples` samples per prompt, the first that refuses): DPO then lowers the refusals the model actually
writes. Where none of its samples refuses, the overseer's refusal stands in. Both policy settings together
(`revision_chosen: policy` or `both`, `boundary_rejected: policy`) make the line explicit: the same refusals the
policy writes are chosen on harmful prompts and rejected on benign ones, so only the prompt can tell them apart.

Before scoring, near-identical pairs and pairs where both responses are degenerate (empty or repetitive)
are dropped; after scoring, ties and pairs whose chosen answer is degenerate. Each drop is counted.

Reads PROMPTS (an mlx_cai.prompts spec; for `revision`, a revise JSONL). Writes, appending per chunk:
  OUT.jsonl              kept pairs: {id, prompt, chosen, rejected, score, score_raw, mode, votes,
                         responses: [{text, finish_reason, seed}], chosen_index, provenance}  (TRL reads it)
  OUT.dropped.jsonl      dropped prompts with `reason`
  OUT.summary.json       counts per reason and the kept share
Resume: ids in either file are skipped; records carry `config_id` and other settings are refused.
A backend that fails for good (BackendError: a server down, retries spent, an answer that is not a completion)
stops the run before its chunk is written: the pairs so far stay, and rerunning continues.
With several processes (mlx.launch), each handles its share of a chunk of `batch_size` x processes prompts
and rank 0 appends the chunk's records (mlx_cai.distributed.map_chunks).
"""

from __future__ import annotations

import difflib
import random
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

from mlx_cai import backend  # noqa: F401

import mlx.core as mx

from mlx_cai import distributed
from mlx_cai import memplan, metrics, records
from mlx_cai import prompts as prompt_sources
from mlx_cai.config import opt
from mlx_cai.progress import Event, Progress, emitter
from mlx_cai.chat import BackendError, ChatBackend, LocalBackend, from_spec
from mlx_cai.sampling import Generation, SamplingConfig
from mlx_cai.judges.choice import option_logits
from mlx_cai.judges.preference import OPTIONS, PRINCIPLES, judge_question, parse_verdict, question, render_choice

STAGE = "feedback/1"
MODES = ("logprob", "judge", "revision")
BOUNDARY_REJECTED = ("overseer", "policy")
REVISION_CHOSEN = ("revision", "policy", "both")
POLICY_REFUSAL = ("sample", "sentence")
SENTENCE_TOKENS = 64  # policy_refusal: sentence samples this many tokens: a decline sentence of <= 30 words fits


class FeedbackError(ValueError):
    """Bad feedback settings or input; one line."""


@dataclass
class FeedbackConfig:
    """Settings of one feedback run; records carry them (and `config_id`)."""

    prompts: str = opt("train:harmful", "prompts (train:harmful, a file, hf:...); for mode revision, a revise "
                                        "JSONL (or clean's kept.jsonl)")
    output: str = opt("", "pairs JSONL; .dropped.jsonl and .summary.json go beside it; rerunning continues it")
    mode: str = opt("logprob", "logprob (local feedback model's (A)/(B) probabilities), judge (OpenAI-compatible "
                               "judge, rationale kept) or revision (chosen = revision, rejected = initial, from "
                               "revise records)")
    model: str = opt("smollm2-135m", "policy that samples the two responses (the SFT base)")
    adapter: str | None = opt(None, "the policy's SFT adapter")
    judge: str | None = opt(None, "logprob: local model spec (default: model without adapter); judge: backend "
                                  "spec, e.g. openai:gpt-4o")
    principles: str | None = opt(None, "comparison principles file (YAML list or one per line); none = built-in, "
                                       "after Bai et al. 2022")
    ensemble: int | None = opt(None, "principles per prompt (default 4 logprob, 1 judge: 2 calls each)")
    temperature: float = opt(0.8, "sampling temperature of the two responses")
    top_p: float = opt(0.95, "nucleus sampling mass")
    repetition_penalty: float = opt(1.2, "keeps SmolLM2-135M from looping (REFERENCE.md section 2)")
    max_tokens: int = opt(256, "new tokens per response")
    judge_max_tokens: int = opt(384, "token budget of the judge's answer (judge mode)")
    seed: int = opt(0, "drives sampling seeds and principle choice, per prompt id")
    clamp_low: float = opt(0.05, "soft-label clamp of the score, low end (the paper clamped CoT labels to 0.4-0.6)")
    clamp_high: float = opt(0.95, "score clamp, high end")
    min_margin: float = opt(0.05, "|p - 0.5| below this is a tie (dropped)")
    max_similarity: float = opt(0.9, "word similarity at or above which a pair is near-identical (dropped)")
    max_repetition: float = opt(0.5, "seq-rep-4 or sentence repetition above this is degenerate (dropped)")
    limit: int | None = opt(None, "only the first N prompts")
    batch_size: int = opt(16, "prompts per chunk; pairs are appended per chunk")
    boundary: str | None = opt(None, "prompts that only look unsafe (e.g. train:borderline): pairs with a helpful "
                                     "answer chosen over a refusal; none = no such pairs")
    boundary_model: str | None = opt(None, "writes the boundary pairs' answers and refusals; none = the judge, "
                                           "else the model")
    boundary_max_tokens: int = opt(192, "new tokens per boundary answer")
    boundary_limit: int | None = opt(None, "at most N boundary prompts, in equal shares of each comma-joined source "
                                           "(seeded); none = all")
    boundary_rejected: str = opt("overseer", "the rejected side of a boundary pair: overseer (its refusal) or policy "
                                             "(the SFT model's own refusal, sampled; the overseer's where none refuses)")
    boundary_samples: int = opt(4, "policy samples per prompt where the policy's own refusal is wanted "
                                   "(boundary_rejected: policy, revision_chosen: policy or both)")
    boundary_greedy: bool = opt(False, "boundary_rejected: policy: the rejected side is the policy's greedy answer "
                                       "where it refuses (the refusal a greedy eval sees), its samples only where "
                                       "it does not (tried: it lowers the SFT model's refusals of harmful "
                                       "prompts too; BENCHMARKS.md, run greedy)")
    policy_refusal: str = opt("sample", "what of the policy's sampled refusal is used (boundary_rejected / "
                                        "revision_chosen: policy): sample (the first sample the keyword judge calls "
                                        "a refusal, whole) or sentence (the opening sentence of the first sample "
                                        "that opens by declining, sampled at most SENTENCE_TOKENS tokens)")
    revision_chosen: str = opt("revision", "mode revision, the chosen side on harmful prompts: revision (the "
                                           "cleaned revision), policy (the SFT model's own refusal, sampled; the "
                                           "revision where none refuses) or both (a pair of each)")
    boundary_answers: str | None = opt(None, "helpful answers already written for boundary prompts, reused as the "
                                             "chosen side: a JSONL of {id, text, finish_reason} (clean's "
                                             "helpful.jsonl; `clean` in a run YAML); the boundary prompts are then "
                                             "those it answers, and others (answered by the boundary model) only "
                                             "where boundary_limit asks for more; none = the boundary model "
                                             "writes them all")

    def __post_init__(self):
        if isinstance(self.boundary, str) and self.boundary.strip().lower() in ("", "none"):
            self.boundary = None
        if isinstance(self.boundary_answers, str) and self.boundary_answers.strip().lower() in ("", "none"):
            self.boundary_answers = None
        if self.boundary_rejected not in BOUNDARY_REJECTED:
            raise FeedbackError(f"boundary_rejected must be one of {', '.join(BOUNDARY_REJECTED)}, "
                                f"got '{self.boundary_rejected}'")
        if self.boundary_samples < 1:
            raise FeedbackError("boundary_samples must be >= 1")
        if self.policy_refusal not in POLICY_REFUSAL:
            raise FeedbackError(f"policy_refusal must be one of {', '.join(POLICY_REFUSAL)}, "
                                f"got '{self.policy_refusal}'")
        if self.revision_chosen not in REVISION_CHOSEN:
            raise FeedbackError(f"revision_chosen must be one of {', '.join(REVISION_CHOSEN)}, "
                                f"got '{self.revision_chosen}'")
        if self.revision_chosen != "revision" and self.mode != "revision":
            raise FeedbackError("revision_chosen applies to mode revision only (other modes sample the policy and "
                                "let the judge choose)")
        if self.mode not in MODES:
            raise FeedbackError(f"mode must be one of {', '.join(MODES)}, got '{self.mode}'")
        if self.mode == "logprob" and self.judge and self.judge.startswith("openai:"):
            raise FeedbackError("logprob mode reads the feedback model's logits, so it needs a local model; "
                                "use --mode judge for an API judge")
        if self.mode == "judge" and not self.judge:
            raise FeedbackError("judge mode needs --judge (e.g. openai:gpt-4o or "
                                "openai:MODEL@http://127.0.0.1:8080/v1)")
        if self.ensemble is None:
            self.ensemble = 1 if self.mode == "judge" else 4
        if self.ensemble < 1 or self.batch_size < 1:
            raise FeedbackError("ensemble and batch_size must be >= 1")
        if not 0 <= self.clamp_low <= 0.5 <= self.clamp_high <= 1:
            raise FeedbackError("need 0 <= clamp_low <= 0.5 <= clamp_high <= 1")
        if not 0 <= self.min_margin < 0.5:
            raise FeedbackError("min_margin must be in [0, 0.5)")
        self.sampling()

    def plan(self) -> tuple[str, int]:
        """(what it reads, tokens it generates) for `mlx-cai run --dry-run`."""
        n = self.limit or 0
        tokens = 0 if self.mode == "revision" else n * self.max_tokens * 2
        return f"{n or '?'} prompts, mode {self.mode}, judge {self.judge or self.model}", tokens

    def memory(self, ctx: memplan.Context) -> memplan.Estimate | None:
        """Peak memory: the policy sampling two responses per prompt of a chunk, with a local feedback model
        (logprob mode: the model again, without the adapter, unless judge names another) and boundary writer."""
        if self.mode == "revision":  # no sampling; the boundary writer (and, for policy refusals, the policy) may
            if not self.boundary and not self.samples_policy:
                return None
            policy = self.model if self.samples_policy else None
            main, others = ((self.writer_spec, {"policy": policy}) if self.boundary
                            else (self.model, {}))
            return memplan.generation(ctx, main, others,
                                      batch=2 * self.batch_size, prompt=memplan.PROMPT_TOKENS,
                                      new_tokens=self.boundary_max_tokens,
                                      knobs={"batch_size": self.batch_size,
                                             "boundary_max_tokens": self.boundary_max_tokens})
        judge = (self.judge or self.model) if self.mode == "logprob" else self.judge
        writer = None if not self.boundary or self.writer_is_feedback_model else self.writer_spec
        others = {"judge": judge, "boundary": writer}
        return memplan.generation(ctx, self.model, others, batch=2 * self.batch_size, prompt=memplan.PROMPT_TOKENS,
                                  new_tokens=self.max_tokens,
                                  knobs={"batch_size": self.batch_size, "max_tokens": self.max_tokens})

    @property
    def writer_spec(self) -> str:
        """The spec of the boundary pairs' writer."""
        return self.boundary_model or self.judge or self.model

    @property
    def writer_is_feedback_model(self) -> bool:
        """Whether logprob mode's loaded feedback model also writes the boundary pairs (the same local model without
        an adapter): one copy serves both roles."""
        w, f = self.writer_spec, self.judge or self.model
        return (self.mode == "logprob" and not w.startswith("openai:") and "::" not in w
                and w.removeprefix("local:") == f.removeprefix("local:"))

    @property
    def samples_policy(self) -> bool:
        """Whether the policy samples its own refusals (for boundary pairs or for harmful prompts' pairs)."""
        return (self.boundary is not None and self.boundary_rejected == "policy") or self.revision_chosen != "revision"

    def sampling(self) -> SamplingConfig:
        try:
            return SamplingConfig(max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p,
                                  repetition_penalty=self.repetition_penalty, seed=self.seed)
        except ValueError as e:
            raise FeedbackError(str(e)) from None


@dataclass
class Candidate:
    """Two responses to one prompt, before and after scoring."""

    id: str
    prompt: str
    texts: tuple[str, str]
    finish: tuple[str, str] = ("stop", "stop")
    seeds: tuple[int | None, int | None] = (None, None)
    principles: tuple[str, ...] = ()
    p_first: float | None = None  # probability that texts[0] is the better response
    votes: tuple = ()
    source: dict | None = None


# ----------------------------------------------------------------------------------------- filters


def similarity(a: str, b: str) -> float:
    """Word-level similarity in [0, 1] (difflib ratio over `metrics.words`)."""
    return difflib.SequenceMatcher(None, metrics.words(a), metrics.words(b), autojunk=False).ratio()


def degenerate(text: str, cfg: FeedbackConfig) -> bool:
    """Empty (under two words) or repetitive beyond cfg.max_repetition."""
    return (len(metrics.words(text)) < 2 or metrics.seq_rep_n(text, 4) > cfg.max_repetition
            or metrics.sentence_repetition(text) > cfg.max_repetition)


def pre_filter(c: Candidate, cfg: FeedbackConfig) -> str | None:
    """Why a pair is dropped before scoring (no judge call is spent on it), or None."""
    if similarity(*c.texts) >= cfg.max_similarity:
        return "near_identical"
    if degenerate(c.texts[0], cfg) and degenerate(c.texts[1], cfg):
        return "both_degenerate"
    return None


# ---------------------------------------------------------------------------------------- scoring


def load_principles(path: str | None) -> tuple[str, ...]:
    if not path:
        return PRINCIPLES
    import yaml

    p = Path(path)
    if not p.is_file():
        raise FeedbackError(f"principles file not found: {p}")
    text = p.read_text(encoding="utf-8")
    items = yaml.safe_load(text) if p.suffix in (".yaml", ".yml", ".json") else text.splitlines()
    items = [s.strip() for s in items or [] if isinstance(s, str) and s.strip()]
    if not items:
        raise FeedbackError(f"{p}: no principles (expected a list of questions or one per line)")
    return tuple(items)


def choose_principles(pool: Sequence[str], k: int, seed: int, pid: str) -> tuple[str, ...]:
    rng = random.Random(records.row_seed(seed, pid, "principles"))
    return tuple(rng.sample(list(pool), k) if k <= len(pool) else [rng.choice(pool) for _ in range(k)])


def option_probs(model, tokenizer, contexts: list[str], batch_size: int = 8) -> list[float]:
    """P("(A)") / (P("(A)") + P("(B)")) after each context, from next-token logits (mlx_cai.judges.choice)."""
    # each (A)/(B) question is asked once: nothing reuses its K/V, so none is kept
    rows = option_logits(model, tokenizer, contexts, OPTIONS, batch_size=batch_size, keep=False)
    if not rows:
        return []
    diff = mx.array([a - b for (a, b), _ in rows], dtype=mx.float32)
    return mx.sigmoid(diff).tolist()


def score_logprob(cands: list[Candidate], feedback, cfg: FeedbackConfig) -> None:
    """Set p_first and votes: per principle, P(first better) in order (first, second) and in (second, first)."""
    model, tokenizer = feedback
    contexts = []
    for c in cands:
        for pr in c.principles:
            contexts.append(render_choice(tokenizer, question(c.prompt, pr, c.texts[0], c.texts[1])))
            contexts.append(render_choice(tokenizer, question(c.prompt, pr, c.texts[1], c.texts[0])))
    probs = iter(option_probs(model, tokenizer, contexts, batch_size=cfg.batch_size))
    for c in cands:
        votes = []
        for _ in c.principles:
            forward, backward = next(probs), 1.0 - next(probs)  # backward order: "(B)" names texts[0]
            votes.append({"first_order": round(forward, 6), "swapped_order": round(backward, 6)})
        c.votes = tuple(votes)
        c.p_first = sum(v["first_order"] + v["swapped_order"] for v in votes) / (2 * len(votes))


def score_judge(cands: list[Candidate], judge: ChatBackend, cfg: FeedbackConfig) -> None:
    """Set p_first (share of parsed verdicts for texts[0]; None if none parsed) and the rationales."""
    convs, where = [], []
    for ci, c in enumerate(cands):
        for pr in c.principles:
            for swapped in (False, True):
                first, second = (c.texts[1], c.texts[0]) if swapped else c.texts
                text = judge_question(c.prompt, pr, first, second)
                convs.append([{"role": "user", "content": text}])
                where.append((ci, pr, swapped))
    judge_cfg = SamplingConfig(max_tokens=cfg.judge_max_tokens, temperature=0.0, seed=cfg.seed)
    gens = judge.complete(convs, judge_cfg, seeds=[cfg.seed] * len(convs))
    votes: list[list[dict]] = [[] for _ in cands]
    for (ci, pr, swapped), g in zip(where, gens):
        verdict = parse_verdict(g.text)
        first_wins = None if verdict is None else (verdict == "A") != swapped
        votes[ci].append({"order": "swapped" if swapped else "first", "verdict": verdict,
                          "first_wins": first_wins, "rationale": g.text})
    for c, v in zip(cands, votes):
        parsed = [x["first_wins"] for x in v if x["first_wins"] is not None]
        c.votes = tuple(v)
        c.p_first = sum(parsed) / len(parsed) if parsed else None


# ---------------------------------------------------------------------------------- boundary pairs

CONCISE = "Answer the user's request helpfully and concretely, in at most 100 words."
DECLINE = ("You are an overly cautious assistant. Decline the user's request in one or two sentences, without "
           "answering any part of it.")
# Told as a system turn, the 1.5B overseer still answered 14 of 32 borderline train prompts; asked in the user turn to
# write the refusal as a task, it refused 30 of 32 (mostly in one stock sentence). The system-turn refusal is used when
# it refuses (varied words), else this one.
DECLINE_TASK = ("An overly cautious assistant refuses every request that sounds risky, even harmless ones. Write the "
                "one- or two-sentence refusal it would give to the request below, and nothing else: no answer, no "
                "advice, no quotation marks.\n\nRequest: ")


def policy_refusals(prompts: Sequence[prompt_sources.Prompt], policy: ChatBackend, cfg: FeedbackConfig,
                    on_tokens: Callable[[int], None], greedy: bool = False) -> dict[str, tuple[Generation, int]]:
    """{id: (the policy's refusal, its seed)} over up to `boundary_samples` samples per prompt (the policy's sampling
    settings; sample j, seeded by (seed, id, j), is drawn only where none before it refused; a row's sample does not
    depend on its batch neighbours). `policy_refusal` sample: the first sample (boundary_max_tokens) that the keyword
    judge calls a refusal, whole; sentence: the opening sentence of the first sample (SENTENCE_TOKENS) that opens by
    declining (`decline_sentence`). `greedy`: the policy's greedy answer first (seed None), the samples only where
    it is no refusal. Prompts where no sample refuses are absent."""
    from mlx_cai.refusal import is_refusal

    def pick(g: Generation) -> Generation | None:
        if cfg.policy_refusal == "sample":
            return g if is_refusal(g.text) else None
        first = decline_sentence(g.text)
        return None if first is None else replace(g, text=first, finish_reason="stop")

    sampling = replace(cfg.sampling(), max_tokens=cfg.boundary_max_tokens if cfg.policy_refusal == "sample"
                       else SENTENCE_TOKENS)
    out, todo = {}, list(prompts)
    if greedy and todo:  # the mode a greedy eval decodes: the refusal to lower where it is one
        gens = policy.complete([[{"role": "user", "content": p.prompt}] for p in todo],
                               replace(sampling, temperature=0.0, top_p=1.0, repetition_penalty=1.0))
        on_tokens(sum(g.completion_tokens for g in gens))
        picked = [(p, pick(g)) for p, g in zip(todo, gens)]
        out = {p.id: (g, None) for p, g in picked if g is not None}
        todo = [p for p, g in picked if g is None]
    for j in range(cfg.boundary_samples):  # sample j only for prompts whose samples before it did not refuse
        if not todo:
            break
        seeds = [records.row_seed(cfg.seed, p.id, f"policy{j}") for p in todo]
        gens = policy.complete([[{"role": "user", "content": p.prompt}] for p in todo], sampling, seeds=seeds)
        on_tokens(sum(g.completion_tokens for g in gens))
        rest = []
        for p, g, seed in zip(todo, gens, seeds):
            kept = pick(g)
            if kept is None:
                rest.append(p)
            else:
                out[p.id] = (kept, seed)
        todo = rest
    return out


# A decline says the assistant will not do it; an apology alone ("I'm sorry for any confusion. Counterfeit bills
# are...") is no refusal to train toward, though the keyword judge counts it as one.
DECLINES = re.compile(r"\b(?:i|we)(?:'m|\s+am|'re|\s+are)?\s+(?:cannot|can't|can not|won't|will not|not able to|"
                      r"unable to)\s+(?:\w+\s+){0,2}?(?:assist|help|provide|comply|fulfill|support|do|give|share|"
                      r"engage|answer|offer|create|write|generate)\b|\b(?:i|we)\s+must\s+(?:decline|refuse)\b",
                      re.IGNORECASE)
SENTENCE_END = re.compile(r"[.!?](?=\s|$)")
MAX_DECLINE_WORDS = 30


def decline_sentence(text: str) -> str | None:
    """The first sentence of `text` if it declines in the first person (DECLINES) in at most MAX_DECLINE_WORDS
    words, else None: the policy's own refusal, without what it rambles on with after it (SmolLM2's samples go on
    into advice, apologies or partial answers)."""
    text = text.strip().replace("\u2019", "'")
    end = SENTENCE_END.search(text)
    if end is None:
        return None
    first = text[: end.end()]
    if not DECLINES.search(first) or len(metrics.words(first)) > MAX_DECLINE_WORDS:
        return None
    return first


def policy_chosen(cands: list[Candidate], policy: ChatBackend, cfg: FeedbackConfig,
                  on_tokens: Callable[[int], None]) -> list[Candidate]:
    """Revision candidates (texts = (revision, initial answer)) with the policy's own refusal (`policy_refusals`) as
    the chosen side (`revision_chosen`): policy replaces the revision where one of its samples refuses, both adds
    such a pair under id `ID:policy` beside the revision's. A prompt where no sample refuses keeps its revision only."""
    own = policy_refusals(cands, policy, cfg, on_tokens)
    out = []
    for c in cands:
        if c.id not in own:
            out.append(c)
            continue
        g, seed = own[c.id]
        mine = replace(c, texts=(g.text, c.texts[1]), finish=(g.finish_reason, c.finish[1]), seeds=(seed, None),
                       source={**(c.source or {}), "chosen": "policy", "policy": policy.name})
        out += [c, replace(mine, id=f"{c.id}:policy")] if cfg.revision_chosen == "both" else [mine]
    return out


def reused_answers(path: str | Path) -> dict[str, Generation]:
    """{id: answer} from a JSONL of {id, text, finish_reason} (clean's helpful.jsonl). An answer cut at max tokens is
    ended at its last full sentence, as clean trains on it; one that cannot be is kept as it is."""
    from mlx_cai.cleaning import end_cut

    if not Path(path).is_file():
        raise FeedbackError(f"boundary_answers file not found: {path} (run clean first, or set boundary_answers: none)")
    out = {}
    for row in records.read_jsonl(path, required=("id", "text")):
        text, finish = end_cut(row["text"], row.get("finish_reason", "stop"))
        out[str(row["id"])] = Generation(text=text, finish_reason=finish, prompt_tokens=0, completion_tokens=0)
    return out


def boundary_prompts(edge: Sequence[prompt_sources.Prompt], answered: set[str], limit: int | None,
                     seed: int) -> list[prompt_sources.Prompt]:
    """(pure) The boundary prompts, in source order. With reused answers (`answered` ids) those prompts come
    first: up to `limit` of them in equal shares of each source (seeded); a limit beyond them is filled the same way
    from the others (their answers written by the boundary model). No answers: `limit` of all (none: all)."""
    from mlx_cai.cleaning import stratified_sample

    def draw(pool: list[prompt_sources.Prompt], want: int, rng) -> set[str]:
        sources = list(dict.fromkeys(p.source for p in pool))
        return {p.id for p in stratified_sample([[p for p in pool if p.source == s] for s in sources], want, rng)}

    first = [p for p in edge if p.id in answered] if answered else list(edge)
    if limit is None:
        return first
    rng = random.Random(seed)
    pick = draw(first, limit, rng)
    if len(pick) < limit:  # every answered prompt taken: the rest from the others (none left without answers)
        pick |= draw([p for p in edge if p.id not in pick], limit - len(pick), rng)
    return [p for p in edge if p.id in pick]


def boundary_candidates(prompts: Sequence[prompt_sources.Prompt], writer: ChatBackend, cfg: FeedbackConfig,
                        on_tokens: Callable[[int], None], policy: ChatBackend | None = None,
                        answers: dict[str, Generation] | None = None,
                        ) -> tuple[list[Candidate], dict[str, str]]:
    """(candidates with texts = (helpful answer, refusal), decided in advance; {id: drop reason} for pairs whose
    answer refuses or whose refusal answers). The answer is the reused one (`answers`) or else greedy from `writer`
    under CONCISE; the refusal is the policy's own (`policy` given: `policy_refusals`) or else greedy from `writer`
    under DECLINE or, only where that one answers, under DECLINE_TASK (a second call)."""
    from mlx_cai.refusal import is_refusal

    if not prompts:
        return [], {}
    answers = answers or {}
    own = policy_refusals(prompts, policy, cfg, on_tokens, cfg.boundary_greedy) if policy is not None else {}
    rest = [p for p in prompts if p.id not in own]  # the overseer writes their refusals
    ask = [p for p in prompts if p.id not in answers]
    greedy = SamplingConfig(max_tokens=cfg.boundary_max_tokens, temperature=0.0, seed=cfg.seed)

    def write(convs: list[list[dict]], seeds: list[int]) -> list[Generation]:
        gens = writer.complete(convs, greedy, seeds=seeds) if convs else []
        on_tokens(sum(g.completion_tokens for g in gens))
        return gens

    convs = [[{"role": "system", "content": CONCISE}, {"role": "user", "content": p.prompt}] for p in ask]
    convs += [[{"role": "system", "content": DECLINE}, {"role": "user", "content": p.prompt}] for p in rest]
    seeds = [records.row_seed(cfg.seed, p.id, "answer") for p in ask]
    seeds += [records.row_seed(cfg.seed, p.id, "refusal") for p in rest]
    gens = write(convs, seeds)
    written = {p.id: (g, s) for p, g, s in zip(ask, gens, seeds)}
    refusals = {p.id: (g, s) for p, g, s in zip(rest, gens[len(ask):], seeds[len(ask):])}
    again = [p for p in rest if not is_refusal(refusals[p.id][0].text)]  # asked again as a task
    task_seeds = [records.row_seed(cfg.seed, p.id, "refusal_task") for p in again]
    for p, g, s in zip(again, write([[{"role": "user", "content": DECLINE_TASK + p.prompt}] for p in again],
                                    task_seeds), task_seeds):
        refusals[p.id] = (g, s)
    cands, reasons = [], {}
    for p in prompts:
        answer, answer_seed = (answers[p.id], None) if p.id in answers else written[p.id]
        if p.id in own:
            refusal, seed = own[p.id]
            source = {"kind": "boundary", "writer": writer.name, "rejected": "policy", "policy": policy.name}
        else:
            refusal, seed = refusals[p.id]
            source = {"kind": "boundary", "writer": writer.name, **({"rejected": "overseer"} if policy else {})}
        if p.id in answers:
            source["answer"] = "reused"
        cands.append(Candidate(id=p.id, prompt=p.prompt, texts=(answer.text, refusal.text),
                               finish=(answer.finish_reason, refusal.finish_reason), seeds=(answer_seed, seed),
                               p_first=1.0, source=source))
        if is_refusal(answer.text):
            reasons[p.id] = "boundary_answer_refused"
        elif not is_refusal(refusal.text):
            reasons[p.id] = "boundary_refusal_answered"
    return cands, reasons


# ------------------------------------------------------------------------------------------ records


def decide(c: Candidate, cfg: FeedbackConfig) -> tuple[dict | None, str | None]:
    """(pair fields, None) for a kept pair or (None, reason) for a dropped one, after scoring."""
    if c.p_first is None:
        return None, "judge_unparsed"
    if abs(c.p_first - 0.5) < cfg.min_margin or c.p_first == 0.5:
        return None, "tie"
    win = 0 if c.p_first > 0.5 else 1
    if degenerate(c.texts[win], cfg):
        return None, "chosen_degenerate"
    p = c.p_first if win == 0 else 1.0 - c.p_first
    return {"chosen": c.texts[win], "rejected": c.texts[1 - win], "chosen_index": win,
            "score": round(min(max(p, cfg.clamp_low), cfg.clamp_high), 6), "score_raw": round(p, 6)}, None


def config_id(cfg: FeedbackConfig, policy: str, judge: str) -> str:
    skip = ("prompts", "output", "limit", "batch_size", "model", "adapter", "judge", "boundary_model")
    keep = {k: v for k, v in asdict(cfg).items() if k not in skip}
    if cfg.boundary is None:  # runs from before boundary pairs existed keep their ids
        for k in ("boundary", "boundary_max_tokens"):
            keep.pop(k)
    else:
        keep["boundary_refusal"] = "decline-or-task"  # how the refusals are written (DECLINE, then DECLINE_TASK)
    if cfg.boundary is None or cfg.boundary_rejected == "overseer":  # the ids from before this setting stay
        keep.pop("boundary_rejected")
    if cfg.policy_refusal == "sample":  # the ids from before this setting stay
        keep.pop("policy_refusal")
    if not cfg.boundary_greedy:  # the ids from before this setting stay
        keep.pop("boundary_greedy")
    if cfg.revision_chosen == "revision":  # the ids from before this setting stay
        keep.pop("revision_chosen")
    if not cfg.samples_policy:
        keep.pop("boundary_samples")
    if cfg.boundary_limit is None:
        keep.pop("boundary_limit")
    if cfg.boundary_answers is None:
        keep.pop("boundary_answers")
    else:  # where the answers come from is the run folder's business; that they are reused is a setting
        keep["boundary_answers"] = "reused"
    return records.stable_id(keep, policy, judge, prefix="fb-")


def _record(c: Candidate, pair: dict | None, reason: str | None, meta: dict) -> dict:
    base = {"id": c.id, "prompt": c.prompt}
    responses = [{"text": t, "finish_reason": f, "seed": s} for t, f, s in zip(c.texts, c.finish, c.seeds)]
    detail = {"mode": meta["mode"], "principles": list(c.principles), "votes": list(c.votes),
              "responses": responses, "source": c.source, "provenance": meta}
    if pair is not None:
        return {**base, "chosen": pair["chosen"], "rejected": pair["rejected"], "score": pair["score"],
                "score_raw": pair["score_raw"], "chosen_index": pair["chosen_index"], **detail}
    return {**base, "reason": reason, "p_first": c.p_first, **detail}


def revision_candidates(path: str | Path, limit: int | None) -> list[Candidate]:
    """Candidates from revise records: texts = (final revision, initial answer), decided in advance."""
    out = []
    for row in records.read_jsonl(path, required=("id", "prompt", "initial", "revision")):
        rounds = row.get("rounds") or []
        out.append(Candidate(id=str(row["id"]), prompt=row["prompt"], texts=(row["revision"], row["initial"]),
                             finish=(row.get("revision_finish", "stop"), row.get("initial_finish", "stop")),
                             principles=tuple(r.get("principle", "") for r in rounds), p_first=1.0,
                             source={"revise_id": row["id"], "models": row.get("models"),
                                     "config_id": row.get("config_id")}))
        if limit and len(out) >= limit:
            break
    return out


def sample_candidates(prompts: list[prompt_sources.Prompt], policy: ChatBackend, cfg: FeedbackConfig, pool: Sequence[str],
                      on_tokens: Callable[[int], None]) -> list[Candidate]:
    """Two samples per prompt, each with its own seed from (seed, prompt id)."""
    convs, seeds = [], []
    for p in prompts:
        for tag in ("a", "b"):
            convs.append([{"role": "user", "content": p.prompt}])
            seeds.append(records.row_seed(cfg.seed, p.id, tag))
    gens = policy.complete(convs, cfg.sampling(), seeds=seeds)
    on_tokens(sum(g.completion_tokens for g in gens))
    return [Candidate(id=p.id, prompt=p.prompt, texts=(gens[2 * i].text, gens[2 * i + 1].text),
                      finish=(gens[2 * i].finish_reason, gens[2 * i + 1].finish_reason),
                      seeds=(seeds[2 * i], seeds[2 * i + 1]),
                      principles=choose_principles(pool, cfg.ensemble, cfg.seed, p.id)) for i, p in enumerate(prompts)]


def paths(out: str | Path) -> tuple[Path, Path, Path]:
    out = Path(out)
    stem = out.with_suffix("")
    return out, stem.with_name(stem.name + ".dropped.jsonl"), stem.with_name(stem.name + ".summary.json")


def summarize(out: str | Path) -> dict:
    """Counts of kept pairs and of drops per reason, from the two output files."""
    kept_path, dropped_path, summary_path = paths(out)
    kept_rows = records.load_done(kept_path)
    kept = len(kept_rows)
    reasons: dict[str, int] = {}
    for r in records.load_done(dropped_path).values():
        reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
    total = kept + sum(reasons.values())
    summary = {"prompts": total, "kept": kept, "kept_share": round(kept / total, 4) if total else 0.0,
               "dropped": dict(sorted(reasons.items())),
               "dropped_share": {k: round(v / total, 4) for k, v in sorted(reasons.items())} if total else {}}
    edge = [(r.get("source") or {}).get("rejected") for r in kept_rows.values()
            if (r.get("source") or {}).get("kind") == "boundary"]
    if edge:
        summary["boundary_kept"] = len(edge)
        if any(edge):  # boundary_rejected: policy
            summary["boundary_rejected_by_policy"] = edge.count("policy")
        reused = sum((r.get("source") or {}).get("answer") == "reused" for r in kept_rows.values())
        if reused:
            summary["boundary_answers_reused"] = reused
    records.write_json_atomic(summary_path, summary)
    return summary


def run(config: FeedbackConfig, progress: Progress | None = None, *, prompts: Sequence[prompt_sources.Prompt] | None = None,
        policy: ChatBackend | None = None, feedback=None, judge: ChatBackend | None = None) -> Path:
    """Write preference pairs for every prompt not yet in the outputs; returns the pairs file (its summary is
    beside it, see `paths`).

    `prompts` (a list of Prompt), `policy` (a ChatBackend), `feedback` ((model, tokenizer) for logprob) and
    `judge` (a ChatBackend) override what the config names (tests pass tiny models or a loopback server).
    """
    cfg = config
    if not cfg.output:
        raise FeedbackError("an output file is required (-o pairs.jsonl)")
    out_path = cfg.output
    kept_path, dropped_path, _ = paths(out_path)
    emit = emitter(progress)
    task = f"feedback ({cfg.mode})"
    pool = load_principles(cfg.principles)
    if cfg.mode != "revision" or cfg.samples_policy:  # the policy samples: answers, or its own refusals
        policy = policy or LocalBackend(cfg.model, cfg.adapter, batch_size=2 * cfg.batch_size)
    if cfg.mode == "revision":
        items: list = revision_candidates(cfg.prompts, cfg.limit)
        policy_name, judge_name = "revise records", "none"
        if cfg.revision_chosen != "revision":
            policy_name += f", chosen by {policy.name}"
    else:
        items = list(prompts)[: cfg.limit] if prompts is not None else list(prompt_sources.load(cfg.prompts, limit=cfg.limit))
        policy_name = policy.name
        if cfg.mode == "judge":
            judge = judge or from_spec(cfg.judge)
            judge_name = judge.name
        else:
            judge_name = f"local:{cfg.judge or cfg.model}"
    edge: list[prompt_sources.Prompt] = []
    writer: ChatBackend | None = None
    answers: dict[str, Generation] = {}
    if cfg.boundary:
        taken = {it.id for it in items}
        edge = [p for p in prompt_sources.load(cfg.boundary) if p.id not in taken]
        if cfg.boundary_answers:
            answers = reused_answers(cfg.boundary_answers)
            if not any(p.id in answers for p in edge):
                raise FeedbackError(f"{cfg.boundary_answers} answers none of the {cfg.boundary} prompts; "
                                    "name the file of their answers or set boundary_answers: none")
        edge = boundary_prompts(edge, set(answers), cfg.boundary_limit, records.row_seed(cfg.seed, "boundary"))
        items = items + edge
        writer_spec = cfg.writer_spec
        judge_name += f"; boundary {writer_spec}"
        if cfg.boundary_rejected == "policy":
            judge_name += f", rejected by {policy.name}"
    edge_ids = {p.id for p in edge}
    cid = config_id(cfg, policy_name, judge_name)
    done = {**records.load_done(kept_path), **records.load_done(dropped_path)} if distributed.is_main() else {}
    foreign = [i for i, r in done.items() if r.get("provenance", {}).get("config_id") != cid]
    if foreign:
        raise FeedbackError(f"{kept_path} holds pairs made with other settings (e.g. id {foreign[0]}); "
                            "use a new output file or the same settings as before")
    pending = set(distributed.from_main([it.id for it in items if it.id not in done]))
    todo = [it for it in items if it.id in pending]
    emit(Event(task, total=len(items), done=len(items) - len(todo)))
    meta = {"mode": cfg.mode, "policy": policy_name, "feedback": judge_name, "config_id": cid, "stage": STAGE,
            "sampling": {k: v for k, v in asdict(cfg.sampling()).items() if k != "seed"}, "seed": cfg.seed,
            "ensemble": cfg.ensemble, "clamp": [cfg.clamp_low, cfg.clamp_high]}
    if todo and cfg.mode == "logprob" and feedback is None:
        from mlx_cai import models

        spec, _, adapter = (cfg.judge or cfg.model).removeprefix("local:").partition("::")
        feedback = models.load(spec, adapter or None)
    scorer = {"logprob": lambda cs: score_logprob(cs, feedback, cfg),
              "judge": lambda cs: score_judge(cs, judge, cfg), "revision": lambda cs: None}[cfg.mode]

    def work(chunk: list) -> list[tuple[bool, dict]]:
        """(kept?, record) per prompt of a chunk."""
        nonlocal writer
        on_tokens = lambda n: emit(Event(task, tokens=n))  # noqa: E731
        rest = [it for it in chunk if it.id not in edge_ids]
        if cfg.mode != "revision" and rest:
            cands = sample_candidates(rest, policy, cfg, pool, on_tokens)
        elif cfg.revision_chosen != "revision" and rest:
            cands = policy_chosen(rest, policy, cfg, on_tokens)
        else:
            cands = rest
        early = {c.id: pre_filter(c, cfg) for c in cands}
        scorer([c for c in cands if early[c.id] is None])
        mine = [it for it in chunk if it.id in edge_ids]
        if mine:
            if writer is None and cfg.writer_is_feedback_model:
                writer = LocalBackend(writer_spec.removeprefix("local:"), batch_size=2 * cfg.batch_size,
                                      loaded=feedback)
            writer = writer or from_spec(writer_spec, batch_size=2 * cfg.batch_size)
            more, reasons = boundary_candidates(mine, writer, cfg, on_tokens,
                                                policy if cfg.boundary_rejected == "policy" else None, answers)
            cands += more
            early |= {c.id: reasons.get(c.id) or pre_filter(c, cfg) for c in more}
        out = []
        for c in cands:
            pair, reason = (None, early[c.id]) if early[c.id] else decide(c, cfg)
            out.append((pair is not None, _record(c, pair, reason, meta)))
        return out

    main = distributed.is_main()
    written = 0
    try:
        if todo and cfg.mode == "judge":
            judge.check()  # a judge that is down fails before any sampling
        with records.writer(kept_path, main) as kept_w, records.writer(dropped_path, main) as drop_w:
            for chunk, results in distributed.map_chunks(todo, cfg.batch_size, work):
                for kept, rec in results:
                    (kept_w if kept else drop_w).write(rec)
                written += len(chunk)
                emit(Event(task, advance=len(chunk)))
    except BackendError as e:  # nothing of the failed chunk is written: no failed call becomes a verdict
        raise BackendError(f"{e} -- stopped; {len(done) + written} prompts kept in {kept_path} and "
                           f"{dropped_path.name}, rerun the same command to continue") from None
    distributed.on_main(lambda: summarize(out_path))
    return kept_path
