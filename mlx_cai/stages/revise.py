"""SL-CAI data: initial answer -> critique -> revision, for N rounds, batched across prompts.

Reads a prompt source (see mlx_cai.prompts) and a constitution. Appends one record per prompt to OUT.jsonl:

  {id, prompt, source, category, harmful,
   initial, initial_finish,
   rounds: [{round, principle, critique, critique_finish, revision, revision_finish}],
   revision, revision_finish,          # the final revision, what SFT trains on
   shots: [demo ids], models: {responder, critic}, constitution: {name, version},
   sampling: {...}, seed, config_id, stage}

Prompts are processed in chunks of `batch_size`: one batched call for all initial answers of a chunk, then
one for all critiques, one for all revisions (per round); the chunk's records are appended when it is done.
Every random choice (shots, principle per round, sampling seeds) is drawn from the run seed and the prompt
id alone, so a resumed run writes what an uninterrupted one would have. Resume skips ids already in OUT.
With several processes (mlx.launch), each revises its share of a chunk of `batch_size` x processes prompts
and rank 0 appends the chunk's records (mlx_cai.distributed.map_chunks).

The initial answer is the responder's own answer to the bare prompt (what the revision fixes, and the
`rejected` side of a preference pair later); the few-shot demonstrations are prior turns of the critique
and revision calls only, unless `shots_in_initial` is set. Each prompt gets its own random demos, so the
model sees varied examples instead of one it can copy.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

from mlx_cai import constitution, memplan
from mlx_cai import distributed
from mlx_cai import evalsets, framing
from mlx_cai import prompts as prompt_sources
from mlx_cai import records
from mlx_cai.config import opt
from mlx_cai.progress import Event, Progress, emitter
from mlx_cai.chat import BackendError, ChatBackend, LocalBackend, from_spec
from mlx_cai.sampling import Generation, SamplingConfig

STAGE = "revise/1"


class ReviseError(ValueError):
    """A revise run that cannot start or continue as asked; one line."""


@dataclass
class ReviseConfig:
    """Settings of one revise run. The output's records carry all of them (and `config_id`)."""

    prompts: str = opt("train:harmful", "prompt source: " + prompt_sources.SPEC_FORMS)
    output: str = opt("", "output JSONL; rerunning continues it")
    model: str = opt("smollm2-135m", "responder: writes the initial answers (backend spec, see `mlx-cai chat`)")
    critic: str | None = opt(None, "writes critiques and revisions, e.g. openai:MODEL@http://127.0.0.1:8080/v1; "
                                   "none = the responder (the paper's setup)")
    constitution: str = opt(str(constitution.DEFAULT_PATH), "constitution file (ours, Anthropic or llm-swarm format): "
                                                 "principles and few-shot demonstrations")
    principles: list[str] | None = opt(None, "comma-separated principle ids to sample from; none = all")
    rounds: int = opt(1, "critique/revision rounds per prompt (Anthropic used up to 4)")
    framing: str = opt("conversation", "conversation: critique and revision requests as further turns of the "
                                       "chat (the paper); single: each one self-contained request quoting the "
                                       "prompt and the draft; joint: the single framing's critique and "
                                       "revision in one request, one call per round; principled: the critic answers the request "
                                       "itself under the principle, no critique (see mlx_cai.framing)")
    opening: str = opt("free", "principled framing: how its replies begin; free, or subject (with the request's "
                               "subject, never 'I' or an apology: a refusal carries its reason, see mlx_cai.framing)")
    principle_choice: str = opt("uniform", "uniform: one principle drawn from all per round; category: from those "
                                           "written for the prompt's category (the constitution's `categories`)")
    shots: int = opt(3, "few-shot demonstrations per prompt, drawn at random per prompt")
    shots_in_initial: bool = opt(False, "also show the demos before the initial answer")
    seed: int = opt(0, "drives shots, principles and sampling seeds")
    limit: int | None = opt(None, "only the first N prompts")
    spread: bool = opt(False, "with limit: the N prompts taken round-robin over the prompts' categories (file order "
                              "within each), so every category is revised; off: the first N in file order (the "
                              "shipped train:harmful file is ordered by category: its first 48 cover 3 of 11)")
    max_tokens: int = opt(256, "new tokens per turn")
    temperature: float = opt(0.0, "0 = greedy")
    top_p: float = opt(1.0, "nucleus sampling mass")
    repetition_penalty: float = opt(1.2, "1.2 keeps SmolLM2-135M from looping (REFERENCE.md section 2)")
    batch_size: int = opt(32, "prompts per batched call; records are appended per batch")
    critic_max_tokens: int | None = opt(None, "new tokens per critique/revision turn; none = max_tokens")
    critic_temperature: float | None = opt(None, "the critic's temperature; none = temperature")
    critic_repetition_penalty: float | None = opt(None, "the critic's repetition penalty; none = repetition_penalty "
                                                        "(1.2 is for SmolLM2; a 1.5B critic writes better near 1.0)")

    def __post_init__(self):
        if self.rounds < 1:
            raise ReviseError(f"rounds must be >= 1, got {self.rounds}")
        if self.shots < 0:
            raise ReviseError(f"shots must be >= 0, got {self.shots}")
        if self.batch_size < 1:
            raise ReviseError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.limit is not None and self.limit < 1:
            raise ReviseError(f"limit must be >= 1, got {self.limit}")
        if self.framing not in framing.FRAMINGS:
            raise ReviseError(f"framing must be one of {', '.join(framing.FRAMINGS)}, got '{self.framing}'")
        if self.opening not in framing.OPENINGS:
            raise ReviseError(f"opening must be one of {', '.join(framing.OPENINGS)}, got '{self.opening}'")
        if self.opening != "free" and self.framing != "principled":
            raise ReviseError(f"opening: {self.opening} is for the principled framing (framing is {self.framing})")
        if self.principle_choice not in ("uniform", "category"):
            raise ReviseError(f"principle_choice must be uniform or category, got '{self.principle_choice}'")
        if isinstance(self.principles, str):
            self.principles = [p.strip() for p in self.principles.split(",") if p.strip()]
        self.sampling(), self.sampling("critic")  # validates the sampling fields

    def plan(self) -> tuple[str, int]:
        """(what it reads, tokens it generates) for `mlx-cai run --dry-run`."""
        calls = 1 if self.framing in ("joint", "principled") else 2  # critic calls per round
        n, turns = self.limit or 0, 1 + calls * self.rounds
        critic_tokens = self.critic_max_tokens or self.max_tokens
        return (f"{n or '?'} prompts x {turns} turns ({self.prompts})",
                n * (self.max_tokens + calls * self.rounds * critic_tokens))

    def memory(self, ctx: memplan.Context) -> memplan.Estimate | None:
        """Peak memory: the responder (or the critic) generating a batch with the few-shot demos in its prompt,
        both models held when the critic is another local one."""
        new = max(self.max_tokens, self.critic_max_tokens or 0)
        prompt = memplan.PROMPT_TOKENS + self.shots * memplan.DEMO_TOKENS + 2 * self.rounds * new
        return memplan.generation(ctx, self.model, {"critic": self.critic}, batch=self.batch_size, prompt=prompt,
                                  new_tokens=new, knobs={"batch_size": self.batch_size, "max_tokens": self.max_tokens})

    @staticmethod
    def work_units(settings: dict) -> float | None:
        """Prompts revised: what a measured stage time is divided by."""
        return settings.get("limit")

    def sampling(self, role: str = "responder") -> SamplingConfig:
        """The initial answers' sampling, or (role "critic") the critiques' and revisions'."""
        def pick(own, base):
            return base if role != "critic" or own is None else own

        try:
            return SamplingConfig(max_tokens=pick(self.critic_max_tokens, self.max_tokens),
                                  temperature=pick(self.critic_temperature, self.temperature), top_p=self.top_p,
                                  repetition_penalty=pick(self.critic_repetition_penalty, self.repetition_penalty),
                                  seed=self.seed)
        except ValueError as e:
            raise ReviseError(str(e)) from None


