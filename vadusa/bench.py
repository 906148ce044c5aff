"""A/B harness: every decoder on the same texts with the same seeds, rows interleaved, one report.

    report = run_benchmark(task, parse_configs("ar; vadusa:tolerance=1|2|3|4"), repeats=3)
    write_report(report, out_dir)   # report.json, report.md, pareto.png (atomic writes)

Rows are built through `vadusa.decoders.build_decoder`, so every registered decoder can be compared.
The baselines `hf-generate` (transformers' generate) and `ar` (generate_ar) are always part of a run:
speed-ups are ratios of tokens per second measured in the same process, on the same texts and seeds.

report.json schema (stable; extra keys may be added, none removed):
    machine   {"cpu", "cores", "torch", "transformers", "threads", "device", "python", "date"}
    command   the command line that produced the report
    texts, repeats, seed
    rows      [{"decoder", "config", "tokens_per_second", "speedup_vs_ar", "speedup_vs_hf", "mean_accepted",
                "forward_passes_per_token", "cer", "nll_per_token", "rtf", "peak_mem_mb",
                "seconds": [per repeat], "new_tokens": [per repeat]}]
    batch_size (texts decoded together; > 1: `hf-generate` is not run and speedup_vs_hf is null)
    tokens_per_second = median over repeats of (new tokens / seconds) summed over all texts (with batches: the
    total new tokens of every row over the batches' wall time, i.e. throughput); latency_mean_s / latency_p90_s =
    mean and 90th percentile over requests (texts x repeats) of the time from its batch's start until its row
    finished (batch size 1: its decoding time);
    mean_accepted = tokens per verification pass after the prefill; cer = mean judge CER over every synthesis
    (texts x repeats; null without a judge); cer_ci = its 95% bootstrap interval over texts (each text's mean
    over repeats resampled); cer_diff_vs_ar / cer_diff_ci = the mean paired difference to the `ar` row on the
    same texts and seeds, and its 95% bootstrap interval; nll_per_token = the base model's NLL of the
    generated tokens (teacher-forced, raw logits at temperature 1: a drift measure); rtf = decoding seconds /
    audio seconds (null without audio); peak_mem_mb = peak resident memory of the process while the row ran
    (CUDA: peak allocated).
"""

import itertools
import json
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from .artifacts import read_lines
from .decoders import DECODERS, build_decoder, check_options
from .generate import GenerationOutput

BASELINES = ("hf-generate", "ar")
SAMPLING_KEYS = ("temperature", "top_k", "top_p", "min_p")  # row options passed to each call rather than to the factory
ROW_KEYS = (
    "decoder",
    "config",
    "tokens_per_second",
    "speedup_vs_ar",
    "speedup_vs_hf",
    "mean_accepted",
    "forward_passes_per_token",
    "cer",
    "nll_per_token",
    "rtf",
    "peak_mem_mb",
)


@dataclass
class RowSpec:
    decoder: str  # a name in vadusa.decoders.DECODERS
    config: dict = field(default_factory=dict)  # factory options + sampling options (temperature, top_k)

    @property
    def label(self) -> str:
        return " ".join([self.decoder] + [f"{k}={v}" for k, v in self.config.items()])

    def factory_options(self) -> dict:
        return {k: v for k, v in self.config.items() if k not in SAMPLING_KEYS}

    def sampling_options(self) -> dict:
        return {k: v for k, v in self.config.items() if k in SAMPLING_KEYS}


@dataclass
class BenchTask:
    model: object  # the base causal LM every row decodes with
    texts: list[str]  # the texts; one prompt per text
    prompts: list[torch.Tensor]  # (1, T) prompt ids per text
    max_new_tokens: list[int]  # generation cap per text
    eos_token_id: int | None = None  # stop token
    logits_processor: object = None  # e.g. the TTS's unit-token restriction
    assets: Path | None = None  # directory of decoder artifacts (heads/, block/...)
    score: Callable[[str, GenerationOutput], float] | None = None  # (text, output) -> CER; None: no judge
    tokens_per_audio_second: float | None = None  # unit rate, for the real-time factor; None: no audio
    temperature: float = 1.0  # default sampling temperature of every row


