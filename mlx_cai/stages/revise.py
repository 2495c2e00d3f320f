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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from mlx_cai import constitution as C
from mlx_cai import distributed as D
from mlx_cai import prompts as P
from mlx_cai import records
from mlx_cai.chat import BackendError, ChatBackend, LocalBackend, from_spec
from mlx_cai.generate import Generation, SamplingConfig

STAGE = "revise/1"
Progress = Callable[[int, int], None]  # (prompts finished, tokens generated) since the last call


class ReviseError(ValueError):
    """A revise run that cannot start or continue as asked; one line."""


@dataclass
class ReviseConfig:
    """Settings of one revise run. The output's records carry all of them (and `config_id`)."""

    model: str = "smollm2-135m"  # responder: writes the initial answers (backend spec, see mlx_cai.chat)
    critic: str | None = None  # writes critiques and revisions; None = the responder (the paper's setup)
    constitution: str = str(C.DEFAULT_PATH)  # principles and few-shot demonstrations
    principles: list[str] | None = None  # restrict sampling to these principle ids; None = all
    rounds: int = 1  # critique/revision rounds per prompt (Anthropic used up to 4)
    shots: int = 3  # few-shot demonstrations per prompt, drawn at random per prompt
    shots_in_initial: bool = False  # also show the demos before the initial answer
    seed: int = 0  # drives shots, principles and sampling seeds
    limit: int | None = None  # use only the first N prompts of the source
    max_tokens: int = 256  # per turn
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    repetition_penalty: float = 1.2  # 1.2 keeps SmolLM2-135M from looping (REFERENCE.md section 2)
    batch_size: int = 32  # prompts per chunk: one batched call per turn, records appended per chunk

    def __post_init__(self):
        if self.rounds < 1:
            raise ReviseError(f"rounds must be >= 1, got {self.rounds}")
        if self.shots < 0:
            raise ReviseError(f"shots must be >= 0, got {self.shots}")
        if self.batch_size < 1:
            raise ReviseError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.limit is not None and self.limit < 1:
            raise ReviseError(f"limit must be >= 1, got {self.limit}")
        self.sampling()  # validates the sampling fields

    def sampling(self) -> SamplingConfig:
        try:
            return SamplingConfig(max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p,
                                  repetition_penalty=self.repetition_penalty, seed=self.seed)
        except ValueError as e:
            raise ReviseError(str(e)) from None


@dataclass
class Plan:
    """The seeded choices for one prompt, fixed before any generation."""

    prompt: P.Prompt
    shots: list[C.Demonstration]
    principles: list[C.Principle]  # one per round
    seeds: dict[str, int] = field(default_factory=dict)  # turn name -> sampling seed


def row_seed(*parts) -> int:
    return int(records.stable_id(*parts)[:8], 16)


def plan(prompt: P.Prompt, con: C.Constitution, cfg: ReviseConfig) -> Plan:
    """Shots, principles and sampling seeds for one prompt, from (seed, prompt id) only."""
    rng = random.Random(row_seed(cfg.seed, prompt.id, "choices"))
    shots = C.sample_shots(con, cfg.shots, rng)
    principles = [C.sample_principle(con, rng) for _ in range(cfg.rounds)]
    turns = ["initial"] + [f"{kind}_{r}" for r in range(1, cfg.rounds + 1) for kind in ("critique", "revision")]
    return Plan(prompt, shots, principles, {t: row_seed(cfg.seed, prompt.id, t) for t in turns})


def config_id(cfg: ReviseConfig, con: C.Constitution, responder: str, critic: str) -> str:
    """What must match for records to belong in one output file (not batch size or limit; principles via con.ids)."""
    skip = ("batch_size", "limit", "model", "critic", "constitution", "principles")
    keep = {k: v for k, v in asdict(cfg).items() if k not in skip}
    return records.stable_id(keep, responder, critic, con.name, con.version, con.ids, prefix="rev-")


def revise_chunk(plans: Sequence[Plan], responder: ChatBackend, critic: ChatBackend, cfg: ReviseConfig,
                 on_tokens: Callable[[int], None] = lambda n: None) -> list[dict]:
    """Run all turns for a chunk of prompts: one batched call per turn. Returns the turn fields per prompt."""
    sampling = cfg.sampling()

    def call(backend: ChatBackend, convs: list[list[dict]], turn: str) -> list[Generation]:
        gens = backend.complete(convs, sampling, seeds=[p.seeds[turn] for p in plans])
        if getattr(backend, "on_tokens", None) is None:  # local backends report every decode step themselves
            on_tokens(sum(g.completion_tokens for g in gens))
        return gens

    demos = [C.shots_to_messages(p.shots) for p in plans]
    asks = [[{"role": "user", "content": p.prompt.prompt}] for p in plans]
    first = [d + a if cfg.shots_in_initial else a for d, a in zip(demos, asks)]
    initial = call(responder, first, "initial")
    out = [{"initial": g.text, "initial_finish": g.finish_reason, "rounds": [], "_truncated": g.truncated}
           for g in initial]
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
            o["rounds"].append({"round": r, "principle": pr.id, "critique": c.text, "critique_finish": c.finish_reason,
                                "revision": v.text, "revision_finish": v.finish_reason})
            o["_truncated"] += c.truncated + v.truncated
    return out


