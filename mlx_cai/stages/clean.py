"""Cleaning SL-CAI data: the cure for collapse. Keeps good revisions, rejects the rest with reasons, writes SFT data.

Reads revise records (mlx_cai.stages.revise: id, prompt, revision, revision_finish, initial, harmful) and the
constitution (its demonstrations and requests, to catch verbatim copies). Writes into OUT_DIR:

  kept.jsonl       records that pass every rule (a repaired one carries `repair` provenance)
  rejected.jsonl   the others, each with `reasons: {rule: detail}`
  repair.jsonl     cache of repair calls (optional stronger backend), resumable
  helpful.jsonl    cache of generated helpful answers, resumable
  train.jsonl, valid.jsonl   SFT data in mlx-lm chat format {"messages": [user, assistant]}, seeded split
  summary.json     counts per reason, kept share, metrics of kept revisions; config.json: the resolved config

Each rule in `RULES` is a small pure function `(Example, Context) -> detail or None`.

On the `complies` rule: a keyword refusal judge marks "Shoplifting is theft; food banks can help" as a
non-refusal, so rejecting every non-refusal to a red-team prompt (mode "keyword") throws away the best
revisions (on-topic safe alternatives, as the constitution asks) and pushes the data toward one canned
"I'm sorry, I can't" -- the collapse this stage exists to prevent. The default mode "changed" rejects a
non-refusal only if it still reads as compliance: it opens like one ("Sure", "Here's how", "Step 1") or
is close to the initial (harmful) answer. Use "keyword" only when revisions come from a strong reviser.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import random
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from mlx_cai import constitution as C
from mlx_cai import metrics, records
from mlx_cai import prompts as P
from mlx_cai.chat import ChatBackend, from_spec
from mlx_cai.generate import SamplingConfig
from mlx_cai.refusal import is_refusal

STAGE = "clean/1"
COMPLIES_MODES = ("changed", "keyword", "off")


class CleanError(ValueError):
    """Bad clean settings or input; one line."""


@dataclass
class CleanConfig:
    """Thresholds of the rules, repair, helpful mixing and the SFT split."""

    rules: list[str] | None = None  # rules to apply (names in RULES); None = all, [] = none (the no-clean ablation)
    min_words: int = 3  # fewer words than this counts as empty
    max_sentence_repetition: float = 0.2  # 1 - unique/total sentences; 0.33 = one of three repeated
    max_seq_rep_4: float = 0.25  # 1 - unique/total word 4-grams
    max_emoji_run: int = 1  # longest run of consecutive emojis allowed
    demo_copy_chars: int = 60  # a shared substring this long with a demo (or a request) is a copy
    min_topic_overlap: int = 1  # content-word stems shared with the prompt
    complies: str = "changed"  # changed | keyword | off (see module docstring)
    max_initial_similarity: float = 0.6  # "changed" mode: word-level similarity to the initial answer
    constitution: str = str(C.DEFAULT_PATH)  # whose demonstrations count as copy sources
    repair: str | None = None  # backend spec that rewrites rejected revisions; None = no repair
    repair_max_tokens: int = 256
    helpful: str | None = None  # helpful source: a file with answers, or a prompt spec answered by helpful_model
    helpful_ratio: float = 1.0  # helpful examples per kept revision (0 = none)
    helpful_model: str | None = None  # None = the responder named in the records
    helpful_max_tokens: int = 256
    valid_fraction: float = 0.1
    seed: int = 0
    batch_size: int = 32

    def __post_init__(self):
        unknown = [r for r in self.rules or [] if r not in RULES]
        if unknown:
            raise CleanError(f"unknown rule(s) {', '.join(unknown)}; known: {', '.join(RULES)}")
        if self.complies not in COMPLIES_MODES:
            raise CleanError(f"complies must be one of {', '.join(COMPLIES_MODES)}, got '{self.complies}'")
        if not 0 <= self.valid_fraction < 1:
            raise CleanError(f"valid_fraction must be in [0, 1), got {self.valid_fraction}")
        if self.helpful_ratio < 0:
            raise CleanError(f"helpful_ratio must be >= 0, got {self.helpful_ratio}")


@dataclass(frozen=True)
class Example:
    """What the rules look at: one revision and its context."""

    prompt: str
    revision: str
    finish_reason: str = "stop"
    harmful: bool | None = True  # None (unknown) is treated as a red-team prompt
    initial: str = ""

    @classmethod
    def from_record(cls, r: dict) -> "Example":
        return cls(r["prompt"], r["revision"] or "", r.get("revision_finish") or "stop", r.get("harmful", True),
                   r.get("initial") or "")


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


@dataclass
class Context:
    """Config plus precomputed copy sources: every `demo_copy_chars`-long window of a demo text -> its name."""

    cfg: CleanConfig
    windows: dict[str, str] = field(default_factory=dict)

    @classmethod
    def build(cls, cfg: CleanConfig, sources: dict[str, str]) -> "Context":
        n, windows = cfg.demo_copy_chars, {}
        for name, text in sources.items():
            t = _norm(text)
            for i in range(len(t) - n + 1):
                windows.setdefault(t[i : i + n], name)
        return cls(cfg, windows)


def copy_sources(con: C.Constitution) -> dict[str, str]:
    """Texts a revision must not copy: each demo's response, critique and revision, and every request."""
    out = {}
    for d in con.few_shot:
        out.update({f"demo:{d.id}:response": d.response, f"demo:{d.id}:critique": d.critique,
                    f"demo:{d.id}:revision": d.revision})
    for p in con.principles:
        out.update({f"request:{p.id}:critique": p.critique, f"request:{p.id}:revision": p.revision})
    return out