@dataclass
class Plan:
    """The seeded choices for one prompt, fixed before any generation."""

    prompt: prompt_sources.Prompt
    shots: list[constitution.Demonstration]
    principles: list[constitution.Principle]  # one per round
    seeds: dict[str, int] = field(default_factory=dict)  # turn name -> sampling seed


def plan(prompt: prompt_sources.Prompt, con: constitution.Constitution, cfg: ReviseConfig) -> Plan:
    """Shots, principles and sampling seeds for one prompt, from (seed, prompt id) only."""
    rng = random.Random(records.row_seed(cfg.seed, prompt.id, "choices"))
    shots = constitution.sample_shots(con, cfg.shots, rng)
    category = prompt.category if cfg.principle_choice == "category" else None
    principles = [constitution.sample_principle(con, rng, category) for _ in range(cfg.rounds)]
    turns = ["initial"] + [f"{kind}_{r}" for r in range(1, cfg.rounds + 1) for kind in ("critique", "revision")]
    return Plan(prompt, shots, principles, {t: records.row_seed(cfg.seed, prompt.id, t) for t in turns})


def config_id(cfg: ReviseConfig, con: constitution.Constitution, responder: str, critic: str) -> str:
    """What must match for records to belong in one output file (not batch size or limit; principles via con.ids)."""
    skip = ("prompts", "output", "batch_size", "limit", "spread", "model", "critic", "constitution", "principles")
    keep = {k: v for k, v in asdict(cfg).items() if k not in skip}
    for k, default in (("framing", "conversation"), ("opening", "free"), ("principle_choice", "uniform"),
                       ("critic_max_tokens", None),
                       ("critic_temperature", None), ("critic_repetition_penalty", None)):  # later fields: at their
        if keep[k] == default:  # defaults they leave earlier runs' ids as they were
            del keep[k]
    return records.stable_id(keep, responder, critic, con.name, con.version, con.ids, prefix="rev-")


