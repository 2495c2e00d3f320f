"""Chaos harness (#18): the pipeline killed at random moments and rerun until it finishes gives what an
uninterrupted run gives; Ctrl-C stops it with one line and a rerun resumes.

    .venv/bin/python bench/chaos.py --kills 20                 # the full harness (a few minutes on 2 cores)
    .venv/bin/python bench/chaos.py --kills 3 --sigints 1      # what tests/test_chaos.py runs
    .venv/bin/python bench/chaos.py --sweep                    # a kill inside every file write, once each

1. Run A: `mlx-cai run` on a tiny random llama (tests/tinymodels.py) with tiny sizes (4 prompts, 3 SFT and 3 DPO
   steps, 2 x 2 eval prompts), uninterrupted, counting its file writes by stage (bench/chaos_child.py).
2. Trials B1, B2, ...: a fresh run folder and MLX_CAI_HOME (so the model conversion is killed too). The same command
   is started again and again, each time killed with SIGKILL in one of the next three stages not yet done:
     clock  a random delay (up to 1.5x that stage's time in A) after the stage's `stage i/n` line
     write  inside the N-th file write of that stage, drawn among the writes A made there, a kind first
            (chaos_child.py: half a JSONL line, half a safetensors file, just before or after a rename, a
            half-removed folder)
   After every kill each file under its final name must be whole (chaos_compare.torn), and every start must end
   by the kill or with exit code 0. Once --kills kills are done, the trial runs to the end, once more (everything
   must be skipped), and is compared with A (chaos_compare.differences); a trial that finishes early is followed
   by a new one.
3. --sigints trials: SIGINT a random time into a stage: exit code != 0, one `error: interrupted` line, no traceback;
   the rerun finishes and matches A.
4. --sweep instead kills inside every file write of run A once (a fresh folder each), reruns and compares.
The stage of a kill is the first one without its stages/*.json marker afterwards. Seeded (--seed): the same draws
each time. Prints the result; --markdown FILE writes it as a BENCHMARKS.md section, --json FILE the raw results.
Exit code 0 when every trial matched A and nothing torn was found.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

import chaos_compare  # noqa: E402

STAGES = ("revise", "clean", "sft", "feedback", "dpo", "eval-base", "eval-sft", "eval-dpo", "report")
CLI = "import sys; from mlx_cai.cli import main; sys.argv[0] = 'mlx-cai'; main()"
START = re.compile(r"stage \d+/\d+: (\S+)")


def tiny_config(runs: Path, model: Path) -> dict:
    return {
        "name": "t", "model": str(model), "seed": 0, "runs_dir": str(runs),
        "revise": {"prompts": "train:harmful", "limit": 4, "shots": 1, "max_tokens": 8, "batch_size": 2,
                   "temperature": 1.0},
        "clean": {"helpful": "train:benign", "helpful_ratio": 1.0, "helpful_max_tokens": 8, "rules": ["emoji"],
                  "valid_fraction": 0.25},
        "sft": {"iters": 3, "batch_size": 2, "max_seq_length": 512, "steps_per_eval": 2, "steps_per_save": 1,
                "lora_layers": 1},
        "feedback": {"mode": "revision", "max_similarity": 1.0, "max_repetition": 1.0},
        "dpo": {"iters": 3, "batch_size": 1, "max_seq_length": 512, "max_prompt_length": 256, "steps_per_eval": 2,
                "steps_per_save": 1},
        "eval": {"suites": ["harm", "benign"], "limit": 2, "max_tokens": 6, "batch_size": 1},
    }


class Folder:
    """One run folder with its own MLX_CAI_HOME and config: the command that runs it, and what it holds."""

    def __init__(self, work: Path, name: str, model: Path):
        self.base = work / name
        self.base.mkdir(parents=True)
        self.config = self.base / "run.yaml"
        self.config.write_text(yaml.safe_dump(tiny_config(self.base / "runs", model)))
        self.run_dir = self.base / "runs" / "t"
        self.env = {**os.environ, "MLX_CAI_HOME": str(self.base / "home"), "HF_HUB_OFFLINE": "1",
                    "MLX_CAI_BLAS_THREADS": "1", "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}

    def done(self) -> set[str]:
        return {s for s in STAGES if (self.run_dir / "stages" / f"{s}.json").is_file()}

    def running(self) -> str:
        """The stage a kill came in: the first without its marker."""
        return next((s for s in STAGES if s not in self.done()), "after report")

    def start(self, child: list[str] | None = None) -> "Proc":
        args = ["run", str(self.config)]
        cmd = [sys.executable, str(HERE / "chaos_child.py"), *child, "--", *args] if child else \
            [sys.executable, "-c", CLI, *args]
        return Proc(cmd, self.env)


class Proc:
    """A child process whose merged output is read as it comes (stage start lines time-stamped)."""

    def __init__(self, cmd: list[str], env: dict):
        self.p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
                                  errors="replace", cwd=HERE.parent)
        self.lines: list[str] = []
        self.started: dict[str, float] = {}
        self.seen = threading.Condition()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.p.stdout:
            with self.seen:
                self.lines.append(line)
                m = START.search(line)
                if m:
                    self.started[m.group(1)] = time.monotonic()
                self.seen.notify_all()
        with self.seen:
            self.seen.notify_all()

    def wait_start(self, stage: str, timeout: float = 300) -> bool:
        """True once `stage` started; False when the process ended first."""
        with self.seen:
            return self.seen.wait_for(lambda: stage in self.started or self.p.poll() is not None, timeout) and \
                stage in self.started

    def wait(self, timeout: float = 600) -> int:
        rc = self.p.wait(timeout)
        self.reader.join(5)
        return rc

    @property
    def output(self) -> str:
        return "".join(self.lines)


def count_writes(log: Path) -> dict[str, list[dict]]:
    """The file writes of a run, by stage, in order (each with its number `n` within the stage and its kind)."""
    writes: dict[str, list[dict]] = {}
    for line in log.read_text().splitlines():
        w = json.loads(line)
        writes.setdefault(w["stage"], []).append(w)
    return writes


def draw_write(rng: random.Random, writes: list[dict]) -> int:
    """The number of a write to die in: a kind of write drawn first (so rarer kinds get hit too), then one of it."""
    kind = rng.choice(sorted({w["kind"] for w in writes}))
    return rng.choice([w["n"] for w in writes if w["kind"] == kind])


def machine() -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() \
        else platform.processor()
    return f"{cpu}, {os.cpu_count()} cores"


def finish(folder: Folder, rec: dict, again: bool = True) -> dict:
    """Run a trial's folder to the end, (`again`) once more: nothing may be redone; then check it; fills `rec`."""
    p = folder.start()
    rc = p.wait()
    if rc != 0:
        rec["failures"].append(f"final rerun exited {rc}: {p.output[-800:]}")
        return rec
    rerun = folder.start() if again else None
    if rerun is not None and (rerun.wait() != 0 or rerun.started):
        rec["failures"].append(f"a rerun of the finished run redid {sorted(rerun.started)}")
    rec["failures"] += chaos_compare.unfinished(folder.run_dir)
    return rec