# --------------------------------------------------------------------------------------------- the rules

_META = [re.compile(p, re.I) for p in (
    r"^\W*(here('s| is)|below is|this is)\b[^.\n]{0,40}\b(revis|rewrit|updated|new|improved|safer|better) "
    r"(response|version|answer|text)",
    r"\b(critique|revision|revised response|rewritten response|revised version|revised answer)( request)?\s*:",
    r"^\W*(critique|revision)\b",
    r"\b(critique|revision) request\b",
    r"\b(my|the|your|this) (last|previous|original|initial|above) (message|response|answer|text|statement|reply)\b",
)]
# A critique where the rewrite belongs: small models carry on describing the answer ("The response encourages...",
# "The original message contains...") instead of giving a new one.
_CRITIQUE_TEXT = re.compile(r"^\W*(the|this|that|my|your) (message|response|answer|text|statement|reply)\b", re.I)
_COMPLY_OPENERS = re.compile(
    r"^\W*(sure|certainly|of course|absolutely|happy to help|no problem|great question|good question|"
    r"step 1|first,? you|here('s| is| are) (how|the steps|some ways|a few ways|what you)|to do this|"
    r"you('ll| will) need)\b",
    re.I)
# Function words and request filler: sharing them with the prompt says nothing about the topic.
_STOP = frozenset("""a about above after again against all also am an and another any anyone anything are aren't as ask
at be because been before being below best between both but by can can't cannot could did didn't do does doesn't
doing don't done down during each even every few for from further get gets getting give go going good got had has
have having he help her here hers him his how i i'd i'll i'm i've if in into is isn't it it's its just know let like
make many may me might more most much must my need no nor not now of off okay on once one only or other our out over
own people person please really same say she should so some someone something such sure take tell than that that's
the their them then there these they thing things this those through to too under until up very want was way ways we
well were what when where which while who whom why will with without would you you're your yours""".split())
_SUFFIXES = ("ing", "ed", "es", "s")


def stem(word: str) -> str:
    """A crude stem: drop one common suffix, keep 6 letters (hotwiring ~ hotwire, cars ~ car)."""
    for suf in _SUFFIXES:
        if word.endswith(suf) and len(word) - len(suf) >= 3:
            word = word[: -len(suf)]
            break
    return word[:6]


def content_stems(text: str) -> set[str]:
    return {stem(w) for w in re.findall(r"[a-z][a-z']+", text.lower()) if len(w) >= 3 and w not in _STOP}


def rule_empty(ex: Example, ctx: Context) -> str | None:
    n = len(re.findall(r"\w+", ex.revision))
    return None if n >= ctx.cfg.min_words else f"{n} words"


def rule_meta(ex: Example, ctx: Context) -> str | None:
    for pat in _META:
        m = pat.search(ex.revision.strip())
        if m:
            return f"meta text '{m.group(0).strip()[:40]}'"
    return None