# ----- configs -----
def _value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"none": None, "true": True, "false": False}.get(text.lower(), text)


def parse_configs(spec: str) -> list[RowSpec]:
    """'ar; vadusa:tolerance=1|2,tree=auto; block:threshold=0.02' -> rows; `a|b` sweeps (Cartesian product)."""
    rows = []
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        name, _, options = part.partition(":")
        name = name.strip()
        if name not in DECODERS:
            raise ValueError(f"unknown decoder {name!r} in --configs; expected one of {sorted(DECODERS)}")
        keys, choices = [], []
        for item in filter(None, (o.strip() for o in options.split(","))):
            key, eq, values = item.partition("=")
            if not eq or not values:
                raise ValueError(f"config item {item!r} of {name!r} must look like key=value or key=v1|v2")
            keys.append(key.strip())
            choices.append([_value(v.strip()) for v in values.split("|")])
        for combo in itertools.product(*choices):
            row = RowSpec(name, dict(zip(keys, combo, strict=True)))
            check_options(name, row.factory_options())
            rows.append(row)
    if not rows:
        raise ValueError(f"--configs {spec!r} names no decoder")
    return rows


def with_baselines(rows: list[RowSpec], batch_size: int = 1) -> list[RowSpec]:
    """The baselines first (added when missing), then the other rows, without duplicates. Batches: `ar` only
    (`hf-generate` here decodes one prompt per call)."""
    out: list[RowSpec] = []
    if batch_size > 1:
        rows = [r for r in rows if r.decoder != "hf-generate"]
    for row in [RowSpec(b) for b in (BASELINES if batch_size == 1 else ("ar",))] + rows:
        if not any(r.label == row.label for r in out):
            out.append(row)
    return out


# ----- measurement -----
class PeakMemory:
    """Peak memory per row: a thread samples this process's resident set every few ms (CUDA: peak allocated)."""

    def __init__(self, rows: int):
        self.peak = [0.0] * rows
        self.row = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    @staticmethod
    def resident_mb() -> float:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
        except (OSError, ValueError):
            return 0.0

    def _sample(self):
        while not self._stop.wait(0.002):
            row = self.row  # read once: the decoding thread may reset it meanwhile
            if row is not None:
                self.peak[row] = max(self.peak[row], self.resident_mb())

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


@torch.no_grad()
def nll_per_token(model, sequences: list[torch.Tensor], new_tokens: list[int]) -> float:
    """Mean NLL (nats) of the generated tokens under the base model, one teacher-forced pass per sequence."""
    total, count = 0.0, 0
    for seq, n in zip(sequences, new_tokens, strict=True):
        if n == 0:
            continue
        logp = torch.log_softmax(model(seq).logits[0, -n - 1 : -1].float(), dim=-1)  # (n, V)
        total -= float(logp.gather(1, seq[0, -n:, None]).sum())
        count += n
    return total / max(count, 1)


def machine_info() -> dict:
    import transformers

    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if "model name" in line]
        cpu = names[0] if names else cpu

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