def kill_trial(folder: Folder, rng: random.Random, kills_left: int, writes: dict, durations: dict,
               write_share: float, log) -> dict:
    """Start, kill, check, again, until `kills_left` kills are done or the run finished; then finish it."""
    rec = {"name": folder.base.name, "kills": [], "failures": [], "starts": 0}
    t0 = time.monotonic()
    while len(rec["kills"]) < kills_left and rec["starts"] < 3 * kills_left + 5:
        todo = [s for s in STAGES if s not in folder.done()]
        if not todo:
            break
        stage = rng.choice(todo[:3])  # near the front: the kills walk through every stage
        mode = "write" if writes.get(stage) and rng.random() < write_share else "clock"
        wlog = folder.base / f"kill-{rec['starts']}.log"
        rec["starts"] += 1
        if mode == "write":
            n = draw_write(rng, writes[stage])
            p = folder.start([str(wlog), f"{stage}:{n}"])
            rc = p.wait()
        else:
            delay = rng.uniform(0, 1.5 * max(durations.get(stage, 0.1), 0.05))
            p = folder.start()
            if p.wait_start(stage):
                time.sleep(delay)
            if p.p.poll() is None:
                p.p.send_signal(signal.SIGKILL)
            rc = p.wait()
        if rc not in (0, -signal.SIGKILL):
            rec["failures"].append(f"start {rec['starts']} ({mode} kill in {stage}) exited {rc}: {p.output[-800:]}")
            break
        if rc == 0:  # it finished before the kill came
            continue
        kill = {"mode": mode, "target": stage, "stage": folder.running()}
        if mode == "write" and wlog.exists():
            hit = json.loads(wlog.read_text().splitlines()[-1])
            kill.update(stage=hit["stage"], kind=_kind(hit), path=_rel(hit["path"], folder))
        elif mode == "clock":
            kill["delay"] = round(delay, 3)
        rec["kills"].append(kill)
        log(f"  {folder.base.name} kill {len(rec['kills'])}: {mode} in {kill['stage']}"
            + (f" ({kill['kind']} {kill['path']})" if "kind" in kill else f" (+{kill['delay']} s)"))
        torn = chaos_compare.torn(folder.run_dir) + [f"home: {t}" for t in chaos_compare.torn(folder.base / "home")]
        if torn:
            rec["failures"].append(f"after kill {len(rec['kills'])}: torn {torn}")
    if not any(f.startswith("start ") for f in rec["failures"]):
        finish(folder, rec)
    rec["seconds"] = round(time.monotonic() - t0, 1)
    return rec