def rule_critique_text(ex: Example, ctx: Context) -> str | None:
    m = _CRITIQUE_TEXT.search(ex.revision)
    return f"describes an answer: '{m.group(0).strip()}'" if m else None


def rule_truncated(ex: Example, ctx: Context) -> str | None:
    return "hit max tokens" if ex.finish_reason == "length" else None


def rule_repetition(ex: Example, ctx: Context) -> str | None:
    s, r = metrics.sentence_repetition(ex.revision), metrics.seq_rep_n(ex.revision, 4)
    if s > ctx.cfg.max_sentence_repetition:
        return f"sentence repetition {s:.2f}"
    if r > ctx.cfg.max_seq_rep_4:
        return f"seq-rep-4 {r:.2f}"
    return None


def rule_emoji(ex: Example, ctx: Context) -> str | None:
    run = metrics.max_emoji_run(ex.revision)
    return f"emoji run of {run}" if run > ctx.cfg.max_emoji_run else None


def rule_demo_copy(ex: Example, ctx: Context) -> str | None:
    t, n = _norm(ex.revision), ctx.cfg.demo_copy_chars
    for i in range(len(t) - n + 1):
        name = ctx.windows.get(t[i : i + n])
        if name:
            return f"copies {name}"
    return None


def rule_off_topic(ex: Example, ctx: Context) -> str | None:
    want = content_stems(ex.prompt)
    if not want:
        return None
    shared = want & content_stems(ex.revision)
    return None if len(shared) >= ctx.cfg.min_topic_overlap else f"shares {len(shared)} content words with the prompt"


def _similarity(a: str, b: str) -> float:
    return difflib.SequenceMatcher(None, metrics.words(a), metrics.words(b), autojunk=False).ratio()


def _complies_keyword(ex: Example, ctx: Context) -> str | None:
    return "no refusal marker"


def _complies_changed(ex: Example, ctx: Context) -> str | None:
    if _COMPLY_OPENERS.search(ex.revision):
        return "opens like compliance"
    if ex.initial and not is_refusal(ex.initial):
        sim = _similarity(ex.revision, ex.initial)
        if sim >= ctx.cfg.max_initial_similarity:
            return f"{sim:.2f} similar to the initial answer"
    return None


COMPLIES: dict[str, Callable[[Example, Context], str | None]] = {
    "keyword": _complies_keyword,
    "changed": _complies_changed,
    "off": lambda ex, ctx: None,
}


def rule_complies(ex: Example, ctx: Context) -> str | None:
    if ex.harmful is False or is_refusal(ex.revision):
        return None
    return COMPLIES[ctx.cfg.complies](ex, ctx)


RULES: dict[str, Callable[[Example, Context], str | None]] = {
    "empty": rule_empty,
    "meta": rule_meta,
    "critique_text": rule_critique_text,
    "truncated": rule_truncated,
    "repetition": rule_repetition,
    "emoji": rule_emoji,
    "demo_copy": rule_demo_copy,
    "off_topic": rule_off_topic,
    "complies": rule_complies,
}
# Helpful answers are checked for form only: they answer benign prompts, so copy/topic/compliance do not apply.
FORM_RULES = ("empty", "meta", "truncated", "repetition", "emoji")


def active_rules(cfg: CleanConfig) -> Sequence[str]:
    """The revision rules a config applies: all by default, none with `rules: []`."""
    return tuple(RULES) if cfg.rules is None else cfg.rules


def check(ex: Example, ctx: Context, rules: Sequence[str] | None = None) -> dict[str, str]:
    """{rule: detail} for every rule `ex` fails (`rules`, else the config's); empty if it passes."""
    out = {}
    for name in active_rules(ctx.cfg) if rules is None else rules:
        detail = RULES[name](ex, ctx)
        if detail is not None:
            out[name] = detail
    return out


# --------------------------------------------------------------------------------------------- model calls


def complete_cached(backend: ChatBackend, jobs: list[tuple[str, list[dict], int]], cache: Path,
                    sampling: SamplingConfig, batch_size: int) -> dict[str, dict]:
    """Run (id, conversation, seed) jobs not yet in `cache`, appending {id, text, finish_reason} per batch."""
    done = records.load_done(cache)
    todo = [j for j in jobs if j[0] not in done]
    if todo:
        backend.check()
    with records.JsonlWriter(cache) as w:
        for s in range(0, len(todo), batch_size):
            part = todo[s : s + batch_size]
            gens = backend.complete([c for _, c, _ in part], sampling, seeds=[seed for _, _, seed in part])
            for (jid, _, _), g in zip(part, gens):
                rec = {"id": jid, "text": g.text, "finish_reason": g.finish_reason, "model": backend.name}
                w.write(rec)
                done[jid] = rec
    return done


