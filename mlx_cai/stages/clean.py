"""Cleaning SL-CAI data: the cure for collapse. Keeps good revisions, rejects the rest with reasons, writes SFT data.

Reads revise records (mlx_cai.stages.revise: id, prompt, revision, revision_finish, initial, harmful) and the
constitution (its demonstrations and requests, to catch verbatim copies). Writes into OUT_DIR:

  kept.jsonl       records that pass every rule (a repaired one carries `repair` provenance)
  rejected.jsonl   the others, each with `reasons: {rule: detail}`
  repair.jsonl     cache of repair calls (optional stronger backend), resumable
  helpful.jsonl    cache of generated helpful answers, resumable (a comma-joined `helpful` spec is sampled in
                   equal shares of each source; an answer cut at max tokens is ended at its last full sentence)
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
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from mlx_cai import constitution
from mlx_cai import memplan, metrics, records
from mlx_cai import prompts as prompt_sources
from mlx_cai.chat import ChatBackend, from_spec
from mlx_cai.sampling import SamplingConfig
from mlx_cai.config import opt
from mlx_cai.progress import Event, Progress, emitter
from mlx_cai.cleaning import (FORM_RULES, RULES, Context, Example, active_rules, cap_openings, check, copy_sources,
                              end_cut, normalize, opening, stratified_sample)
from mlx_cai.refusal import is_refusal

STAGE = "clean/1"
COMPLIES_MODES = ("changed", "keyword", "off")


class CleanError(ValueError):
    """Bad clean settings or input; one line."""


@dataclass
class CleanConfig:
    """Thresholds of the rules, repair, helpful mixing and the SFT split."""

    input: str = opt("", "revise output (JSONL)")
    output: str = opt("", "output folder")
    rules: list[str] | None = opt(None, "comma-separated rules to apply (names in RULES); none = all, "
                                        "'none' = no rule (keeps every revision: the no-clean ablation)")
    min_words: int = opt(3, "fewer words than this counts as empty")
    max_sentence_repetition: float = opt(0.2, "1 - unique/total sentences; 0.33 = one of three repeated")
    max_seq_rep_4: float = opt(0.25, "1 - unique/total word 4-grams")
    max_emoji_run: int = opt(1, "longest run of consecutive emojis allowed")
    demo_copy_chars: int = opt(60, "shared characters with a demo (or a request) that count as a copy")
    min_topic_overlap: int = opt(1, "content-word stems shared with the prompt")
    max_same_opening: int | None = opt(None, "keep at most N kept revisions with the same first five words "
                                             "(the rest rejected as stock_opening); none = no cap")
    complies: str = opt("changed", "changed | keyword | off: how to judge a revision that still complies "
                                   "(see the module docstring)")
    max_initial_similarity: float = opt(0.6, "'changed' mode: word-level similarity to the initial answer")
    constitution: str = opt(str(constitution.DEFAULT_PATH), "whose demonstrations count as copy sources")
    repair: str | None = opt(None, "backend spec that rewrites rejected revisions; none = no repair")
    repair_max_tokens: int = opt(256, "new tokens per repair")
    helpful: str | None = opt(None, "helpful examples: a file with answers, or prompts the responder answers "
                                    "(train:benign, a file, hf:...); none or 'none' = no helpful mixing")
    helpful_ratio: float = opt(1.0, "helpful examples per kept revision (0 = none)")
    helpful_model: str | None = opt(None, "answers helpful prompts; none = the responder named in the records")
    helpful_max_tokens: int = opt(256, "new tokens per helpful answer")
    helpful_trim: bool = opt(True, "end a helpful answer cut at max tokens at its last full sentence instead of "
                                   "dropping it (dropped still when that keeps under half of it)")
    helpful_system: str | None = opt(None, "a system turn for writing the helpful answers (e.g. 'Answer in at "
                                           "most 100 words.'); the SFT examples keep the bare prompt")
    valid_fraction: float = opt(0.1, "share of the SFT data held out for validation")
    seed: int = opt(0, "drives the helpful sample, repairs and the split")
    batch_size: int = opt(32, "prompts per batched model call")
    push_to_hub: str | None = opt(None, "push the SFT data to this dataset repo (token in $HF_TOKEN)")
    private: bool = opt(False, "make the pushed dataset private")

    def __post_init__(self):
        if isinstance(self.rules, str):  # the command line's comma-separated form
            self.rules = [] if self.rules.strip().lower() == "none" else [r.strip() for r in self.rules.split(",")]
        if isinstance(self.helpful, str) and self.helpful.strip().lower() == "none":
            self.helpful = None
        unknown = [r for r in self.rules or [] if r not in RULES]
        if unknown:
            raise CleanError(f"unknown rule(s) {', '.join(unknown)}; known: {', '.join(RULES)}")
        if self.complies not in COMPLIES_MODES:
            raise CleanError(f"complies must be one of {', '.join(COMPLIES_MODES)}, got '{self.complies}'")
        if not 0 <= self.valid_fraction < 1:
            raise CleanError(f"valid_fraction must be in [0, 1), got {self.valid_fraction}")
        if self.max_same_opening is not None and self.max_same_opening < 1:
            raise CleanError(f"max_same_opening must be >= 1 (or none), got {self.max_same_opening}")
        if self.helpful_ratio < 0:
            raise CleanError(f"helpful_ratio must be >= 0, got {self.helpful_ratio}")

    def memory(self, ctx: memplan.Context) -> memplan.Estimate | None:
        """Peak memory when a local model writes helpful answers (helpful_model, else the run's responder;
        an answered helpful file needs none) and a local repair model is held beside it."""
        writer = (self.helpful_model or ctx.model) if self.helpful and self.helpful_ratio > 0 else None
        return memplan.generation(ctx, writer or self.repair, {"repair": self.repair}, batch=self.batch_size,
                                  prompt=memplan.PROMPT_TOKENS,
                                  new_tokens=max(self.helpful_max_tokens, self.repair_max_tokens),
                                  knobs={"batch_size": self.batch_size, "helpful_max_tokens": self.helpful_max_tokens})


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


def repair_jobs(rejected: list[dict], con: constitution.Constitution, seed: int) -> list[tuple[str, list[dict], int]]:
    """Ask the reviser again, from the initial answer, with the last round's revision request."""
    jobs = []
    for r in rejected:
        pid = (r.get("rounds") or [{}])[-1].get("principle")
        request = con.principle(pid).revision if pid in con.ids else con.principles[0].revision
        conv = [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r.get("initial") or ""},
                {"role": "user", "content": request}]
        jobs.append((r["id"], conv, records.row_seed(seed, r["id"], "repair")))
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
                return prompt_sources.extract(row)[1], row[key]
            except KeyError:
                return None
    return None


