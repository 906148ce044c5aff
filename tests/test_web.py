"""The web page's logic without a browser: results, the stats table, pictures, and bad input = the CLI's message."""

import shutil

import numpy as np
import pytest
import torch

from vadusa.cli import decode
from vadusa.speech import TTSPipeline
from vadusa.web import DECODERS, PageOptions, page_updates, run_all, stats_markdown, steps

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed")


@pytest.fixture(scope="module")
def pipe():
    torch.set_num_threads(1)
    return TTSPipeline.from_pretrained()


@pytest.fixture(scope="module")
def results(pipe):
    return run_all(pipe, PageOptions("Hello there, my friend.", seed=0))


def test_every_decoder_speaks_and_its_timed_run_is_the_same_generation(results):
    assert [r.decoder for r in results] == DECODERS
    for r in results:
        units = r.output.new_tokens - 1  # ends on EOS
        assert len(r.wav) == (2 * units - 1) * 320 and r.sample_rate == 16000
        assert torch.equal(r.timed.sequences, r.output.sequences)  # seeded: the re-timed run is the same
        assert sum(steps(r.output)) == r.output.new_tokens and len(steps(r.output)) == r.output.forward_passes
        assert 0 <= r.cer < 0.6 and 0 < r.first_audio_seconds < 5
    assert max(steps(results[1].output)) > 1 and set(steps(results[0].output)) == {1}  # vadusa accepts runs


def test_stats_table_and_pictures(results):
    from vadusa.web import accepted_figure, spectrogram_figure

    table = stats_markdown(results).splitlines()
    assert len(table) == 2 + len(results) and table[2].startswith("| ar |") and "| 1.00x |" in table[2]
    vadusa = table[3].split("|")
    assert int(vadusa[4]) == results[1].output.forward_passes
    speedup = results[1].timed.tokens_per_second / results[0].timed.tokens_per_second
    assert vadusa[3].strip() == f"{speedup:.2f}x"
    ax = accepted_figure(results).axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == [
        f"{r.decoder} ({r.output.forward_passes} passes)" for r in results
    ]
    assert len(ax.patches) == sum(r.output.forward_passes for r in results)  # one block per forward pass
    assert len(spectrogram_figure(results).axes) == 3


def test_page_streams_chunks_then_shows_the_results(pipe):
    updates = list(page_updates(pipe, PageOptions("Hello.", decoders=["vadusa"], seed=1), stream_audio=True))
    chunks = [u["vadusa"] for u in updates if u.get("vadusa") is not None]
    assert len(chunks) >= 2 and all(c[0] == 16000 and c[1].dtype == np.int16 for c in chunks)
    assert updates[-1]["status"] == "done: 1 decoder(s), seed 1" and updates[-1]["stats"].count("\n") == 2


@pytest.mark.parametrize(
    "text, voice, decoder, option, flag",
    [
        ("", None, "ar", {}, []),
        ("Hello \u2603 snowman.", None, "ar", {}, []),
        ("hello there " * 120, None, "ar", {}, []),
        ("Hello.", "nobody", "ar", {}, ["--voice", "nobody"]),
        ("Hello.", None, "vadusa", {"acceptance": "foo"}, ["--acceptance", "foo"]),
        ("Hello.", None, "vadusa", {"tree": "no-such-tree.json"}, ["--tree", "no-such-tree.json"]),
        ("Hello.", None, "block", {"threshold": 1.5}, ["--threshold", "1.5"]),
    ],
)
def test_bad_input_shows_the_clis_message(pipe, tmp_path, capsys, text, voice, decoder, option, flag):
    assert decode.main([text, "-o", str(tmp_path / "x.wav"), "--decoder", decoder] + flag) == 2
    cli = capsys.readouterr().err.strip()
    assert cli.startswith("error: ")
    updates = list(page_updates(pipe, PageOptions(text, voice=voice, decoders=[decoder], **option), True))
    assert updates[-1]["status"] == cli
    assert not any(u.get(decoder) is not None for u in updates)  # nothing played


def test_bad_page_choices(pipe):
    (update,) = page_updates(pipe, PageOptions("Hello.", decoders=[]), False)
    assert update["status"] == "error: no decoder selected; pick at least one of ar, vadusa, block"
    (update,) = page_updates(pipe, PageOptions("Hello.", temperature=-1), False)
    assert update["status"] == "error: temperature must be a number in [0, 10], got -1"