def run_benchmark(
    task: BenchTask,
    rows: list[RowSpec],
    repeats: int = 3,
    seed: int = 0,
    progress: bool = True,
    command: str | None = None,
    batch_size: int = 1,
) -> dict:
    """Run every row on every text `repeats` times, interleaved; return the report dict (see module doc).

    `batch_size` > 1 decodes that many consecutive texts together (left-padded, each with its own budget)."""
    if not task.texts or len(task.prompts) != len(task.texts):
        raise ValueError(f"need one prompt per text, got {len(task.texts)} texts and {len(task.prompts)} prompts")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    rows = with_baselines(rows, batch_size)
    runs = [build_decoder(r.decoder, task.model, task.assets, **r.factory_options()) for r in rows]
    n_rows, n_texts = len(rows), len(task.texts)
    chunks = [list(range(i, min(i + batch_size, n_texts))) for i in range(0, n_texts, batch_size)]

    def call(k: int, chunk: list[int], run_seed: int):
        kwargs = {"temperature": task.temperature, **rows[k].sampling_options()}
        if len(chunk) > 1:
            from .batch import left_pad

            ids, mask = left_pad([task.prompts[i][0] for i in chunk])
            kwargs |= {"attention_mask": mask, "max_new_tokens": [task.max_new_tokens[i] for i in chunk]}
        else:
            ids, kwargs["max_new_tokens"] = task.prompts[chunk[0]], task.max_new_tokens[chunk[0]]
        return runs[k](
            ids,
            eos_token_id=task.eos_token_id,
            logits_processor=task.logits_processor,
            generator=torch.Generator().manual_seed(run_seed),
            **kwargs,
        )

    for k in range(len(rows)):  # warm-up: every row once, untimed
        call(k, chunks[0], seed)

    seconds = [[0.0] * repeats for _ in rows]
    tokens = [[0] * repeats for _ in rows]
    passes, accepted, steps = [0] * n_rows, [0] * n_rows, [0] * n_rows
    latency = [[] for _ in rows]  # per request: seconds until its row finished
    outputs = [[[None] * repeats for _ in range(n_texts)] for _ in rows]  # every output (its row), scored for CER

    bar = tqdm(total=repeats * n_texts * n_rows, desc="compare", disable=not progress)
    with PeakMemory(n_rows) as memory:
        for rep, c in itertools.product(range(repeats), range(len(chunks))):
            run_seed = seed + 1000 * rep + chunks[c][0]  # every row decodes batch c of repeat rep with the same seed
            shift = (rep * len(chunks) + c) % n_rows
            for k in list(range(n_rows))[shift:] + list(range(n_rows))[:shift]:  # rotate who goes first
                memory.row = k
                out = call(k, chunks[c], run_seed)
                memory.row = None
                seconds[k][rep] += out.seconds
                tokens[k][rep] += out.new_tokens
                passes[k] += out.forward_passes
                accepted[k] += sum(out.accepted_lengths)
                steps[k] += len(out.accepted_lengths)
                latency[k] += out.row_seconds
                for j, i in enumerate(chunks[c]):
                    outputs[k][i][rep] = out.row(j) if len(chunks[c]) > 1 else out
                bar.update(len(chunks[c]))
    bar.close()

    tps = [statistics.median(t / s for t, s in zip(tokens[k], seconds[k], strict=True)) for k in range(n_rows)]
    k_ar = next(k for k, r in enumerate(rows) if r.label == "ar")
    k_hf = next((k for k, r in enumerate(rows) if r.label == "hf-generate"), None)
    tps_ar, tps_hf = tps[k_ar], (tps[k_hf] if k_hf is not None else None)
    per_text = None  # (rows, texts) mean CER over repeats
    if task.score:
        per_text = [
            [statistics.mean(task.score(text, o) for o in outputs[k][i]) for i, text in enumerate(task.texts)]
            for k in range(n_rows)
        ]
    report_rows = []
    for k, row in enumerate(rows):
        outs = [outputs[k][i][0] for i in range(n_texts)]  # repeat 0: NLL and RTF
        cer = statistics.mean(per_text[k]) if per_text else None
        quality = {"cer_ci": None, "cer_diff_vs_ar": None, "cer_diff_ci": None}
        if per_text:
            diff = [a - b for a, b in zip(per_text[k], per_text[k_ar], strict=True)]
            quality = {
                "cer_ci": bootstrap_interval(per_text[k], seed),
                "cer_diff_vs_ar": statistics.mean(diff),
                "cer_diff_ci": bootstrap_interval(diff, seed),
            }
        audio = sum(o.new_tokens for o in outs) / task.tokens_per_audio_second if task.tokens_per_audio_second else 0
        report_rows.append(
            {
                "decoder": row.decoder,
                "config": row.config,
                "tokens_per_second": tps[k],
                "speedup_vs_ar": tps[k] / tps_ar,
                "speedup_vs_hf": tps[k] / tps_hf if tps_hf else None,
                "latency_mean_s": statistics.mean(latency[k]),
                "latency_p90_s": percentile(latency[k], 90),
                "mean_accepted": accepted[k] / max(steps[k], 1),
                "forward_passes_per_token": passes[k] / max(sum(tokens[k]), 1),
                "cer": cer,
                **quality,
                "nll_per_token": nll_per_token(task.model, [o.sequences for o in outs], [o.new_tokens for o in outs]),
                "rtf": sum(o.seconds for o in outs) / audio if audio else None,
                "peak_mem_mb": memory.peak[k],
                "seconds": seconds[k],
                "new_tokens": tokens[k],
            }
        )
    return {
        "machine": machine_info(),
        "command": command or " ".join(sys.argv),
        "texts": n_texts,
        "repeats": repeats,
        "batch_size": batch_size,
        "seed": seed,
        "rows": report_rows,
    }


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile of `values` (linear interpolation)."""
    import numpy as np

    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def bootstrap_interval(values: list[float], seed: int = 0, level: float = 0.95, resamples: int = 2000) -> list:
    """[low, high] percentile bootstrap interval of the mean of `values` (resampled with replacement)."""
    import numpy as np

    x = np.asarray(values, dtype=np.float64)
    means = np.random.default_rng(seed).choice(x, size=(resamples, len(x)), replace=True).mean(1)
    tail = (1 - level) / 2 * 100
    return [float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))]


def validate_report(report: dict) -> None:
    """Raise ValueError if `report` does not follow the documented schema."""
    for key in ("machine", "command", "rows"):
        if key not in report:
            raise ValueError(f"report has no {key!r}")
    for row in report["rows"]:
        missing = [k for k in ROW_KEYS if k not in row]
        if missing:
            raise ValueError(f"row {row.get('decoder')!r} lacks {missing}")
        if row["speedup_vs_hf"] is None and report.get("batch_size", 1) == 1:
            raise ValueError(f"row {row['decoder']!r}: speedup_vs_hf is null without batches")
        numeric = (
            "tokens_per_second",
            "speedup_vs_ar",
            "mean_accepted",
            "forward_passes_per_token",
            "nll_per_token",
            "peak_mem_mb",
        )
        for k in numeric:
            if not isinstance(row[k], int | float):
                raise ValueError(f"row {row['decoder']!r}: {k} must be a number, got {row[k]!r}")
        for k in ("cer", "rtf", "speedup_vs_hf"):
            if row[k] is not None and not isinstance(row[k], int | float):
                raise ValueError(f"row {row['decoder']!r}: {k} must be a number or null, got {row[k]!r}")
        if row["decoder"] not in DECODERS or not isinstance(row["config"], dict):
            raise ValueError(f"row has an unknown decoder {row['decoder']!r} or a config that is not a dict")


# ----- outputs -----
def _fmt(v, digits=2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _with_ci(value, ci, sign: str = "") -> str:
    if value is None:
        return "-"
    text = f"{value:{sign}.3f}"
    return text + (f" [{ci[0]:{sign}.3f}, {ci[1]:{sign}.3f}]" if ci else "")


def markdown_table(report: dict) -> str:
    """The rows as a Markdown table, fastest first."""
    m = report["machine"]
    lines = [
        f"Measured {m['date']} on {m['cpu']} ({m['cores']} cores, torch {m['torch']}, {m['threads']} threads), "
        f"{report['texts']} texts x {report['repeats']} repeats, batch size {report.get('batch_size', 1)}: "
        f"`{report['command']}`",
        "",
        "| decoder | config | tokens/s | vs ar | vs hf | accepted/step | passes/token | CER [95% CI] "
        "| CER - ar [95% CI] | NLL/token | RTF | latency s (mean / p90) | peak MB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(report["rows"], key=lambda r: -r["speedup_vs_ar"]):
        config = ", ".join(f"{k}={v}" for k, v in r["config"].items()) or "-"
        lines.append(
            f"| {r['decoder']} | {config} | {r['tokens_per_second']:.1f} | {r['speedup_vs_ar']:.2f}x | "
            f"{_fmt(r['speedup_vs_hf'])}{'' if r['speedup_vs_hf'] is None else 'x'} | {r['mean_accepted']:.2f} | "
            f"{r['forward_passes_per_token']:.3f} | "
            f"{_with_ci(r.get('cer'), r.get('cer_ci'))} | "
            f"{_with_ci(r.get('cer_diff_vs_ar'), r.get('cer_diff_ci'), '+')} | "
            f"{r['nll_per_token']:.3f} | {_fmt(r['rtf'], 3)} | "
            f"{_fmt(r.get('latency_mean_s'))} / {_fmt(r.get('latency_p90_s'))} | {r['peak_mem_mb']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points (error, speed-up) that no other point beats on both (lower error, higher speed)."""
    return [
        i
        for i, (e, s) in enumerate(points)
        if not any((e2 <= e and s2 >= s) and (e2 < e or s2 > s) for e2, s2 in points)
    ]


