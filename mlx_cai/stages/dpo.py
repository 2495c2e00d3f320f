"""DPO on AI-feedback preference pairs, continuing the SFT LoRA adapter, with one model in memory.

Reads PAIRS (JSONL, TRL's format): `prompt` (a string, or a list of {role, content} turns), `chosen`
and `rejected` (strings, or a one-message assistant list), optional `id`. Writes into OUT:

  ref_logps.jsonl   reference log-probs per pair id, computed once with the SFT model before training
                    (appended per batch: an interrupted run continues it; with several processes each
                    computes its share of a batch and rank 0, the only writer, appends them all)
  adapters.safetensors + adapter_config.json, checkpoints/, metrics.jsonl (rewards/*, logps/*, loss,
  grad_norm per step), config.yaml, summary.json (what was read, skipped and truncated)

Why one model: the reference is the SFT policy, frozen. Its log-probs of every pair are all the loss
needs from it, so they are computed with the SFT adapter loaded, stored, and the same model then
trains that adapter further. Chosen and rejected run as one (2B, L) batch: one forward pass per step.

Input policy: a missing field or a prompt that already carries chat-template markup (another template)
is an error naming the line; empty or identical responses and repeated pairs are skipped and counted.
Length policy (`truncation: truncate`): the prompt keeps its last max_prompt_length tokens, then each
response is cut at the end to fit max_seq_length; counted as `truncated`. `skip` drops such pairs
(counted) and `error` stops.
"""

from __future__ import annotations

import contextlib
import re
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

from mlx_cai import backend  # BLAS before mlx.core

import mlx.core as mx

from mlx_cai import adapters, encoding, fastmath, records
from mlx_cai import distributed
from mlx_cai.config import opt
from mlx_cai.progress import Event, Progress, emitter
from mlx_cai.losses import LOSSES, dpo_loss
from mlx_cai.train import fit
from mlx_cai.train.config import TrainConfig, TrainingError
from mlx_cai.train.data import pad_batch, strided, train_streams
from mlx_cai.train.logps import answer_logps

STAGE = "dpo/1"
TRUNCATION = ("truncate", "skip", "error")
# Markup of common chat templates: a prompt holding one was rendered for some model already.
FOREIGN_MARKUP = ("<|im_start|>", "<|im_end|>", "[INST]", "[/INST]", "<|start_header_id|>", "<|eot_id|>",
                  "<start_of_turn>", "<end_of_turn>", "<|user|>", "<|assistant|>", "<|endoftext|>", "</s>")
_HH_TAIL = re.compile(r"\n\nAssistant:\s*$")  # Anthropic HH raw transcript ending in an open assistant turn


@dataclass
class DPOConfig(TrainConfig):
    """DPO settings; see TrainConfig for the shared ones (LoRA fields apply only without --adapter)."""

    sequences_per_example = 2  # chosen and rejected run as one (2B, L) batch

    pairs: str = opt("", "preference pairs JSONL (prompt, chosen, rejected)")
    adapter: str | None = opt(None, "SFT adapter: the reference model and the policy's starting point; "
                                    "none = the base model, with fresh LoRA layers")
    beta: float = opt(0.1, "KL strength / reward scale")
    loss_type: str = opt("sigmoid", f"one of {', '.join(LOSSES)}")
    label_smoothing: float = opt(0.0, "assumed label-noise rate (sigmoid/cDPO and robust)")
    nll_alpha: float = opt(0.0, "weight of an NLL term on the chosen answer (RPO), against collapse")
    max_prompt_length: int = opt(512, "prompt tokens kept (from the end) when a pair is too long")
    truncation: str = opt("truncate", "pairs over max_seq_length: truncate, skip or error")
    valid_fraction: float = opt(0.0, "share of pairs held out for validation metrics (by id hash)")
    learning_rate: float = opt(5e-6, "peak learning rate (mlx-lm LoRA convention: scale 20)")
    batch_mix: str = opt("length", "length: batches of pairs of similar length; groups: each batch mixes the "
                                   "pairs' groups (their source.kind: feedback's boundary pairs and the others) "
                                   "in proportion, so no step pushes only one way (tried on the demo: it ends "
                                   "at the helpful end, ASR 83-96%; BENCHMARKS.md)")

    def __post_init__(self):
        super().__post_init__()
        if not self.pairs:
            raise TrainingError("a pairs file is required (--pairs pairs.jsonl)")
        if self.loss_type not in LOSSES:
            raise TrainingError(f"loss_type must be one of {', '.join(LOSSES)}, got '{self.loss_type}'")
        limit = 0.5 if self.loss_type != "robust" else 0.4999
        if not 0 <= self.label_smoothing <= limit:
            raise TrainingError(f"label_smoothing must be in [0, {limit}] for {self.loss_type}")
        if self.beta <= 0:
            raise TrainingError(f"beta must be > 0, got {self.beta}")
        if self.batch_mix not in ("length", "groups"):
            raise TrainingError(f"batch_mix must be length or groups, got '{self.batch_mix}'")
        if self.truncation not in TRUNCATION:
            raise TrainingError(f"truncation must be one of {', '.join(TRUNCATION)}, got '{self.truncation}'")
        if not 1 <= self.max_prompt_length < self.max_seq_length:
            raise TrainingError("max_prompt_length must be >= 1 and < max_seq_length")
        if not 0 <= self.valid_fraction < 1:
            raise TrainingError(f"valid_fraction must be in [0, 1), got {self.valid_fraction}")


