"""RL-AIF preference pairs: two samples per prompt from the SFT model, labelled by AI feedback.

Modes (`SCORERS`, plus `revision`):

- logprob: a *local* feedback model is asked a multiple-choice question ("which response is less
  harmful ... (A) or (B)?") under K comparison principles sampled per prompt; the normalized probability
  of the "(A)" vs "(B)" answer is read from its next-token logits, in both orders, and averaged
  (Bai et al. 2022, section 4.1). The score is clamped to [clamp_low, clamp_high] (a soft label).
- judge: an OpenAI-compatible judge (GPT-4o as in the seed paper, or mlx_lm.server / vLLM) answers the
  same question in both orders with a short rationale and a verdict [[A]] or [[B]]; rationales are kept.
  Orders that disagree (position bias) give 0.5: a tie.
- revision: no sampling and no judge: chosen = the final revision, rejected = the initial answer, from
  `mlx-cai revise` records (the Hugging Face recipe).

Before scoring, near-identical pairs and pairs where both responses are degenerate (empty or repetitive)
are dropped; after scoring, ties and pairs whose chosen answer is degenerate. Each drop is counted.

Reads PROMPTS (an mlx_cai.prompts spec; for `revision`, a revise JSONL). Writes, appending per chunk:
  OUT.jsonl              kept pairs: {id, prompt, chosen, rejected, score, score_raw, mode, votes,
                         responses: [{text, finish_reason, seed}], chosen_index, provenance}  (TRL reads it)
  OUT.dropped.jsonl      dropped prompts with `reason`
  OUT.summary.json       counts per reason and the kept share
Resume: ids in either file are skipped; records carry `config_id` and other settings are refused.
With several processes (mlx.launch), each handles its share of a chunk of `batch_size` x processes prompts
and rank 0 appends the chunk's records (mlx_cai.distributed.map_chunks).
"""

from __future__ import annotations

import difflib
import json
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

from mlx_cai import backend  # noqa: F401

import mlx.core as mx

from mlx_cai import distributed as D
from mlx_cai import metrics, records
from mlx_cai import prompts as P
from mlx_cai.chat import ChatBackend, LocalBackend, from_spec
from mlx_cai.generate import SamplingConfig

STAGE = "feedback/1"
MODES = ("logprob", "judge", "revision")
Progress = Callable[[int, int], None]  # (prompts finished, tokens generated) since the last call

# Comparison principles for the feedback model, written for mlx-cai (the idea, one question per principle
# sampled per prompt, follows Bai et al. 2022). Each asks for the *less harmful* answer, and several also guard
# against the opposite failure (lecturing, needless refusal), so the preference does not reward preachiness.
PRINCIPLES: tuple[str, ...] = (
    "Which reply would a careful, kind and level-headed person be more comfortable sending? Pick the one that "
    "does less harm.",
    "Pick the reply that gives the user less help with anything dangerous, illegal or cruel, such as violence, "
    "fraud, harassment or hateful content.",
    "Both replies may have problems. Pick the one that is safer, but do not reward a reply only for lecturing "
    "the user or sounding alarmed.",
    "Pick the reply that stays safe while still being useful, calm and respectful, rather than cold, scolding "
    "or suspicious of the user.",
    "Which reply treats people more fairly and decently, without slurs, stereotypes, or content that could "
    "hurt someone's body, finances or reputation?",
    "Which reply would cause less damage if the user acted on it exactly as written? Pick that one.",
    "Pick the reply that declines the unsafe part of the request plainly and briefly, and offers a safe way to "
    "meet the underlying need if there is one.",
    "Which reply makes it harder for someone to commit a crime or injure a person, while helping as much as "
    "it safely can?",
)
ANSWER_PREFIX = "The answer is: "
OPTIONS = ("(A)", "(B)")
JUDGE_INSTRUCTION = ("First explain your reasoning in two or three sentences, then give your verdict on the last "
                     "line as [[A]] or [[B]].")
_VERDICT = re.compile(r"\[\[\s*([AB])\s*\]\]")


class FeedbackError(ValueError):
    """Bad feedback settings or input; one line."""


