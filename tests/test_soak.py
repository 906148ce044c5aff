"""benchmarks/soak.py's pure parts: the schedule, the summary and its targets, the RSS / descriptor readers."""

import importlib.util
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("soak", ROOT / "benchmarks" / "soak.py")
soak = importlib.util.module_from_spec(spec)
spec.loader.exec_module(soak)


def records(speeds: list[float], digest=lambda i: i) -> list[dict]:
    """One record per synthesis: 100 tokens at the given tokens/s."""
    return [{"tokens": 100, "seconds": 100 / s, "digest": digest(i)} for i, s in enumerate(speeds)]


def probe(rss_kb: int, fds: int, threads: int = 2) -> dict:
    return {"rss_kb": rss_kb, "fds": fds, "threads": threads}


def test_schedule_repeats_its_first_window_at_the_end():
    texts = ["a.", "b.", "c."]
    plan = soak.schedule(50, texts, window=10, seed=3)
    assert len(plan) == 50 and plan[-10:] == plan[:10]
    assert plan == soak.schedule(50, texts, window=10, seed=3) != soak.schedule(50, texts, window=10, seed=4)
    assert {i.label for i in plan} <= set(soak.MIX) and len({i.label for i in plan}) > 3
    assert {i.text for i in plan} <= set(texts) and {i.voice for i in plan} <= set(soak.VOICES)
    with pytest.raises(ValueError, match="n=10, window=6"):
        soak.schedule(10, texts, window=6)


def test_summary_passes_a_steady_run():
    figures = soak.summary(records([200.0] * 10 + [150.0] * 10 + [190.0] * 10), probe(100_000, 20), probe(104_000, 20),
                           window=10)  # fmt: skip
    assert figures["tokens_per_s_first"] == 200.0 and figures["tokens_per_s_last"] == 190.0
    assert figures["speed_ratio"] == 0.95 and figures["rss_growth"] == 0.04
    assert figures["rss_mb_after_warmup"] == round(100_000 / 1024, 1)
    assert all(figures["checks"].values())


def test_summary_fails_each_target_it_misses():
    # window speed: time-weighted (total tokens / total seconds), not the mean of the rates
    slow = records([100.0] * 5 + [300.0] * 5 + [100.0] * 5 + [100.0] * 5)
    figures = soak.summary(slow, probe(100_000, 20, 3), probe(106_000, 21, 4), window=10)
    assert figures["tokens_per_s_first"] == 150.0 and figures["tokens_per_s_last"] == 100.0
    assert figures["checks"] == {
        "rss_growth <= 5%": False,
        "last-window speed >= 90% of first": False,
        "no leaked descriptors": False,
        "no leaked threads": False,
    }
    assert "| FAIL: rss_growth <= 5% |" in soak.table(figures)


def test_summary_counts_the_repeated_window_giving_the_same_tokens():
    digest = lambda i: i % 10 if i != 27 else -1  # noqa: E731 (the last window repeats the first but for one)
    figures = soak.summary(records([100.0] * 30, digest), probe(1000, 5), probe(1000, 5), window=10)
    assert figures["repeat_same_tokens"] == 9


def test_process_readers_are_sane():
    rss = soak.rss_kb()
    ballast = bytearray(64 * 1024 * 1024)  # 64 MB, touched
    ballast[::4096] = b"x" * len(ballast[::4096])
    assert soak.rss_kb() - rss > 48 * 1024 and rss > 10 * 1024  # a Python with torch loaded: more than 10 MB
    del ballast
    fds = soak.open_fds()
    r, w = os.pipe()
    assert soak.open_fds() == fds + 2
    os.close(r)
    os.close(w)
    assert soak.open_fds() == fds