def marker_labels(points: list[tuple[float, float]], tol: float = 0.015) -> list[str]:
    """The number drawn beside each row's marker (1-based): rows whose markers coincide, within `tol` of either
    axis' range (the same tokens through two front ends: vadusa and vadusa-hf), share one label "3, 7" drawn
    at the first of them, so no two labels sit on each other."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    dx, dy = tol * ((max(xs) - min(xs)) or 1.0), tol * ((max(ys) - min(ys)) or 1.0)
    labels, owner = [""] * len(points), []  # owner: (index of the row holding a label, its point)
    for i, (x, y) in enumerate(points):
        for j, (ox, oy) in owner:
            if abs(x - ox) <= dx and abs(y - oy) <= dy:
                labels[j] += f", {i + 1}"
                break
        else:
            owner.append((i, (x, y)))
            labels[i] = str(i + 1)
    return labels


def plot_pareto(report: dict, path: Path) -> None:
    """Speed-up vs CER (or NLL without a judge), one marker per row, the frontier drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    use_cer = all(r["cer"] is not None for r in rows)
    x_key = "cer" if use_cer else "nll_per_token"
    points = [(r[x_key], r["speedup_vs_ar"]) for r in rows]
    fig, ax = plt.subplots(figsize=(11, 5.5))
    labels = marker_labels(points)
    for n, (r, (x, y), text) in enumerate(zip(rows, points, labels, strict=True), start=1):
        ci = r.get("cer_ci") if use_cer else None
        xerr = [[x - ci[0]], [ci[1] - x]] if ci else None
        label = r["decoder"] + (" " + ",".join(f"{k}={v}" for k, v in r["config"].items()) if r["config"] else "")
        ax.errorbar(x, y, xerr=xerr, fmt="o", ms=5, capsize=2, lw=0.8, label=f"{n}: {label}")
        # numbered markers, full labels in the legend: long labels never pile up on each other
        if text:
            ax.annotate(text, (x, y), fontsize=7, xytext=(4, 4 if n % 2 else -9), textcoords="offset points")
    front = sorted((points[i] for i in pareto_front(points)), key=lambda p: p[0])
    ax.plot([p[0] for p in front], [p[1] for p in front], "k--", lw=1, label="Pareto frontier")
    ax.set_xlabel(
        "CER (judge), 95% bootstrap interval over texts" if use_cer else "NLL per token under the base (nats)"
    )
    ax.set_ylabel("speed-up vs ar (tokens/s ratio)")
    ax.set_title(f"vadusa A/B: {report['texts']} texts, {report['machine']['threads']} threads")
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=130, bbox_inches="tight")  # the legend sits outside the axes
    plt.close(fig)
    os.replace(tmp, path)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def prepare_out_dir(out_dir: str | os.PathLike) -> Path:
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out-dir {out} exists and is a file; expected a directory")
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_report(report: dict, out_dir: str | os.PathLike) -> Path:
    """Write report.json, report.md and pareto.png into out_dir, each atomically (an earlier report stays whole)."""
    validate_report(report)
    out = prepare_out_dir(out_dir)
    _write_atomic(out / "report.json", json.dumps(report, indent=2))
    _write_atomic(out / "report.md", markdown_table(report))
    plot_pareto(report, out / "pareto.png")
    return out