def helpful_pool(source: str) -> tuple[list[tuple[str, str, str]], list[prompt_sources.Prompt]]:
    """A file of answered rows -> ([(id, prompt, answer)], []); anything else -> ([], prompts to answer)."""
    path = Path(source)
    if path.is_file():
        rows = list(prompt_sources.file_rows(path))
        answered = [(where, _answered(row)) for where, row in rows if isinstance(row, dict)]
        if answered and all(a is not None for _, a in answered):
            held_out, out = prompt_sources.eval_texts(), []
            for (where, row), (_, (prompt, answer)) in zip(rows, answered):
                if row.get("split") == "eval":
                    raise CleanError(f"{where}: row is in the held-out eval split")
                if normalize(prompt) not in held_out:
                    out.append((str(row.get("id") or records.stable_id(prompt)), prompt, answer))
            return out, []
    return [], list(prompt_sources.load(source))


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


def run(config: CleanConfig, progress: Progress | None = None, *, repairer: ChatBackend | None = None,
        helpful_backend: ChatBackend | None = None) -> Path:
    """Clean config.input into the folder config.output (see module docstring); returns the folder."""
    cfg = config
    if not cfg.input or not cfg.output:
        raise CleanError("clean needs an input file (revise records) and an output folder (-o DIR)")
    in_path, out = Path(cfg.input), Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    con = constitution.load(cfg.constitution)
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

    over = set(cap_openings([r["revision"] for r in kept], cfg.max_same_opening))  # a set rule, after repair
    for i in sorted(over):
        rejected.append({**kept[i], "reasons": {"stock_opening": f"opens like {cfg.max_same_opening} kept ones: "
                                                                 f"'{opening(kept[i]['revision'])}'"}})
    kept = [r for i, r in enumerate(kept) if i not in over]
    if cfg.max_same_opening is not None:
        first_pass["stock_opening"] = len(over)

    helpful, helpful_info = _helpful(cfg, len(kept), recs, ctx, out, helpful_backend)
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
    records.write_json_atomic(out / "summary.json", summary)
    records.write_json_atomic(out / "config.json", asdict(cfg))
    if cfg.push_to_hub:
        from mlx_cai import hub

        emitter(progress)(Event("clean", message=f"pushed to {hub.push(out, cfg.push_to_hub, private=cfg.private)}"))
    return out


def _helpful(cfg: CleanConfig, n_kept: int, recs: list[dict], ctx: Context, out: Path,
             backend: ChatBackend | None) -> tuple[list[dict], dict]:
    """SFT examples of helpful answers, about helpful_ratio per kept revision, and what happened to them."""
    source = cfg.helpful
    want = round(cfg.helpful_ratio * n_kept)
    if source is None or want == 0:
        return [], {"source": None, "selected": 0, "used": 0, "dropped": 0}
    answered, to_answer = helpful_pool(str(source))
    rng = random.Random(records.stable_id(cfg.seed, "helpful"))
    if answered:  # (id, prompt, answer, finish reason)
        chosen = [(i, q, a, "stop") for i, q, a in rng.sample(answered, min(want, len(answered)))]
    else:
        sources = list(dict.fromkeys(p.source for p in to_answer))  # comma-joined specs: equal shares of each
        picks = stratified_sample([[p for p in to_answer if p.source == s] for s in sources], want, rng)
        sampling = _sampling(recs[0].get("sampling") or {}, cfg.helpful_max_tokens)
        backend = backend or from_spec(cfg.helpful_model or _responder_spec(recs), batch_size=cfg.batch_size)
        system = [{"role": "system", "content": cfg.helpful_system}] if cfg.helpful_system else []
        jobs = [(p.id, system + [{"role": "user", "content": p.prompt}], records.row_seed(cfg.seed, p.id))
                for p in picks]
        got = complete_cached(backend, jobs, out / "helpful.jsonl", sampling, cfg.batch_size)
        chosen = [(p.id, p.prompt, got[p.id]["text"], got[p.id]["finish_reason"]) for p in picks]
    trimmed = 0
    if cfg.helpful_trim:  # an answer cut at max tokens, ended at its last full sentence, is still a good answer
        for k, (i, q, a, f) in enumerate(chosen):
            a2, f2 = end_cut(a, f)
            if f2 != f:
                chosen[k], trimmed = (i, q, a2, f2), trimmed + 1
    used = [sft_example(q, a) for _, q, a, f in chosen if not check(Example(q, a, f, False), ctx, FORM_RULES)]
    return used, {"source": str(source), "selected": len(chosen), "used": len(used), "trimmed": trimmed,
                  "dropped": len(chosen) - len(used)}