@dataclass
class FeedbackConfig:
    """Settings of one feedback run; records carry them (and `config_id`)."""

    mode: str = "logprob"  # logprob | judge | revision
    model: str = "smollm2-135m"  # policy that samples the two responses (the SFT base)
    adapter: str | None = None  # the SFT adapter of the policy
    judge: str | None = None  # logprob: local model spec (default: `model`, no adapter); judge: backend spec
    principles: str | None = None  # file with comparison principles (YAML list or one per line); None = built-in
    ensemble: int | None = None  # principles per prompt: default 4 (logprob), 1 (judge: 2 calls each)
    temperature: float = 0.8  # sampling of the two responses
    top_p: float = 0.95
    repetition_penalty: float = 1.2  # keeps SmolLM2-135M from looping (REFERENCE.md section 2)
    max_tokens: int = 256
    judge_max_tokens: int = 384
    seed: int = 0  # drives sampling seeds and principle choice, per prompt id
    clamp_low: float = 0.05  # soft-label clamp of the score (the paper clamped CoT labels to 0.4-0.6)
    clamp_high: float = 0.95
    min_margin: float = 0.05  # |p - 0.5| below this is a tie
    max_similarity: float = 0.9  # word-level similarity at or above which a pair is near-identical
    max_repetition: float = 0.5  # seq-rep-4 or sentence repetition above this is degenerate
    limit: int | None = None  # only the first N prompts
    batch_size: int = 16  # prompts per chunk (records are appended per chunk)

    def __post_init__(self):
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


def row_seed(*parts) -> int:
    return int(records.stable_id(*parts)[:8], 16)


def choose_principles(pool: Sequence[str], k: int, seed: int, pid: str) -> tuple[str, ...]:
    rng = random.Random(row_seed(seed, pid, "principles"))
    return tuple(rng.sample(list(pool), k) if k <= len(pool) else [rng.choice(pool) for _ in range(k)])


def question(prompt: str, principle: str, first: str, second: str) -> str:
    return (f"Consider the following conversation between a human and an assistant:\n\nHuman: {prompt}\n\n"
            f"{principle}\n\nOptions:\n{OPTIONS[0]} {first}\n\n{OPTIONS[1]} {second}")


def _render(tokenizer, text: str) -> str:
    msgs = [{"role": "user", "content": text + "\n\nAnswer with (A) or (B)."}]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False) + ANSWER_PREFIX
    return msgs[0]["content"] + "\n\n" + ANSWER_PREFIX


def choice_tokens(tokenizer, context: str) -> tuple[list[int], int, int]:
    """Ids of `context` up to where "(A)" and "(B)" first differ, and the two differing token ids."""
    a = tokenizer.encode(context + OPTIONS[0], add_special_tokens=False)
    b = tokenizer.encode(context + OPTIONS[1], add_special_tokens=False)
    n = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    return a[:n], a[n], b[n]


def option_probs(model, tokenizer, contexts: list[str], batch_size: int = 8) -> list[float]:
    """P("(A)") / (P("(A)") + P("(B)")) after each context, from next-token logits (left-padded batches;
    only the last position's logits are computed)."""
    from mlx_cai.generate import GenericRunner

    items = [choice_tokens(tokenizer, c) for c in contexts]
    out: list[float] = [0.0] * len(items)
    order = sorted(range(len(items)), key=lambda i: -len(items[i][0]))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        L = max(len(items[i][0]) for i in idx)
        pad = [L - len(items[i][0]) for i in idx]
        tokens = mx.array([[0] * k + items[i][0] for k, i in zip(pad, idx)])
        logits = GenericRunner(model, tokens, pad).prefill().astype(mx.float32)
        a = mx.array([items[i][1] for i in idx])[:, None]
        b = mx.array([items[i][2] for i in idx])[:, None]
        diff = mx.take_along_axis(logits, a, axis=-1) - mx.take_along_axis(logits, b, axis=-1)
        for i, p in zip(idx, mx.sigmoid(diff[:, 0]).tolist()):
            out[i] = p
    return out


def score_logprob(cands: list[Candidate], feedback, cfg: FeedbackConfig) -> None:
    """Set p_first and votes: per principle, P(first better) in order (first, second) and in (second, first)."""
    model, tokenizer = feedback
    contexts = []
    for c in cands:
        for pr in c.principles:
            contexts.append(_render(tokenizer, question(c.prompt, pr, c.texts[0], c.texts[1])))
            contexts.append(_render(tokenizer, question(c.prompt, pr, c.texts[1], c.texts[0])))
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
                text = question(c.prompt, pr, first, second) + "\n\n" + JUDGE_INSTRUCTION
                convs.append([{"role": "user", "content": text}])
                where.append((ci, pr, swapped))
    judge_cfg = SamplingConfig(max_tokens=cfg.judge_max_tokens, temperature=0.0, seed=cfg.seed)
    gens = judge.complete(convs, judge_cfg, seeds=[cfg.seed] * len(convs))
    votes: list[list[dict]] = [[] for _ in cands]
    for (ci, pr, swapped), g in zip(where, gens):
        found = _VERDICT.findall(g.text)
        verdict = found[-1] if found else None
        first_wins = None if verdict is None else (verdict == "A") != swapped
        votes[ci].append({"order": "swapped" if swapped else "first", "verdict": verdict,
                          "first_wins": first_wins, "rationale": g.text})
    for c, v in zip(cands, votes):
        parsed = [x["first_wins"] for x in v if x["first_wins"] is not None]
        c.votes = tuple(v)
        c.p_first = sum(parsed) / len(parsed) if parsed else None


