"""Crash-resume check: SIGKILL a run at seeded random moments, resume it each time, compare with a clean run.

    python scripts/crash_resume.py                          # both jobs, 5 kills each (a few minutes per job)
    python scripts/crash_resume.py --job block --kills 8 --seed 3 --json crash.json

Jobs (small configurations, each a real CLI run in its own process group):
  block   train_block.py --demo on the shipped codec LM: 48 teacher samples, 60 steps, a checkpoint every
          ~0.3 s; resumed with --resume
  build   scripts/build_demo.py --quick (corpus -> codec -> judge -> lm); resumed by running it again

For each job: one uninterrupted run (its wall time T, its first save after S), then a second run killed
`--kills` times, each attempt after a delay drawn uniformly from [S / 2, S + (T - S) / (kills + 1)] (late
startup and the work after it), or as soon as it has saved its share of the work (attempt i: (i + 1) /
(kills + 1) of it), then resumed to the end.
Every file of the two runs is compared: safetensors tensor by tensor (bit-exact), JSON and JSON lines with
the timing and path keys left out, logs only for existence (they hold timings). Any *.tmp / *.old file or
directory left is reported.
"""

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
VOLATILE = frozenset({"minutes", "out_dir"})  # JSON keys of wall-clock figures and of the run's own path


@dataclass
class Job:
    name: str  # "block" or "build"
    command: list[str]  # the first run's command
    resume: list[str]  # the command that continues after a kill
    dirs: list[Path]  # the directories it writes (compared, and checked for leftovers)
    probe: Callable[[], str]  # what the run has saved so far (reported at each kill)
    done: Callable[[], float]  # the fraction of the work saved so far, in [0, 1]


@dataclass
class Kill:
    delay: float  # seconds after the attempt's start
    killed: bool  # False: the attempt finished before its delay ran out
    saved: str  # the run's saved progress right after the kill
    by: str  # "delay", or "budget": the attempt saved its share of the work first (see `interrupted_run`)
    seconds: float  # when it was killed, after the attempt's start


# ----- jobs -----
def block_job(root: Path, steps: int = 60) -> Job:
    out = root / "block"
    cmd = [sys.executable, str(ROOT / "train_block.py"), "--demo", "--out-dir", str(out), "--block-size", "4",
           "--steps", str(steps), "--batch-size", "4", "--pool-size", "48", "--pool-batch", "16",
           "--max-new-tokens", "48", "--eval-sequences", "6", "--eval-every", "20", "--log-every", "5",
           "--warmup-steps", "5", "--checkpoint-minutes", "0.005", "--no-progress"]  # fmt: skip
    return Job("block", cmd, cmd + ["--resume"], [out], lambda: block_progress(out), lambda: block_done(out, steps))


def block_done(out: Path, steps: int) -> float:
    state = out / "checkpoint" / "state.json"
    return json.loads(state.read_text())["step"] / steps if state.is_file() else 0.0


def block_progress(out: Path) -> str:
    state = out / "checkpoint" / "state.json"
    if (out / "adapter").is_dir():
        return "adapter saved"
    if state.is_file():
        return f"checkpoint at step {json.loads(state.read_text())['step']}"
    return "pool saved, no checkpoint" if (out / "pool.json").is_file() else "nothing saved"


def build_job(root: Path) -> Job:
    out, work = root / "out", root / "work"
    cmd = [sys.executable, str(ROOT / "scripts" / "build_demo.py"), "--quick", "--out", str(out), "--work", str(work)]
    return Job("build", cmd, cmd, [out, work], lambda: build_progress(out, work), lambda: build_done(out, work))


def build_done(out: Path, work: Path) -> float:
    """Quick build: a quarter each for the corpus (6 shards), the codec, the judge (60 steps), the LM (120)."""
    parts = [
        len(list((work / "corpus").glob("shard-*.safetensors"))) / 6,
        (out / "codec" / "model.safetensors").is_file(),
    ]
    for stage, steps in (("judge", 60), ("lm", 120)):
        ckpt = work / stage / "ckpt.json"
        parts.append(1.0 if (out / stage / "model.safetensors").is_file() else
                     json.loads(ckpt.read_text())["step"] / steps if ckpt.is_file() else 0.0)  # fmt: skip
    return sum(parts) / 4


def build_progress(out: Path, work: Path) -> str:
    done = [s for s in ("codec", "judge", "lm") if (out / s / "model.safetensors").is_file()]
    shards = len(list((work / "corpus").glob("shard-*.safetensors")))
    steps = {s: json.loads(p.read_text())["step"] for s in ("judge", "lm") if (p := work / s / "ckpt.json").is_file()}
    return f"{shards} corpus shard(s), stages done {done or 'none'}, checkpoints {steps or 'none'}"