@dataclass
class Pair:
    id: str
    prompt: list[dict]
    chosen: str
    rejected: str
    group: str = ""  # the pair's `source.kind` (feedback: "boundary"), for batch_mix: groups


@dataclass
class TokenPair:
    id: str
    prompt: list[int]
    chosen: list[int]  # answer tokens, end-of-turn included
    rejected: list[int]
    group: str = ""

    def sequences(self) -> tuple[list[int], list[int]]:
        return self.prompt + self.chosen, self.prompt + self.rejected

    @property
    def length(self) -> int:
        """Tokens of the longer sequence: what batching sorts by."""
        return len(self.prompt) + max(len(self.chosen), len(self.rejected))


# ------------------------------------------------------------------------------------------- input


def _response(value, where: str, name: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict) and \
            value[0].get("role") == "assistant" and isinstance(value[0].get("content"), str):
        return value[0]["content"]
    raise records.RecordError(f"{where}: `{name}` must be a string or one assistant message")


def _prompt(value, where: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not records.is_messages(value):
        raise records.RecordError(f"{where}: `prompt` must be a string or a list of {{role, content}} messages")
    return value


def _check_markup(text: str, where: str, markers: tuple[str, ...]) -> None:
    hit = next((m for m in markers if m in text), None)
    if hit is None and _HH_TAIL.search(text):
        hit = "\\n\\nAssistant:"
    if hit:
        raise records.RecordError(f"{where}: the prompt already holds chat-template markup ({hit!r}), i.e. it was "
                                  "rendered with some template; store plain text or message lists, the model's own "
                                  "template is applied here")


def read_pairs(path: str | Path, markers: tuple[str, ...] = FOREIGN_MARKUP) -> tuple[list[Pair], dict]:
    """Pairs of a TRL-format file and the counts of skipped ones (module docstring: input policy)."""
    path = Path(path)
    pairs, seen = [], set()
    counts = {"read": 0, "skipped_empty_response": 0, "skipped_identical": 0, "skipped_duplicate": 0}
    for where, row in records.numbered_jsonl(path, required=("prompt", "chosen", "rejected")):
        counts["read"] += 1
        prompt = _prompt(row["prompt"], where)
        for m in prompt:
            _check_markup(m["content"], where, markers)
        chosen = _response(row["chosen"], where, "chosen")
        rejected = _response(row["rejected"], where, "rejected")
        if not chosen.strip() or not rejected.strip():
            counts["skipped_empty_response"] += 1
            continue
        if chosen.strip() == rejected.strip():
            counts["skipped_identical"] += 1
            continue
        pid = str(row["id"]) if row.get("id") not in (None, "") else records.stable_id(prompt, chosen, rejected)
        if pid in seen:
            counts["skipped_duplicate"] += 1
            continue
        seen.add(pid)
        source = row.get("source")
        pairs.append(Pair(pid, prompt, chosen, rejected,
                          str(source.get("kind") or "") if isinstance(source, dict) else ""))
    if not pairs:
        raise TrainingError(f"{path}: no usable pairs ({counts})")
    return pairs, counts


def _answer(tokenizer, prompt_ids: list[int], prompt: list[dict], text: str) -> list[int]:
    full, offset = encoding.encode_chat(tokenizer, prompt + [{"role": "assistant", "content": text}], prompt_ids)
    return full[offset:]


def tokenize(tokenizer, pairs: list[Pair], cfg: DPOConfig) -> tuple[list[TokenPair], dict]:
    """Token pairs under the length policy (module docstring) and its counts."""
    out, counts = [], {"truncated": 0, "skipped_too_long": 0}
    for p in pairs:
        prompt = encoding.encode_prompt(tokenizer, p.prompt)
        c, r = _answer(tokenizer, prompt, p.prompt, p.chosen), _answer(tokenizer, prompt, p.prompt, p.rejected)
        if len(prompt) + max(len(c), len(r)) > cfg.max_seq_length:
            if cfg.truncation == "error":
                raise TrainingError(f"pair {p.id} has {len(prompt) + max(len(c), len(r))} tokens, over max_seq_length "
                                    f"{cfg.max_seq_length} (truncation: error)")
            if cfg.truncation == "skip":
                counts["skipped_too_long"] += 1
                continue
            prompt = prompt[-cfg.max_prompt_length:]
            room = cfg.max_seq_length - len(prompt)
            c, r = c[:room], r[:room]
            counts["truncated"] += 1
        out.append(TokenPair(p.id, prompt, c, r, p.group))
    return out, counts


def split(pairs: list[TokenPair], fraction: float) -> tuple[list[TokenPair], list[TokenPair]]:
    """(train, valid) by a hash of the id, so the split does not depend on file order."""
    if fraction <= 0:
        return pairs, []
    cut = int(fraction * 10_000)
    valid = [p for p in pairs if int(records.stable_id(p.id)[:8], 16) % 10_000 < cut]
    keep = {p.id for p in valid}
    return [p for p in pairs if p.id not in keep], valid


# --------------------------------------------------------------------------------------- batches


def pair_batch(pairs: list[TokenPair]) -> tuple[mx.array, ...]:
    """`data.pad_batch` of 2B sequences: the B chosen ones, then the B rejected ones (one forward pass)."""
    seqs = [p.sequences() for p in pairs]
    offsets = [len(p.prompt) for p in pairs]
    return pad_batch([s[0] for s in seqs] + [s[1] for s in seqs], offsets + offsets)


def _key(p: TokenPair) -> str:
    return records.stable_id(p.prompt, p.chosen, p.rejected)


def reference_logps(model, pairs: list[TokenPair], path: Path, batch_size: int,
                    progress: Callable[[int], None] | None = None) -> dict[str, tuple[float, float]]:
    """Reference (chosen, rejected) log-probs per pair id, computed with `model` as it is now (eval mode)
    for pairs not yet in `path` and appended there per batch. A stored row whose tokens changed is an error.
    With several processes, each computes its share of every batch and rank 0's file decides what is done."""
    done = distributed.on_main(lambda: records.load_done(path))
    stale = [p.id for p in pairs if p.id in done and done[p.id].get("key") != _key(p)]
    if stale:
        raise TrainingError(f"{path} holds reference log-probs of other tokens for pair {stale[0]} (changed "
                            "pairs, template or length settings); use a new output folder")
    todo = [p for p in pairs if p.id not in done]
    todo = [todo[i] for i in sorted(range(len(todo)), key=lambda i: (todo[i].length, i))]  # eval_batches' order
    model.eval()
    # One compiled forward per CPU stream (a compiled graph keeps the stream it was traced on); the weights do
    # not change during this pass. Each batch runs as strided slices on parallel streams, as in training.
    n = train_streams()
    forwards = [(backend.cpu_stream(i) if n > 1 else None, mx.compile(partial(answer_logps, model)))
                for i in range(n)]
    with records.writer(path, distributed.is_main()) as writer:
        for batch, rows in distributed.map_chunks(todo, batch_size, partial(_reference_rows, forwards)):
            for row in rows:
                writer.write(row)
                done[row["id"]] = row
            if progress:
                progress(len(batch))
    return {p.id: (done[p.id]["chosen"], done[p.id]["rejected"]) for p in pairs}


def _reference_rows(forwards: list, batch: list[TokenPair]) -> list[dict]:
    slices = strided(batch, len(forwards))
    outs = []
    for (stream, forward), part in zip(forwards, slices):
        with mx.stream(stream) if stream is not None else contextlib.nullcontext():
            outs.append(forward(*pair_batch(part)))
    with backend.blas_threads_per(len(slices)):
        mx.eval(outs)
    rows = {}
    for part, (logps, n) in zip(slices, outs):
        lp, nt = logps.tolist(), n.tolist()
        B = len(part)
        rows.update({p.id: {"id": p.id, "chosen": lp[j], "rejected": lp[B + j], "chosen_tokens": int(nt[j]),
                            "rejected_tokens": int(nt[B + j]), "key": _key(p)} for j, p in enumerate(part)})
    return [rows[p.id] for p in batch]


def make_loss(cfg: DPOConfig):
    """loss_fn(model, tokens (2B, W+1), lengths (2B, 2), positions (K,), rows (K,), ref_chosen (B,),
    ref_rejected (B,)): chosen and rejected sequences in one batch, split after the forward pass."""

    def loss_fn(model, tokens, lengths, positions, rows, ref_chosen, ref_rejected):
        logps, n = answer_logps(model, tokens, lengths, positions, rows)
        B = ref_chosen.shape[0]
        chosen, rejected = logps[:B], logps[B:]
        nll = -chosen / mx.maximum(n[:B], 1) if cfg.nll_alpha else None
        loss, metrics = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=cfg.beta, loss_type=cfg.loss_type,
                                 label_smoothing=cfg.label_smoothing, nll_alpha=cfg.nll_alpha, chosen_nll=nll)
        metrics.update(tokens=lengths[:, 1].sum(), sequences=mx.array(2 * B), examples=mx.array(B))
        return loss, metrics

    return loss_fn