def revise_chunk(plans: Sequence[Plan], responder: ChatBackend, critic: ChatBackend, cfg: ReviseConfig,
                 on_tokens: Callable[[int], None] = lambda n: None) -> list[dict]:
    """Run all turns for a chunk of prompts: one batched call per turn. Returns the turn fields per prompt."""
    sampling = {"initial": cfg.sampling(), "critic": cfg.sampling("critic")}

    def call(backend: ChatBackend, convs: list[list[dict]], turn: str) -> list[Generation]:
        gens = backend.complete(convs, sampling["initial" if turn == "initial" else "critic"],
                                seeds=[p.seeds[turn] for p in plans])
        if getattr(backend, "on_tokens", None) is None:  # local backends report every decode step themselves
            on_tokens(sum(g.completion_tokens for g in gens))
        return gens

    demos = [constitution.shots_to_messages(p.shots) for p in plans]
    asks = [[{"role": "user", "content": p.prompt.prompt}] for p in plans]
    first = [d + a if cfg.shots_in_initial else a for d, a in zip(demos, asks)]
    initial = call(responder, first, "initial")
    out = [{"initial": g.text, "initial_finish": g.finish_reason, "rounds": [], "_truncated": g.truncated}
           for g in initial]
    if cfg.framing in ("single", "joint", "principled"):
        rounds = {"single": _single_rounds, "joint": _joint_rounds, "principled": _principled_rounds}[cfg.framing]
        rounds(plans, [g.text for g in initial], out, critic, cfg, call)
        return out
    history = [d + a + [{"role": "assistant", "content": g.text}] for d, a, g in zip(demos, asks, initial)]
    for r in range(1, cfg.rounds + 1):
        principles = [p.principles[r - 1] for p in plans]
        for h, pr in zip(history, principles):
            h.append({"role": "user", "content": pr.critique})
        critiques = call(critic, history, f"critique_{r}")
        for h, g, pr in zip(history, critiques, principles):
            h += [{"role": "assistant", "content": g.text}, {"role": "user", "content": pr.revision}]
        revisions = call(critic, history, f"revision_{r}")
        for h, o, pr, c, v in zip(history, out, principles, critiques, revisions):
            h.append({"role": "assistant", "content": v.text})
            _add_round(o, r, pr, c, v)
    return out