# ----- running -----
def environment() -> dict:
    """This checkout first on the path, one thread per process."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1")


def run_to_end(cmd: list[str], log: Path, probe: Callable[[], str] | None = None) -> tuple[float, float | None]:
    """Run `cmd` to completion (its output appended to `log`): (wall time, seconds until `probe` first changed,
    i.e. the run's first save; None without a probe). A failure raises."""
    start, first_save = time.perf_counter(), None
    initial = probe() if probe else None
    with open(log, "a") as f:
        proc = subprocess.Popen(cmd, env=environment(), cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
        while proc.poll() is None:
            if probe and first_save is None and probe() != initial:
                first_save = time.perf_counter() - start
            time.sleep(0.2)
    if proc.returncode != 0:
        raise subprocess.CalledProcessError(proc.returncode, cmd)
    return time.perf_counter() - start, first_save


def run_and_kill(cmd: list[str], delay: float, log: Path, stop: Callable[[], bool]) -> tuple[str, float] | None:
    """Start `cmd` in its own process group; SIGKILL the whole group (workers too) after `delay` seconds or as
    soon as `stop()` holds: (which fired, seconds after the start). None if it finished first (failure raises)."""
    start = time.perf_counter()
    with open(log, "a") as f:
        proc = subprocess.Popen(cmd, env=environment(), cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
        while proc.poll() is None:
            elapsed = time.perf_counter() - start
            by = "delay" if elapsed >= delay else "budget" if stop() else None
            if by:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return by, round(elapsed, 2)
            time.sleep(0.05)
    if proc.returncode != 0:
        raise subprocess.CalledProcessError(proc.returncode, cmd)
    return None


def kill_delays(kills: int, seconds: float, first_save: float, seed: int) -> list[float]:
    """Seeded delays in [S / 2, S + (T - S) / (kills + 1)], T the clean run's time and S its time to a first
    save (startup: imports, teacher pool or corpus): kills land in the end of startup and in the work after it,
    and together they leave the work unfinished (on average half of it: resumed attempts start faster than S)."""
    rng = random.Random(seed)
    hi = first_save + (seconds - first_save) / (kills + 1)
    return [round(rng.uniform(first_save / 2, hi), 2) for _ in range(kills)]


def interrupted_run(job: Job, delays: list[float], log: Path) -> tuple[list[Kill], float]:
    """Kill `job` after each delay in turn (resuming after the first), then resume it to the end. Attempt i is
    killed early once the run has saved (i + 1) / (kills + 1) of the work (`job.done`) and something since its
    start: under a changing load a delay can outlast the work left, and every kill must land before the end."""
    kills, start = [], time.perf_counter()
    for i, delay in enumerate(delays):
        budget, before = (i + 1) / (len(delays) + 1), job.done()
        stop = lambda b=budget, a=before: job.done() >= b and job.done() > a  # noqa: E731 (and saved something new)
        fired = run_and_kill(job.command if i == 0 else job.resume, delay, log, stop)
        by, seconds = fired if fired else ("finished", 0.0)
        kills.append(Kill(delay, fired is not None, job.probe(), by, seconds))
        if fired is None:
            break
    if kills[-1].killed:
        run_to_end(job.resume, log)
    return kills, time.perf_counter() - start


# ----- comparing -----
def leftovers(directory: Path) -> list[str]:
    """Temporary or swapped-out files and directories (*.tmp, *.old, *.tmp-<tag>, *.old-<tag>) under `directory`."""
    marks = (".tmp", ".old")
    return sorted(
        str(p.relative_to(directory))
        for p in directory.rglob("*")
        if p.name.endswith(marks) or any(m + "-" in p.name for m in marks)
    )


def files(directory: Path) -> set[str]:
    return {str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file()}


def drop_keys(value, keys=VOLATILE):
    """`value` (parsed JSON) without the dict entries named in `keys`, at any depth."""
    if isinstance(value, dict):
        return {k: drop_keys(v, keys) for k, v in value.items() if k not in keys}
    if isinstance(value, list):
        return [drop_keys(v, keys) for v in value]
    return value


def read_json(path: Path):
    """A JSON file, or a JSON-lines file as its list of lines."""
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines()]
    return json.loads(path.read_text())


def compare_file(a: Path, b: Path) -> str:
    """'bit-exact', 'equal but minutes' (JSON equal once the VOLATILE keys that differ, named, are dropped), 'log'
    (not compared: timings), or 'differs: ...'. Unreadable contents raise (safetensors / JSON errors)."""
    if a.suffix == ".safetensors":
        x, y = load_file(str(a)), load_file(str(b))
        if x.keys() != y.keys():
            return f"differs: tensors {sorted(x.keys() ^ y.keys())[:3]}"
        bad = [k for k in x if x[k].dtype != y[k].dtype or x[k].shape != y[k].shape or not x[k].equal(y[k])]
        return f"differs: tensors {bad[:3]}" if bad else "bit-exact"
    if a.suffix in (".json", ".jsonl"):
        x, y = read_json(a), read_json(b)
        if x == y:
            return "bit-exact"
        if drop_keys(x) != drop_keys(y):
            return "differs: JSON contents"
        others = lambda k: VOLATILE - {k}  # noqa: E731
        return "equal but " + "/".join(
            k for k in sorted(VOLATILE) if drop_keys(x, others(k)) != drop_keys(y, others(k))
        )
    if a.suffix == ".log":
        return "log"
    return "bit-exact" if a.read_bytes() == b.read_bytes() else "differs: bytes"


def compare_dirs(reference: Path, resumed: Path) -> dict:
    """{relative path: verdict} over both directories' files; a file only one of them has is reported."""
    ref, res = files(reference), files(resumed)
    verdicts = {f: compare_file(reference / f, resumed / f) for f in sorted(ref & res)}
    verdicts |= {f: "only in the clean run" for f in ref - res} | {f: "only in the resumed run" for f in res - ref}
    return dict(sorted(verdicts.items()))


def check_job(make_job: Callable[[Path], Job], root: Path, kills: int, seed: int) -> dict:
    """The whole comparison for one job under `root` (clean/ and killed/ runs, logs beside them)."""
    for d in ("clean", "killed"):  # this script's own runs of an earlier call
        shutil.rmtree(root / d, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    for log in ("clean.log", "killed.log"):
        (root / log).unlink(missing_ok=True)
    clean, killed = make_job(root / "clean"), make_job(root / "killed")
    reference_seconds, first_save = run_to_end(clean.command, root / "clean.log", clean.probe)
    delays = kill_delays(kills, reference_seconds, first_save or 0.0, seed)
    events, seconds = interrupted_run(killed, delays, root / "killed.log")
    verdicts = {}
    for a, b in zip(clean.dirs, killed.dirs, strict=True):
        verdicts |= {f"{a.name}/{f}": v for f, v in compare_dirs(a, b).items()}
    return {
        "job": clean.name,
        "seed": seed,
        "clean_seconds": round(reference_seconds, 1),
        "clean_first_save_seconds": round(first_save or 0.0, 1),
        "killed_seconds": round(seconds, 1),
        "kills": [vars(k) for k in events if k.killed],
        "finished_before_kill": [vars(k) for k in events if not k.killed],
        "files": verdicts,
        "leftovers": [f"{d.name}/{p}" for d in killed.dirs for p in leftovers(d)],
        "ok": ok(verdicts) and not any(leftovers(d) for d in killed.dirs),
    }


def ok(verdicts: dict) -> bool:
    return all(v in ("bit-exact", "log") or v.startswith("equal but ") for v in verdicts.values())


def table(report: dict) -> str:
    counts: dict[str, int] = {}
    for v in report["files"].values():
        counts[v] = counts.get(v, 0) + 1
    moments = ", ".join(f"{k['seconds']:.1f} s by {k['by']} ({k['saved']})" for k in report["kills"])
    lines = [
        f"### {report['job']}: {len(report['kills'])} kills, {'PASS' if report['ok'] else 'FAIL'}",
        "",
        f"clean run {report['clean_seconds']} s (first save after {report['clean_first_save_seconds']} s), killed +"
        f" resumed {report['killed_seconds']} s; seed {report['seed']}",
        f"kill moments (after each attempt's start): {moments}",
        f"files compared: {len(report['files'])}: " + ", ".join(f"{n} {v}" for v, n in sorted(counts.items())),
        f"leftover temporary files: {report['leftovers'] or 'none'}",
    ]
    lines += [f"- {f}: {v}" for f, v in report["files"].items() if v not in ("bit-exact", "log")]
    return "\n".join(lines)


JOBS = {"block": block_job, "build": build_job}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--job", choices=sorted(JOBS), action="append", help="repeatable (default: both)")
    p.add_argument("--kills", type=int, default=5, help="SIGKILLs per job")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    p.add_argument("--workdir", type=Path, default=Path("runs/crash"), help="runs and their logs go here")
    p.add_argument("--json", type=Path, help="write the reports here")
    args = p.parse_args(argv)
    if args.kills < 1:
        p.error(f"--kills must be >= 1, got {args.kills}")
    reports = []
    for name in args.job or ["block", "build"]:
        report = check_job(JOBS[name], args.workdir / name, args.kills, args.seed)
        print(table(report), flush=True)
        reports.append(report)
    if args.json:
        args.json.write_text(json.dumps(reports, indent=1) + "\n")
    return 0 if all(r["ok"] for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