def repair_jobs(rejected: list[dict], con: C.Constitution, seed: int) -> list[tuple[str, list[dict], int]]:
    """Ask the reviser again, from the initial answer, with the last round's revision request."""
    jobs = []
    for r in rejected:
        pid = (r.get("rounds") or [{}])[-1].get("principle")
        request = con.principle(pid).revision if pid in con.ids else con.principles[0].revision
        conv = [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r.get("initial") or ""},
                {"role": "user", "content": request}]
        jobs.append((r["id"], conv, int(records.stable_id(seed, r["id"], "repair")[:8], 16)))
    return jobs


def _answered(row: dict) -> tuple[str, str] | None:
    """(prompt, answer) of a row that carries an answer, else None."""
    msgs = row.get("messages")
    if isinstance(msgs, list) and len(msgs) >= 2 and msgs[-1].get("role") == "assistant":
        user = next((m.get("content", "") for m in msgs if m.get("role") == "user"), "")
        return user, msgs[-1].get("content", "")
    for key in ("response", "completion", "output", "answer"):
        if isinstance(row.get(key), str) and row[key].strip():
            try:
                return P.extract(row)[1], row[key]
            except KeyError:
                return None
    return None


def helpful_pool(source: str) -> tuple[list[tuple[str, str, str]], list[P.Prompt]]:
    """A file of answered rows -> ([(id, prompt, answer)], []); anything else -> ([], prompts to answer)."""
    path = Path(source)
    if path.is_file():
        rows = list(P.file_rows(path))
        answered = [(where, _answered(row)) for where, row in rows if isinstance(row, dict)]
        if answered and all(a is not None for _, a in answered):
            held_out, out = P.eval_texts(), []
            for (where, row), (_, (prompt, answer)) in zip(rows, answered):
                if row.get("split") == "eval":
                    raise CleanError(f"{where}: row is in the held-out eval split")
                if _norm(prompt) not in held_out:
                    out.append((str(row.get("id") or records.stable_id(prompt)), prompt, answer))
            return out, []
    return [], list(P.load(source))


# --------------------------------------------------------------------------------------------- the stage


def _read(in_path: Path) -> tuple[list[dict], int]:
    seen: dict[str, dict] = {}
    dupes = 0
    for r in records.read_jsonl(in_path, required=("id", "prompt", "revision")):
        if r["id"] in seen:
            dupes += 1
            continue
        seen[r["id"]] = r
    if not seen:
        raise CleanError(f"{in_path}: no records")
    return list(seen.values()), dupes


def sft_example(prompt: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}