SCORERS: dict[str, Callable] = {"logprob": score_logprob, "judge": score_judge}


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
    keep = {k: v for k, v in asdict(cfg).items() if k not in ("limit", "batch_size", "model", "adapter", "judge")}
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


def sample_candidates(prompts: list[P.Prompt], policy: ChatBackend, cfg: FeedbackConfig, pool: Sequence[str],
                      on_tokens: Callable[[int], None]) -> list[Candidate]:
    """Two samples per prompt, each with its own seed from (seed, prompt id)."""
    convs, seeds = [], []
    for p in prompts:
        for tag in ("a", "b"):
            convs.append([{"role": "user", "content": p.prompt}])
            seeds.append(row_seed(cfg.seed, p.id, tag))
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
    kept = len(records.load_done(kept_path))
    reasons: dict[str, int] = {}
    for r in records.load_done(dropped_path).values():
        reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
    total = kept + sum(reasons.values())
    summary = {"prompts": total, "kept": kept, "kept_share": round(kept / total, 4) if total else 0.0,
               "dropped": dict(sorted(reasons.items())),
               "dropped_share": {k: round(v / total, 4) for k, v in sorted(reasons.items())} if total else {}}
    summary_path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def run(config: FeedbackConfig, prompts: str | Path | Sequence[P.Prompt], out_path: str | Path,
        progress: Progress | None = None, *, policy: ChatBackend | None = None, feedback=None,
        judge: ChatBackend | None = None) -> dict:
    """Write preference pairs for every prompt not yet in the outputs; returns the summary.

    `policy` (a ChatBackend), `feedback` ((model, tokenizer) for logprob) and `judge` (a ChatBackend)
    override what the config names (tests pass tiny models or a loopback server).
    """
    cfg = config
    kept_path, dropped_path, _ = paths(out_path)
    tick = progress or (lambda items, tokens: None)
    pool = load_principles(cfg.principles)
    if cfg.mode == "revision":
        items: list = revision_candidates(prompts, cfg.limit)
        policy_name, judge_name = "revise records", "none"
    else:
        items = list(prompts)[: cfg.limit] if not isinstance(prompts, (str, Path)) else \
            list(P.load(prompts, limit=cfg.limit))
        policy = policy or LocalBackend(cfg.model, cfg.adapter, batch_size=2 * cfg.batch_size)
        policy_name = policy.name
        if cfg.mode == "judge":
            judge = judge or from_spec(cfg.judge)
            judge_name = judge.name
        else:
            judge_name = f"local:{cfg.judge or cfg.model}"
    cid = config_id(cfg, policy_name, judge_name)
    done = {**records.load_done(kept_path), **records.load_done(dropped_path)} if D.is_main() else {}
    foreign = [i for i, r in done.items() if r.get("provenance", {}).get("config_id") != cid]
    if foreign:
        raise FeedbackError(f"{kept_path} holds pairs made with other settings (e.g. id {foreign[0]}); "
                            "use a new output file or the same settings as before")
    pending = set(D.from_main([it.id for it in items if it.id not in done]))
    todo = [it for it in items if it.id in pending]
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
        cands = chunk if cfg.mode == "revision" else \
            sample_candidates(chunk, policy, cfg, pool, on_tokens=lambda n: tick(0, n))
        early = {c.id: pre_filter(c, cfg) for c in cands}
        scorer([c for c in cands if early[c.id] is None])
        out = []
        for c in cands:
            pair, reason = (None, early[c.id]) if early[c.id] else decide(c, cfg)
            out.append((pair is not None, _record(c, pair, reason, meta)))
        return out

    main = D.is_main()
    with records.writer(kept_path, main) as kept_w, records.writer(dropped_path, main) as drop_w:
        for chunk, results in D.map_chunks(todo, cfg.batch_size, work):
            for kept, rec in results:
                (kept_w if kept else drop_w).write(rec)
            tick(len(chunk), 0)
    return D.on_main(lambda: summarize(out_path))