def _kind(hit: dict) -> str:
    if hit["kind"] == "replace":
        return "before rename" if hit["n"] % 2 else "after rename"
    return {"jsonl": "half a JSONL line", "safetensors": "half a safetensors file",
            "rmtree": "half-removed folder"}[hit["kind"]]


def _rel(path: str, folder: Folder) -> str:
    for root, tag in ((folder.run_dir, ""), (folder.base / "home", "home/")):
        if path.startswith(str(root)):
            return tag + os.path.relpath(path, root)
    return path


def sigint_trial(folder: Folder, rng: random.Random, durations: dict, log) -> dict:
    """Ctrl-C a random moment into a random stage: one line, exit code != 0; then the rerun finishes."""
    stage = rng.choice(STAGES[:-1])
    rec = {"name": folder.base.name, "target": stage, "failures": []}
    t0 = time.monotonic()
    p = folder.start()
    if p.wait_start(stage):
        time.sleep(rng.uniform(0, 1.5 * max(durations.get(stage, 0.1), 0.05)))
    if p.p.poll() is None:
        p.p.send_signal(signal.SIGINT)
    rc = p.wait()
    errors = [ln for ln in p.output.splitlines() if ln.startswith("error")]
    rec.update(rc=rc, stage=folder.running(), message=errors[-1] if errors else "")
    if rc == 0:
        rec["note"] = "finished before the SIGINT came"
    elif rc != 130 or len(errors) != 1 or "interrupted" not in errors[0] or "Traceback" in p.output:
        rec["failures"].append(f"SIGINT: exit {rc}, output tail {p.output[-600:]!r}")
    log(f"  {folder.base.name}: SIGINT in {rec['stage']}: exit {rc}, {rec['message'] or 'no message'}")
    finish(folder, rec)
    rec["seconds"] = round(time.monotonic() - t0, 1)
    return rec


def uninterrupted(work: Path) -> tuple[Path, Folder, dict, dict]:
    """(model, run A, its writes by stage, its stage seconds): the tiny model and the run everything is compared to."""
    from tinymodels import write_tiny_gguf

    model = work / "tiny-llama.gguf"
    write_tiny_gguf(model, {})
    a = Folder(work, "A", model)
    p = a.start([str(a.base / "writes.log"), "-"])
    if p.wait() != 0:
        raise SystemExit(f"the uninterrupted run failed:\n{p.output[-2000:]}")
    durations = {s: json.loads((a.run_dir / "stages" / f"{s}.json").read_text())["seconds"] for s in STAGES}
    return model, a, count_writes(a.base / "writes.log"), durations