def _add_round(turns: dict, r: int, principle: constitution.Principle, critique: Generation,
               revision: Generation) -> None:
    """Append round r's critique and revision to a prompt's turn fields."""
    turns["rounds"].append({"round": r, "principle": principle.id, "critique": critique.text,
                            "critique_finish": critique.finish_reason, "revision": revision.text,
                            "revision_finish": revision.finish_reason})
    turns["_truncated"] += critique.truncated + revision.truncated


def _single_rounds(plans: Sequence[Plan], drafts: list[str], out: list[dict], critic: ChatBackend,
                   cfg: ReviseConfig, call) -> None:
    """The rounds in the single framing: each critique and revision one self-contained request about the
    current draft (the initial answer, then the previous round's revision)."""
    for r in range(1, cfg.rounds + 1):
        principles = [p.principles[r - 1] for p in plans]
        critiques = call(critic, [framing.single_demos(p.shots, "critique")
                                  + [{"role": "user", "content": framing.single_critique(p.prompt.prompt, d, pr)}]
                                  for p, d, pr in zip(plans, drafts, principles)], f"critique_{r}")
        revisions = call(critic, [framing.single_demos(p.shots, "revision")
                                  + [{"role": "user", "content": framing.single_revision(p.prompt.prompt, d, c.text, pr)}]
                                  for p, d, c, pr in zip(plans, drafts, critiques, principles)], f"revision_{r}")
        for o, pr, c, v in zip(out, principles, critiques, revisions):
            _add_round(o, r, pr, c, v)
        drafts = [v.text for v in revisions]


def _joint_rounds(plans: Sequence[Plan], drafts: list[str], out: list[dict], critic: ChatBackend,
                  cfg: ReviseConfig, call) -> None:
    """The rounds in the joint framing: one call per round writes the critique and then the revision."""
    for r in range(1, cfg.rounds + 1):
        principles = [p.principles[r - 1] for p in plans]
        gens = call(critic, [framing.joint_demos(p.shots)
                             + [{"role": "user", "content": framing.joint_request(p.prompt.prompt, d, pr)}]
                             for p, d, pr in zip(plans, drafts, principles)], f"critique_{r}")
        drafts = []
        for o, pr, g in zip(out, principles, gens):
            critique, reply = framing.split_joint(g.text)
            ended = "stop" if reply else g.finish_reason  # the critique ended where the reply began
            _add_round(o, r, pr, replace(g, text=critique, finish_reason=ended, truncated=0), replace(g, text=reply))
            drafts.append(reply)


def _principled_rounds(plans: Sequence[Plan], drafts: list[str], out: list[dict], critic: ChatBackend,
                       cfg: ReviseConfig, call) -> None:
    """The principled framing: one call per round, the critic answering the request under the round's principle
    (its system turn); no critique is written (the record's critique is empty)."""
    for r in range(1, cfg.rounds + 1):
        principles = [p.principles[r - 1] for p in plans]
        gens = call(critic, [[{"role": "system", "content": framing.principled_system(pr, cfg.opening)},
                              {"role": "user", "content": p.prompt.prompt}]
                             for p, pr in zip(plans, principles)], f"revision_{r}")
        for o, pr, g in zip(out, principles, gens):
            _add_round(o, r, pr, Generation("", "stop", 0, 0), g)


def _record(p: Plan, turns: dict, meta: dict) -> dict:
    last = turns["rounds"][-1]
    rec = {"id": p.prompt.id, "prompt": p.prompt.prompt, "source": p.prompt.source, "category": p.prompt.category,
           "harmful": p.prompt.harmful, "initial": turns["initial"], "initial_finish": turns["initial_finish"],
           "rounds": turns["rounds"], "revision": last["revision"], "revision_finish": last["revision_finish"],
           "shots": [s.id for s in p.shots], **meta}
    if turns["_truncated"]:
        rec["context_truncated_tokens"] = turns["_truncated"]  # prompt tokens dropped to fit the context
    return rec


def load_constitution(cfg: ReviseConfig) -> constitution.Constitution:
    """The constitution restricted to `cfg.principles`; ConstitutionError names a bad file or unknown id."""
    con = constitution.load(cfg.constitution)
    return constitution.select(con, cfg.principles) if cfg.principles else con