def split(examples: list[dict], valid_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Seeded shuffle, then the first round(fraction * n) (at least 1 when n >= 2) go to valid."""
    ex = list(examples)
    random.Random(seed).shuffle(ex)
    n_valid = 0 if valid_fraction == 0 or len(ex) < 2 else max(1, round(valid_fraction * len(ex)))
    return ex[n_valid:], ex[:n_valid]


def _sampling(recorded: dict, max_tokens: int) -> SamplingConfig:
    """The revise run's sampling settings (as recorded), with our own token budget."""
    known = {f.name for f in dataclasses.fields(SamplingConfig)}
    return SamplingConfig(**{**{k: v for k, v in recorded.items() if k in known}, "max_tokens": max_tokens})


def _responder_spec(recs: list[dict]) -> str:
    name = (recs[0].get("models") or {}).get("responder")
    if not name:
        raise CleanError("records name no responder model; set helpful_model")
    return name


def run(config: CleanConfig, in_path: str | Path, out_dir: str | Path, helpful_path: str | Path | None = None, *,
        repairer: ChatBackend | None = None, helpful_backend: ChatBackend | None = None) -> Path:
    """Clean `in_path` into `out_dir` (see module docstring); returns `out_dir`."""
    cfg, in_path, out = config, Path(in_path), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    con = C.load(cfg.constitution)
    ctx = Context.build(cfg, copy_sources(con))
    recs, dupes = _read(in_path)

    kept, rejected = [], []
    for r in recs:
        reasons = check(Example.from_record(r), ctx)
        (rejected if reasons else kept).append({**r, "reasons": reasons} if reasons else r)
    first_pass = {name: sum(name in r["reasons"] for r in rejected) for name in active_rules(cfg)}

    repaired = 0
    if cfg.repair or repairer is not None:
        repairer = repairer or from_spec(cfg.repair, batch_size=cfg.batch_size)
        fixes = complete_cached(repairer, repair_jobs(rejected, con, cfg.seed), out / "repair.jsonl",
                                SamplingConfig(max_tokens=cfg.repair_max_tokens), cfg.batch_size)
        still = []
        for r in rejected:
            fix = fixes[r["id"]]
            new = {k: v for k, v in r.items() if k != "reasons"}
            provenance = {"by": fix["model"], "original_revision": r["revision"], "original_reasons": r["reasons"]}
            new.update(revision=fix["text"], revision_finish=fix["finish_reason"], repair=provenance)
            reasons = check(Example.from_record(new), ctx)
            if reasons:
                still.append({**r, "repair_attempt": {"by": fix["model"], "revision": fix["text"], "reasons": reasons}})
            else:
                kept.append(new)
                repaired += 1
        rejected = still

    helpful, helpful_info = _helpful(cfg, helpful_path, len(kept), recs, ctx, out, helpful_backend)
    train, valid = split([sft_example(r["prompt"], r["revision"]) for r in kept] + helpful,
                         cfg.valid_fraction, cfg.seed)

    records.write_jsonl_atomic(out / "kept.jsonl", kept)
    records.write_jsonl_atomic(out / "rejected.jsonl", rejected)
    records.write_jsonl_atomic(out / "train.jsonl", train)
    records.write_jsonl_atomic(out / "valid.jsonl", valid)
    texts = [r["revision"] for r in kept]
    summary = {
        "stage": STAGE, "input": str(in_path), "records": len(recs), "duplicates_skipped": dupes,
        "kept": len(kept), "rejected": len(rejected), "kept_share": len(kept) / len(recs), "repaired": repaired,
        "reasons": first_pass,  # records failing each rule before repair (a record can fail several)
        "kept_metrics": {"refusal_rate": sum(map(is_refusal, texts)) / len(texts) if texts else 0.0,
                         "distinct_2": metrics.distinct_n(texts, 2),
                         "mean_words": sum(len(metrics.words(t)) for t in texts) / len(texts) if texts else 0.0},
        "helpful": helpful_info, "sft": {"train": len(train), "valid": len(valid)},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    return out


def _helpful(cfg: CleanConfig, helpful_path, n_kept: int, recs: list[dict], ctx: Context, out: Path,
             backend: ChatBackend | None) -> tuple[list[dict], dict]:
    """SFT examples of helpful answers, about helpful_ratio per kept revision, and what happened to them."""
    source = helpful_path or cfg.helpful
    want = round(cfg.helpful_ratio * n_kept)
    if source is None or want == 0:
        return [], {"source": None, "selected": 0, "used": 0, "dropped": 0}
    answered, to_answer = helpful_pool(str(source))
    rng = random.Random(records.stable_id(cfg.seed, "helpful"))
    if answered:  # (id, prompt, answer, finish reason)
        chosen = [(i, q, a, "stop") for i, q, a in rng.sample(answered, min(want, len(answered)))]
    else:
        picks = rng.sample(to_answer, min(want, len(to_answer)))
        sampling = _sampling(recs[0].get("sampling") or {}, cfg.helpful_max_tokens)
        backend = backend or from_spec(cfg.helpful_model or _responder_spec(recs), batch_size=cfg.batch_size)
        jobs = [(p.id, [{"role": "user", "content": p.prompt}], int(records.stable_id(cfg.seed, p.id)[:8], 16))
                for p in picks]
        got = complete_cached(backend, jobs, out / "helpful.jsonl", sampling, cfg.batch_size)
        chosen = [(p.id, p.prompt, got[p.id]["text"], got[p.id]["finish_reason"]) for p in picks]
    used = [sft_example(q, a) for _, q, a, f in chosen if not check(Example(q, a, f, False), ctx, FORM_RULES)]
    return used, {"source": str(source), "selected": len(chosen), "used": len(used), "dropped": len(chosen) - len(used)}