def read_texts(path: str | os.PathLike) -> list[str]:
    """Non-empty lines of a UTF-8 texts file; a missing, non-UTF-8 or empty file raises naming it."""
    return read_lines(path, "texts file")


# ----- the demo TTS as a task; default row sets -----
DEFAULT_CONFIGS = (
    "vadusa:tolerance=1|2|3|4,tree=auto; vadusa:tolerance=3,tree=chain; vadusa:acceptance=typical|lossless; "
    "block:threshold=0.3|0.35|0.4; block:unmask=any,threshold=0.02|0.1"
)  # every shipped decoder at its recommended settings plus the key sweeps (~10 min for 20 texts on 2 cores)
QUICK_CONFIGS = "vadusa:tolerance=3; block"  # a couple of minutes


def task_from_pipeline(pipe, texts: list[str], voice: str | None = None, temperature: float = 1.0) -> BenchTask:
    """A BenchTask over a `vadusa.speech.TTSPipeline`: its prompts, unit restriction, judge and unit rate."""

    def score(text: str, out: GenerationOutput) -> float:
        wav, sr = pipe.vocode(pipe.units(out))
        return pipe.cer(wav, sr, text)

    return BenchTask(
        model=pipe.model,
        texts=texts,
        prompts=[pipe.prompt(t, voice) for t in texts],
        max_new_tokens=[pipe.max_new_tokens(t, voice) for t in texts],
        eos_token_id=pipe.eos_token_id,
        logits_processor=pipe.logits_processor,
        assets=pipe.directory,
        score=score if pipe.judge is not None else None,
        tokens_per_audio_second=pipe.codec.config.unit_rate,
        temperature=temperature,
    )