def load_prompts(source: str | Path | Sequence[prompt_sources.Prompt], limit: int | None,
                 spread: bool = False) -> Sequence[prompt_sources.Prompt]:
    """The prompts to revise: the first `limit`, or with `spread` `limit` round-robin over their categories."""
    if spread:
        every = prompt_sources.load(source) if isinstance(source, (str, Path)) else source
        return evalsets.select(list(every), limit)
    if isinstance(source, (str, Path)):
        return prompt_sources.load(source, limit=limit)
    return list(source)[:limit] if limit else list(source)


def run(config: ReviseConfig, progress: Progress | None = None, *, prompts: Sequence[prompt_sources.Prompt] | None = None,
        responder: ChatBackend | None = None, critic: ChatBackend | None = None) -> Path:
    """Revise every prompt of config.prompts not yet in config.output; returns the output path.

    `prompts` (a list of Prompt) and `responder` / `critic` override what the config names (tests pass tiny
    models; a caller may pass a configured OpenAIBackend). A BackendError (e.g. the critic server gave up
    after its retries) stops the run: every finished chunk is already on disk, and rerunning continues.
    """
    cfg = config
    if not cfg.output:
        raise ReviseError("an output file is required (-o OUT.jsonl)")
    out = Path(cfg.output)
    con = load_constitution(cfg)
    items = load_prompts(cfg.prompts if prompts is None else prompts, cfg.limit, cfg.spread)
    responder = responder or from_spec(cfg.model, batch_size=cfg.batch_size)
    if critic is None:
        critic = responder if cfg.critic in (None, cfg.model) else from_spec(cfg.critic, batch_size=cfg.batch_size)
    cid = config_id(cfg, con, responder.name, critic.name)

    done = records.load_done(out) if distributed.is_main() else {}
    foreign = [i for i, r in done.items() if r.get("config_id") != cid]
    if foreign:
        raise ReviseError(f"{out} holds records made with other settings (e.g. id {foreign[0]}); "
                          "use a new output file or the same settings as before")
    pending = set(distributed.from_main([p.id for p in items if p.id not in done]))
    todo = [p for p in items if p.id in pending]
    emit = emitter(progress)
    dropped = f", {items.dropped_eval} held-out eval prompts left out" if getattr(items, "dropped_eval", 0) else ""
    emit(Event("revise", total=len(items), done=len(items) - len(todo),
               message=f"{len(items)} prompts from {cfg.prompts if prompts is None else 'the caller'}{dropped}; "
                       f"{len(items) - len(todo)} already in {out}"))
    if not todo:
        return out
    own, critics = ({k: v for k, v in asdict(c).items() if k != "seed"} for c in (cfg.sampling(), cfg.sampling("critic")))
    meta = {"models": {"responder": responder.name, "critic": critic.name},
            "constitution": {"name": con.name, "version": con.version},
            "sampling": own, **({"critic_sampling": critics} if critics != own else {}),
            "seed": cfg.seed, "config_id": cid, "stage": STAGE}

    def work(prompts: list[prompt_sources.Prompt]) -> list[dict]:
        plans = [plan(p, con, cfg) for p in prompts]
        turns = revise_chunk(plans, responder, critic, cfg, on_tokens=lambda n: emit(Event("revise", tokens=n)))
        return [_record(p, t, meta) for p, t in zip(plans, turns)]

    backends = [responder] + ([critic] if critic is not responder else [])
    streaming = [b for b in backends if isinstance(b, LocalBackend) and b.on_tokens is None]
    written = 0
    try:
        for backend in streaming:  # live tok/s in the progress bar, per decode step
            backend.on_tokens = lambda n: emit(Event("revise", tokens=n))
        for backend in backends:
            backend.check()
        with records.writer(out, distributed.is_main()) as writer:
            for chunk, recs in distributed.map_chunks(todo, cfg.batch_size, work):
                for rec in recs:
                    writer.write(rec)
                written += len(chunk)
                emit(Event("revise", advance=len(chunk)))
    except BackendError as e:
        raise BackendError(f"{e} -- stopped; {len(done) + written} records kept in {out}, "
                           "rerun the same command to continue") from None
    finally:
        for backend in streaming:
            backend.on_tokens = None
    return out
