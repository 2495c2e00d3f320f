"""`make demo`: the main job on the embedded default model, offline.

Until the end-to-end pipeline (`mlx-cai run configs/demo.yaml`) lands, the demo shows what exists: the
embedded SmolLM2-135M answering a few shipped prompts (harmful and benign eval prompts), with the keyword
refusal judge's verdict, written to runs/demo/generate.jsonl (rerunning continues it).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from mlx_cai import models, refusal, ui
from mlx_cai.generate import SamplingConfig
from mlx_cai.stages import generation

DATA = Path(__file__).resolve().parent.parent / "data"
OUT = Path("runs/demo/generate.jsonl")


def _sample(name: str, n: int) -> list[generation.PromptItem]:
    rows = [json.loads(line) for line in (DATA / name).read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r["split"] == "eval"]
    step = max(1, len(rows) // n)
    return [generation.PromptItem(r["id"], [{"role": "user", "content": r["prompt"]}]) for r in rows[::step][:n]]


def main() -> None:
    ui.note("[bold]mlx-cai demo[/] — embedded model, offline. The full CAI pipeline is not built yet, so this "
            "demo shows the model answering shipped eval prompts, judged by the keyword refusal judge.")
    items = _sample("harmful.jsonl", 6) + _sample("benign.jsonl", 4)
    todo, done = generation.pending(items, OUT)
    t0 = time.perf_counter()
    model, tok = models.load(models.DEFAULT_MODEL)
    ui.note(f"model {models.DEFAULT_MODEL} loaded in {time.perf_counter() - t0:.1f}s "
            f"({'float32, dequantized' if model.mlx_cai_info.dequantized else 'as stored'})")
    cfg = SamplingConfig(max_tokens=96, temperature=0.0, repetition_penalty=1.1)
    with ui.progress("generate", total=len(items), done=len(done)) as (bar, _, rate):
        generation.run(model, tok, todo, OUT, cfg, batch_size=16, on_record=lambda r: bar.tick(1),
                       on_tokens=lambda n: bar.tick(0, n))
    recs = {r["id"]: r for r in (json.loads(x) for x in OUT.read_text().splitlines() if x.strip())}
    rows = []
    for it in items:
        r = recs[it.id]
        kind = "harmful" if it.id.startswith("harm") else "benign"
        rows.append([kind, it.prompt[:60], r["response"][:90].replace("\n", " "),
                     "refused" if refusal.is_refusal(r["response"]) else "answered"])
    ui.out.print(ui.table("embedded model on shipped eval prompts", ["set", "prompt", "response", "keyword judge"], rows))
    harm = [r for r in rows if r[0] == "harmful"]
    asr = sum(r[3] == "answered" for r in harm) / len(harm)
    ui.note(f"keyword ASR on these {len(harm)} harmful prompts: {asr:.0%}. Records: {OUT}")


if __name__ == "__main__":
    main()