def buildable(task: BenchTask, rows: list[RowSpec]) -> tuple[list[RowSpec], list[dict]]:
    """Rows whose artifacts exist, and the skipped ones with the reason (a decoder that is not shipped yet)."""
    kept, skipped = [], []
    for row in rows:
        try:
            build_decoder(row.decoder, task.model, task.assets, **row.factory_options())
            kept.append(row)
        except FileNotFoundError as e:
            skipped.append({"decoder": row.decoder, "config": row.config, "reason": str(e)})
    return kept, skipped


def compare(
    task: BenchTask,
    out_dir,
    configs: str | None = None,
    repeats: int = 3,
    seed: int = 0,
    quick: bool = False,
    progress: bool = True,
    command: str | None = None,
    batch_size: int = 1,
) -> dict:
    """`decode.py --compare`: run the rows (default set, or `configs`), write the report, return it."""
    out = prepare_out_dir(out_dir)  # fail before minutes of decoding, not after
    rows = parse_configs(configs or (QUICK_CONFIGS if quick else DEFAULT_CONFIGS))
    rows, skipped = buildable(task, rows)
    for s in skipped:
        print(f"skipping {s['decoder']} {s['config']}: {s['reason']}", file=sys.stderr)
    report = run_benchmark(
        task, rows, repeats=1 if quick else repeats, seed=seed, progress=progress, command=command,
        batch_size=batch_size,
    )  # fmt: skip
    report["skipped"] = skipped
    write_report(report, out)
    return report