def sweep(work: Path, log=print) -> dict:
    """Every file write of run A in turn: a fresh folder killed inside it, rerun, compared with A."""
    t0 = time.monotonic()
    model, a, writes, _ = uninterrupted(work)
    results = []
    for stage in STAGES:
        for w in writes.get(stage, []):
            folder = Folder(work, f"S-{stage}-{w['n']}", model)
            p = folder.start([str(folder.base / "kill.log"), f"{stage}:{w['n']}"])
            rc = p.wait()
            rec = {"stage": stage, "n": w["n"], "kind": _kind(w), "path": _rel(w["path"], a), "rc": rc,
                   "failures": [] if rc == -signal.SIGKILL else [f"exited {rc}, not killed"]}
            rec["failures"] += [f"torn: {t}" for t in chaos_compare.torn(folder.run_dir)]
            finish(folder, rec, again=False)
            if not rec["failures"]:
                rec["failures"] = chaos_compare.differences(a.run_dir, folder.run_dir)
            results.append(rec)
            log(f"  {stage} write {w['n']} ({rec['kind']} {rec['path']}): "
                f"{'ok' if not rec['failures'] else rec['failures'][:2]}")
            if not rec["failures"]:
                shutil.rmtree(folder.base)
    return {"sweep": results, "seconds": round(time.monotonic() - t0, 1), "machine": machine(),
            "date": time.strftime("%Y-%m-%d"), "ok": all(not r["failures"] for r in results)}


def run(kills: int, sigints: int, seed: int, work: Path, write_share: float = 0.5, log=print) -> dict:
    rng = random.Random(seed)
    t0 = time.monotonic()
    model, a, writes, durations = uninterrupted(work)
    log(f"A (uninterrupted): {sum(durations.values()):.1f} s in stages; file writes by stage: "
        f"{ {s: len(w) for s, w in writes.items()} }")
    trials, left = [], kills
    while left > 0:
        folder = Folder(work, f"B{len(trials) + 1}", model)
        rec = kill_trial(folder, rng, left, writes, durations, write_share, log)
        trials.append(rec)
        left -= len(rec["kills"])
        if rec["failures"] and not rec["kills"]:
            break
    ints = [sigint_trial(Folder(work, f"C{i + 1}", model), rng, durations, log) for i in range(sigints)]
    for rec in trials + ints:
        if not any(f.startswith(("start ", "final rerun")) for f in rec["failures"]):
            rec["differences"] = chaos_compare.differences(a.run_dir, work / rec["name"] / "runs" / "t")
        rec["identical"] = not rec["failures"] and not rec.get("differences", ["not compared"])
    return {"seed": seed, "kills": kills, "write_share": write_share, "trials": trials, "sigints": ints,
            "a_stage_seconds": durations, "writes": {s: len(w) for s, w in writes.items()}, "seconds": round(time.monotonic() - t0, 1),
            "machine": machine(), "date": time.strftime("%Y-%m-%d"),
            "ok": all(r["identical"] for r in trials + ints)}


