import json
import statistics
from pathlib import Path

import pytest
import torch

from tests.conftest import tiny_llama
from vadusa.bench import (
    BenchTask,
    RowSpec,
    marker_labels,
    pareto_front,
    parse_configs,
    prepare_out_dir,
    read_texts,
    run_benchmark,
    validate_report,
    write_report,
)


def stand_in_judge(text: str, out) -> float:
    """A deterministic stand-in for the speech judge: share of odd tokens."""
    return float((out.tokens % 2).float().mean())


@pytest.fixture(scope="module")
def report():
    model = tiny_llama()
    task = BenchTask(
        model=model,
        texts=["one", "two", "three"],
        prompts=[torch.tensor([[i + 1, 7, 9]]) for i in range(3)],
        max_new_tokens=[24, 30, 18],
        score=stand_in_judge,
        tokens_per_audio_second=25.0,
    )
    return run_benchmark(task, parse_configs("ar:temperature=0|0.7"), repeats=3, progress=False, command="test")


def test_report_follows_schema_and_speedups_are_measured_ratios(report, tmp_path):
    validate_report(report)
    rows = {(r["decoder"], json.dumps(r["config"])): r for r in report["rows"]}
    assert list(rows) == [
        ("hf-generate", "{}"),
        ("ar", "{}"),
        ("ar", '{"temperature": 0}'),
        ("ar", '{"temperature": 0.7}'),
    ]
    ar, hf = rows[("ar", "{}")], rows[("hf-generate", "{}")]
    for r in report["rows"]:
        tps = statistics.median(t / s for t, s in zip(r["new_tokens"], r["seconds"], strict=True))
        assert r["tokens_per_second"] == pytest.approx(tps)
        assert r["speedup_vs_ar"] == pytest.approx(tps / ar["tokens_per_second"])
        assert r["speedup_vs_hf"] == pytest.approx(tps / hf["tokens_per_second"])
        assert r["new_tokens"] == [72] * 3  # no EOS: every text runs to its cap, every repeat
        assert r["forward_passes_per_token"] == pytest.approx(1.0) and r["mean_accepted"] == 1.0
        assert 0 <= r["cer"] <= 1 and r["rtf"] > 0 and r["peak_mem_mb"] > 0 and r["nll_per_token"] > 0
    assert ar["speedup_vs_ar"] == 1.0
    # greedy rows decode the same tokens: same stand-in CER; the sampled row is scored on its own tokens
    assert rows[("ar", '{"temperature": 0}')]["nll_per_token"] < rows[("ar", "{}")]["nll_per_token"]

    out = write_report(report, tmp_path / "out")
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "report.json").read_text()) == json.loads(json.dumps(report))
    table = (out / "report.md").read_text().splitlines()
    assert sum(line.startswith("| ar") or line.startswith("| hf") for line in table) == 4


def test_marker_labels_merge_coinciding_markers_only():
    points = [(0.085, 0.86), (0.076, 1.0), (0.0711, 1.88), (0.072, 1.43), (0.0711, 1.881), (0.070, 1.56)]
    assert marker_labels(points) == ["1", "2", "3, 5", "4", "", "6"]
    assert marker_labels([(0.1, 1.0), (0.1, 1.0)]) == ["1, 2", ""]  # no spread at all


def test_pareto_front():
    # (error, speed-up): (0.3, 1.0) is dominated by (0.2, 2.0); (0.1, 1.5) and (0.2, 2.0) are not
    assert pareto_front([(0.1, 1.5), (0.2, 2.0), (0.3, 1.0)]) == [0, 1]


def test_config_parsing_and_sweeps():
    rows = parse_configs("ar; hf-generate:temperature=0.5|1.0,top_k=5")
    assert [r.label for r in rows] == [
        "ar",
        "hf-generate temperature=0.5 top_k=5",
        "hf-generate temperature=1.0 top_k=5",
    ]
    assert rows[1].sampling_options() == {"temperature": 0.5, "top_k": 5} and rows[1].factory_options() == {}
    assert RowSpec("ar").label == "ar"


def test_bad_inputs_raise(tmp_path):
    with pytest.raises(ValueError, match="unknown decoder 'turbo'"):
        parse_configs("ar; turbo:x=1")
    with pytest.raises(ValueError, match="unknown option\\(s\\) \\['tree'\\] for decoder 'ar'"):
        parse_configs("ar:tree=auto")
    with pytest.raises(ValueError, match="key=value"):
        parse_configs("ar:temperature")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_texts(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(ValueError, match="no non-empty line"):
        read_texts(tmp_path / "empty.txt")
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file"):
        prepare_out_dir(tmp_path / "file")
    with pytest.raises(ValueError, match="lacks"):
        validate_report({"machine": {}, "command": "", "rows": [{"decoder": "ar"}]})


@pytest.mark.skipif(
    not (Path(__file__).parents[1] / "vadusa/assets/demo/lm/model.safetensors").is_file(),
    reason="demo weights not built",
)
def test_compare_cli_reports_bad_inputs(tmp_path, capsys):
    from vadusa.cli import decode

    assert decode.main(["--compare", "--texts", str(tmp_path / "missing.txt"), "--out-dir", str(tmp_path)]) == 2
    assert "texts file" in capsys.readouterr().err
    (tmp_path / "texts.txt").write_text("Hello there, general Kenobi.\n")
    (tmp_path / "file").write_text("x")
    argv = ["--compare", "--texts", str(tmp_path / "texts.txt"), "--out-dir", str(tmp_path / "file")]
    assert decode.main(argv) == 2
    assert "is a file" in capsys.readouterr().err
    argv[-1] = str(tmp_path / "out")
    assert decode.main(argv + ["--configs", "ar:nonsense=1"]) == 2
    assert "unknown option(s) ['nonsense']" in capsys.readouterr().err


def test_cer_intervals_and_paired_differences(report):
    """Each row's CER is the mean over texts x repeats, with a bootstrap interval around it; the paired
    difference to `ar` is computed on the same texts and seeds (so `ar` vs itself is exactly 0)."""
    import numpy as np

    from vadusa.bench import bootstrap_interval

    rows = {json.dumps(r["config"]) + r["decoder"]: r for r in report["rows"]}
    ar = rows["{}ar"]
    assert ar["cer_diff_vs_ar"] == 0.0 and ar["cer_diff_ci"] == [0.0, 0.0]
    for r in report["rows"]:
        lo, hi = r["cer_ci"]
        assert lo <= r["cer"] <= hi
        dlo, dhi = r["cer_diff_ci"]
        assert dlo <= r["cer_diff_vs_ar"] <= dhi
        assert r["cer_diff_vs_ar"] == pytest.approx(r["cer"] - ar["cer"])
    # the interval of a known sample: mean 0.5, sd 0.5 / sqrt(400) -> about 0.5 +- 0.049
    values = np.random.default_rng(1).integers(0, 2, 400).tolist()
    lo, hi = bootstrap_interval(values)
    assert 0.08 < hi - lo < 0.11 and lo < statistics.mean(values) < hi