def _record(p: Plan, turns: dict, meta: dict) -> dict:
    last = turns["rounds"][-1]
    rec = {"id": p.prompt.id, "prompt": p.prompt.prompt, "source": p.prompt.source, "category": p.prompt.category,
           "harmful": p.prompt.harmful, "initial": turns["initial"], "initial_finish": turns["initial_finish"],
           "rounds": turns["rounds"], "revision": last["revision"], "revision_finish": last["revision_finish"],
           "shots": [s.id for s in p.shots], **meta}
    if turns["_truncated"]:
        rec["context_truncated_tokens"] = turns["_truncated"]  # prompt tokens dropped to fit the context
    return rec


def load_constitution(cfg: ReviseConfig) -> C.Constitution:
    """The constitution restricted to `cfg.principles`; ConstitutionError names a bad file or unknown id."""
    con = C.load(cfg.constitution)
    return C.select(con, cfg.principles) if cfg.principles else con


def load_prompts(source: str | Path | Sequence[P.Prompt], limit: int | None) -> list[P.Prompt]:
    if isinstance(source, (str, Path)):
        return list(P.load(source, limit=limit))
    return list(source)[:limit] if limit else list(source)


def run(config: ReviseConfig, prompts: str | Path | Sequence[P.Prompt], out_path: str | Path,
        progress: Progress | None = None, *, responder: ChatBackend | None = None,
        critic: ChatBackend | None = None) -> Path:
    """Revise every prompt not yet in `out_path`; returns `out_path`.

    `prompts` is a spec (mlx_cai.prompts) or a list of Prompt. `responder` / `critic` override the backends
    named in the config (tests pass tiny models; a caller may pass a configured OpenAIBackend).
    A BackendError (e.g. the critic server gave up after its retries) stops the run: every finished chunk is
    already on disk, and rerunning continues from there.
    """
    cfg, out = config, Path(out_path)
    con = load_constitution(cfg)
    items = load_prompts(prompts, cfg.limit)
    responder = responder or from_spec(cfg.model, batch_size=cfg.batch_size)
    if critic is None:
        critic = responder if cfg.critic in (None, cfg.model) else from_spec(cfg.critic, batch_size=cfg.batch_size)
    cid = config_id(cfg, con, responder.name, critic.name)

    done = records.load_done(out) if D.is_main() else {}
    foreign = [i for i, r in done.items() if r.get("config_id") != cid]
    if foreign:
        raise ReviseError(f"{out} holds records made with other settings (e.g. id {foreign[0]}); "
                          "use a new output file or the same settings as before")
    pending = set(D.from_main([p.id for p in items if p.id not in done]))
    todo = [p for p in items if p.id in pending]
    if not todo:
        return out
    meta = {"models": {"responder": responder.name, "critic": critic.name},
            "constitution": {"name": con.name, "version": con.version},
            "sampling": {k: v for k, v in asdict(cfg.sampling()).items() if k != "seed"},
            "seed": cfg.seed, "config_id": cid, "stage": STAGE}
    tick = progress or (lambda items, tokens: None)

    def work(prompts: list[P.Prompt]) -> list[dict]:
        plans = [plan(p, con, cfg) for p in prompts]
        turns = revise_chunk(plans, responder, critic, cfg, on_tokens=lambda n: tick(0, n))
        return [_record(p, t, meta) for p, t in zip(plans, turns)]

    backends = [responder] + ([critic] if critic is not responder else [])
    streaming = [b for b in backends if isinstance(b, LocalBackend) and b.on_tokens is None]
    written = 0
    try:
        for backend in streaming:  # live tok/s in the progress bar, per decode step
            backend.on_tokens = lambda n: tick(0, n)
        for backend in backends:
            backend.check()
        with records.writer(out, D.is_main()) as writer:
            for chunk, recs in D.map_chunks(todo, cfg.batch_size, work):
                for rec in recs:
                    writer.write(rec)
                written += len(chunk)
                tick(len(chunk), 0)
    except BackendError as e:
        raise BackendError(f"{e} -- stopped; {len(done) + written} records kept in {out}, "
                           "rerun the same command to continue") from None
    finally:
        for backend in streaming:
            backend.on_tokens = None
    return out