def markdown(res: dict) -> str:
    kills = [k for t in res["trials"] for k in t["kills"]]
    by_stage = Counter(k["stage"] for k in kills)
    lines = ["## Chaos: SIGKILL and Ctrl-C at random moments (#18)", "",
             f"`.venv/bin/python bench/chaos.py --kills {res['kills']} --seed {res['seed']}` on {res['date']} "
             f"({res['machine']}), {res['seconds'] / 60:.1f} min wall time in all. The tiny random llama, tiny sizes "
             "(4 prompts, 3 SFT and 3 DPO steps, a checkpoint per step, 2 x 2 eval prompts per model). "
             "Each trial: a fresh folder, started again and again, each start killed with SIGKILL (by the clock a "
             "random time into a stage, or inside a file write), then run to the end and compared with an "
             "uninterrupted run: every JSONL record by id, JSON summaries and markers, config.yaml, adapters "
             "and the latest checkpoints within 1e-4 (timing fields ignored).", "",
             "| trial | kills | stages killed in | kills inside a write | starts | identical | wall s |",
             "|---|---|---|---|---|---|---|"]
    for t in res["trials"]:
        stages = Counter(k["stage"] for k in t["kills"])
        inside = Counter(k["kind"] for k in t["kills"] if "kind" in k)
        lines.append(f"| {t['name']} | {len(t['kills'])} | {_counts(stages)} | {_counts(inside) or '-'} | "
                     f"{t['starts'] + 2} | {'yes' if t['identical'] else 'NO'} | {t['seconds']} |")
    lines += ["", "| stage | kills | by the clock | inside a write |", "|---|---|---|---|"]
    for s in [*STAGES, "after report"]:
        if by_stage.get(s):
            ks = [k for k in kills if k["stage"] == s]
            lines.append(f"| {s} | {len(ks)} | {sum(k['mode'] == 'clock' for k in ks)} | "
                         f"{', '.join(sorted({k['kind'] + ' (' + k['path'] + ')' for k in ks if 'kind' in k})) or '-'} |")
    if res["sigints"]:
        lines += ["", "| Ctrl-C trial | stage | exit code | message | rerun identical |", "|---|---|---|---|---|"]
        for t in res["sigints"]:
            lines.append(f"| {t['name']} | {t['stage']} | {t['rc']} | `{t['message']}` | "
                         f"{'yes' if t['identical'] else 'NO'} |")
    fails = [f for t in res["trials"] + res["sigints"] for f in t["failures"] + t.get("differences", [])]
    lines += ["", "Result: " + ("every trial identical to the uninterrupted run; no torn file under its final name "
                                "after any kill." if res["ok"] else f"FAILED: {fails[:5]}"), ""]
    return "\n".join(lines)


def sweep_markdown(res: dict) -> str:
    rows = res["sweep"]
    by = Counter((r["stage"], not r["failures"]) for r in rows)
    lines = ["## Chaos sweep: a kill inside every file write (#18)", "",
             f"`.venv/bin/python bench/chaos.py --sweep` on {res['date']} ({res['machine']}), "
             f"{res['seconds'] / 60:.1f} min: for each of the {len(rows)} file writes of the tiny run, a fresh folder "
             "killed inside it, rerun to the end and compared with the uninterrupted run.", "",
             "| stage | writes | identical | kinds |", "|---|---|---|---|"]
    for s in STAGES:
        mine = [r for r in rows if r["stage"] == s]
        if mine:
            lines.append(f"| {s} | {len(mine)} | {by[(s, True)]} | {_counts(Counter(r['kind'] for r in mine))} |")
    bad = [f"{r['stage']} write {r['n']}: {r['failures'][0]}" for r in rows if r["failures"]]
    lines += ["", "Result: " + ("every kill point gave the uninterrupted run's results." if not bad else
                                f"FAILED at {len(bad)}: {bad[:5]}"), ""]
    return "\n".join(lines)


def _counts(c: Counter) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(c.items()))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=20, help="SIGKILLs in all (default 20)")
    ap.add_argument("--sigints", type=int, default=2, help="Ctrl-C trials (default 2)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--write-share", type=float, default=0.5, help="share of kills inside a file write")
    ap.add_argument("--work", type=Path, help="work folder (default: a new temporary one, kept)")
    ap.add_argument("--markdown", type=Path, help="write the result table here")
    ap.add_argument("--json", type=Path, help="write the raw results here")
    ap.add_argument("--sweep", action="store_true", help="instead: kill inside every file write of the run once "
                                                         "(~10 s each, ~20 min on 2 cores)")
    args = ap.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="mlx-cai-chaos-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"work folder: {work}")
    res = sweep(work) if args.sweep else run(args.kills, args.sigints, args.seed, work, args.write_share)
    text = sweep_markdown(res) if args.sweep else markdown(res)
    print(text)
    if args.markdown:
        args.markdown.write_text(text)
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