def batch_of(pairs: list[TokenPair], refs: dict, idx: list[int]) -> tuple:
    chosen = [pairs[i] for i in idx]
    return (*pair_batch(chosen), mx.array([refs[p.id][0] for p in chosen], dtype=mx.float32),
            mx.array([refs[p.id][1] for p in chosen], dtype=mx.float32))


# --------------------------------------------------------------------------------------------- run


def policy_adapter(cfg: DPOConfig, model) -> dict:
    """Load the SFT adapter onto `model`, trainable (or add fresh LoRA); returns the output adapter config."""
    if cfg.adapter:
        sft = adapters.load_adapter(model, cfg.adapter, trainable=True)
        keep = ("fine_tune_type", "num_layers", "lora_parameters")
        return {**{k: sft[k] for k in keep if k in sft}, "model": cfg.model,
                "base_model": adapters.base_fingerprint(model), "stage": STAGE, "reference": str(cfg.adapter)}
    adapters.add_lora(model, cfg)
    return adapters.adapter_config(cfg, model, STAGE, reference="base model")


def run(config: DPOConfig, progress: Progress | None = None, *, model=None, tokenizer=None) -> Path:
    """Train the policy with DPO into config.output; returns the output folder.

    `progress` gets the pair counts, Events of the task "reference log-probs" while they are computed, then
    an Event per metrics row (see train.fit). `model`/`tokenizer` may be passed (tests).
    """
    cfg = config
    raw, read_counts = read_pairs(cfg.pairs)
    pairs: list[TokenPair] = []  # all tokenized pairs, in file order: the reference pass's input
    refs: dict[str, tuple[float, float]] = {}  # filled by the reference pass, before any batch is built

    def examples(tok) -> fit.Examples:
        tokenized, length_counts = tokenize(tok, raw, cfg)
        pairs.extend(tokenized)
        if not pairs:
            raise TrainingError(f"no pair fits max_seq_length {cfg.max_seq_length} ({length_counts})")
        train_pairs, valid_pairs = split(pairs, cfg.valid_fraction)
        if not train_pairs:
            raise TrainingError("valid_fraction left no training pairs")
        return fit.Examples(train_pairs, valid_pairs, lambda p: p.length, {
            "pairs": read_counts, "length_policy": length_counts, "train_pairs": len(train_pairs),
            "valid_pairs": len(valid_pairs)}, unit="pairs",
            group=(lambda p: p.group) if cfg.batch_mix == "groups" else None)

    def reference(model, out: Path) -> dict:
        """Reference log-probs with the SFT adapter as loaded: before the checkpoint and any step."""
        t0, emit = time.perf_counter(), emitter(progress)

        def tick(n: int) -> None:
            emit(Event("reference log-probs", advance=n, total=len(pairs)))

        with fastmath.mlx_lm_cpu_ops():
            refs.update(reference_logps(model, pairs, out / "ref_logps.jsonl", cfg.batch_size, tick))
        return {"reference_seconds": round(time.perf_counter() - t0, 2)}

    def throughput(done: fit.Trained) -> dict:
        trained = sum(r.get("examples", 0) for r in records.read_jsonl(done.out / "metrics.jsonl")
                      if r.get("step", 0) > done.first_step and "loss" in r)
        return {"train_seconds": round(done.seconds, 2),
                "pairs_per_second": round(trained / done.seconds, 3) if done.seconds else None}

    return fit.fit(cfg, STAGE, adapter=partial(policy_adapter, cfg), examples=examples, loss_fn=make_loss(cfg),
                   batch=lambda part, idx: batch_of(part, refs, idx), mean_over="examples",
                   before_training=reference, end_summary=throughput, progress=progress,
                   model=model, tokenizer=tokenizer)
