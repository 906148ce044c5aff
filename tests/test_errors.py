"""Every bad input a user can give is one clear error: option values, CLI arguments, files and corrupt artifacts.

CLI cases run `main(argv)` in-process (capsys: one stderr line, status 2); a few run as subprocesses to check
the exit status and that no traceback is printed. Corrupt artifacts are the shipped demo files copied to
tmp_path and damaged there.
"""

import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

import vadusa
from vadusa.artifacts import config_from_json, read_lines
from vadusa.blockdiff.student import load_student
from vadusa.checks import check_values
from vadusa.cli import build_demo, decode, train_block, train_heads
from vadusa.draft import vadusa_factory
from vadusa.drafter import load_drafter
from vadusa.speech import TTSPipeline
from vadusa.speech.codec import UnitCodec
from vadusa.speech.judge import Judge
from vadusa.speech.lm import Vocab

from .conftest import tiny_llama

DEMO = Path(vadusa.__file__).parent / "assets" / "demo"
ROOT = Path(__file__).resolve().parents[1]


# ----- option values: one shared check -----
BAD_VALUES = [
    ("temperature", -1.0),
    ("temperature", math.nan),
    ("temperature", math.inf),
    ("temperature", "hot"),
    ("top_k", -3),
    ("top_k", 2.5),
    ("top_p", 0.0),
    ("top_p", 1.5),
    ("top_p", math.nan),
    ("min_p", -0.1),
    ("min_p", math.nan),
    ("tolerance", 0),
    ("tolerance", -2),
    ("tolerance", 2.0),
    ("tolerance", True),
    ("max_new_tokens", 0),
    ("max_new_tokens", 2.5),
    ("typical_epsilon", 1.5),
    ("typical_alpha", -0.1),
    ("threshold", 0.0),
    ("threshold", math.nan),
    ("block_size", 0),
    ("acceptance", "fast"),
    ("unmask", "middle"),
]


@pytest.mark.parametrize(("name", "value"), BAD_VALUES)
def test_check_values_names_the_bad_option(name, value):
    with pytest.raises(ValueError, match=f"^{name} must be .*, got {re.escape(repr(value))}$"):
        check_values(**{name: value})


def test_check_values_names_the_bad_row_of_a_batch():
    with pytest.raises(ValueError, match=r"^max_new_tokens\[1\] must be an integer >= 1 .*, got 0$"):
        check_values(max_new_tokens=[3, 0])
    with pytest.raises(ValueError, match=r"^max_new_tokens must be .*, got \[\]$"):
        check_values(max_new_tokens=[])


def test_check_values_accepts_good_and_off_values():
    check_values(temperature=0, top_k=None, top_p=1.0, min_p=0.0, tolerance=1, max_new_tokens=[1, 5])
    check_values(top_k=0, threshold=1.0, block_size=None, typical_epsilon=0.0, acceptance="lossless", tree="auto")


@pytest.mark.parametrize("kwargs", [{"temperature": -1.0}, {"temperature": math.nan}, {"top_k": -3}])
def test_python_api_gives_the_cli_message(kwargs):
    model = tiny_llama()
    heads = vadusa.DraftHeads.from_model(model, num_heads=2)
    ids = torch.tensor([[1, 2, 3]])
    name = next(iter(kwargs))
    calls = (lambda: vadusa.generate_ar(model, ids, **kwargs), lambda: vadusa.generate(model, heads, ids, **kwargs))
    for call in calls:
        with pytest.raises(ValueError, match=f"^{name} must be"):
            call()


def test_vadusa_factory_checks_tolerance_before_resolving_the_tree():
    model = tiny_llama()  # no heads directory at all: the option error must come first
    with pytest.raises(ValueError, match=r"^tolerance must be an integer in \[1, 1024\], got 0"):
        vadusa_factory(model, None, heads="/nonexistent", tolerance=0)


def test_tree_rank_beyond_the_vocabulary_names_the_file(tmp_path):
    model = tiny_llama(vocab=48)
    heads = vadusa.DraftHeads.from_model(model, num_heads=2)
    path = tmp_path / "tree.json"
    path.write_text(json.dumps([[0], [0, 0], [60]]))
    with pytest.raises(ValueError, match=f"tree file {path}: tree rank 60 needs a top-61 of .* vocabulary of 48"):
        vadusa_factory(model, None, heads=heads, tree=str(path))
    with pytest.raises(ValueError, match="tree rank 60"):
        vadusa.generate(model, heads, torch.tensor([[1, 2]]), tree=vadusa.Tree.from_json(path), max_new_tokens=4)


# ----- the CLIs: one line on stderr, status 2, before any weights load -----
def one_error_line(capsys, code: int) -> str:
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--temperature", "-1"], "temperature must be a finite number >= 0 (0: greedy), got -1.0"),
        (["--temperature", "nan"], "temperature must be a finite number >= 0 (0: greedy), got nan"),
        (["--tolerance", "0"], "tolerance must be an integer in [1, 1024], got 0"),
        (["--tolerance", "-2"], "tolerance must be an integer in [1, 1024], got -2"),
        (["--top-k", "-3"], "top_k must be None or an integer >= 0"),
        (["--decoder", "ar", "--tolerance", "3"], "unknown option(s) ['tolerance'] for decoder 'ar'"),
        (["--decoder", "nope"], "unknown decoder 'nope'"),
    ],
)
def test_decode_bad_option_is_one_line(capsys, tmp_path, monkeypatch, argv, expected):
    def no_loading(*a, **k):
        raise AssertionError("options must be checked before any weights are loaded")

    monkeypatch.setattr(TTSPipeline, "from_pretrained", no_loading)
    code = decode.main(["Hello there.", "-o", str(tmp_path / "x.wav"), *argv])
    assert expected in one_error_line(capsys, code)


def test_decode_paths_are_checked_first(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(TTSPipeline, "from_pretrained", lambda *a: pytest.fail("loaded weights"))
    texts, a_file = tmp_path / "t.txt", tmp_path / "afile"
    texts.write_text("Hello there.\n")
    a_file.write_text("")
    cases = [
        (["--texts", str(texts), "--out-dir", str(a_file)], f"--out-dir: {a_file} is a file, not a directory"),
        (["Hi.", "-o", str(a_file / "x.wav")], f"-o: {a_file} is a file, not a directory"),
        (["Hi.", "-o", str(tmp_path)], "is a directory: give a file name"),
        (["Hi.", "-o", str(tmp_path / "x.foo")], "cannot write '.foo' audio"),
        (["--texts", str(tmp_path / "missing.txt"), "--out-dir", str(tmp_path)], "missing.txt does not exist"),
    ]
    for argv, expected in cases:
        assert expected in one_error_line(capsys, decode.main(argv)), argv
    texts.write_text("Hello there.\nI have 3 cats.\n")
    err = one_error_line(capsys, decode.main(["--texts", str(texts), "--out-dir", str(tmp_path / "w")]))
    assert f"{texts}, text 2: text contains unsupported character(s) ['3']" in err
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"Hello.\nBad \xff byte.\n")
    err = one_error_line(capsys, decode.main(["--texts", str(bad), "--out-dir", str(tmp_path)]))
    assert f"texts file {bad} is not UTF-8 text: line 2 has the byte b'\\xff'" in err


def test_train_heads_missing_prompts_is_one_line(capsys, tmp_path):
    missing = tmp_path / "missing.txt"
    code = train_heads.main(["--demo", "--prompts", str(missing), "--cache", str(tmp_path / "c"), "--out", "h"])
    assert f"prompt file {missing} does not exist" in one_error_line(capsys, code)
    with pytest.raises(SystemExit) as stop:
        train_heads.main(["--demo", "--out", "h", "--measure", "--heldout", "x", "--tolerances", "0"])
    assert "--tolerances must hold integers >= 1" in one_error_line(capsys, stop.value.code)


def test_usage_errors_are_one_line(capsys, tmp_path):
    """argparse's own errors (Parser): one line with the tool's name, status 2."""
    for main, argv in [
        (train_heads.main, ["--out", "h", "--accuracy"]),
        (train_block.main, ["--demo", "--threads", "0"]),
        (build_demo.main, ["--write-texts", "test", "--count", "-1"]),
        (decode.main, ["--temperature", "warm", "Hi.", "-o", "x.wav"]),
        (decode.main, ["--threads", "0", "Hi.", "-o", "x.wav"]),
    ]:
        with pytest.raises(SystemExit) as stop:
            main(argv)
        assert one_error_line(capsys, stop.value.code).count("error:") == 1


@pytest.mark.parametrize(
    ("script", "argv", "expected"),
    [
        ("decode.py", ["Hello.", "-o", "x.wav", "--temperature", "-1"], "error: temperature must be"),
    ],
)
def test_subprocess_exit_status_and_one_line(tmp_path, script, argv, expected):
    proc = subprocess.run([sys.executable, str(ROOT / script), *argv], cwd=tmp_path, capture_output=True, text=True,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and expected in proc.stderr, proc.stderr


# ----- corrupt artifacts: clear errors naming the file -----
def damaged_copy(tmp_path, part: str) -> Path:
    shutil.copytree(DEMO / part, tmp_path / part)
    return tmp_path / part


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:100])


@pytest.fixture(scope="module")
def demo_lm():
    return LlamaForCausalLM.from_pretrained(DEMO / "lm", dtype=torch.float32)


@pytest.mark.parametrize("damage", [truncate, lambda p: p.write_bytes(b"garbage" * 10)])
def test_corrupt_weights_name_the_file(tmp_path, demo_lm, damage):
    loaders = {
        "heads": load_drafter,
        "codec": UnitCodec.from_pretrained,
        "judge": Judge.from_pretrained,
    }
    for part, load in loaders.items():
        d = damaged_copy(tmp_path, part)
        damage(d / "model.safetensors")
        with pytest.raises(ValueError, match=f"{d / 'model.safetensors'} is corrupt or not a safetensors file"):
            load(d)
    d = damaged_copy(tmp_path, "block")
    damage(d / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="adapter_model.safetensors"):
        load_student(demo_lm, d)


def test_corrupt_lm_names_its_directory(tmp_path):
    for part in ("lm", "codec", "judge"):
        shutil.copytree(DEMO / part, tmp_path / part)
    truncate(tmp_path / "lm" / "model.safetensors")
    with pytest.raises(ValueError, match=f"demo TTS weights in {tmp_path} are corrupt"):
        TTSPipeline.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    ("part", "field", "value", "expected"),
    [
        ("heads", "depth", "4", "field 'depth' must be int, got '4'"),
        ("heads", "depth", 0, "need depth >= 1"),
        ("heads", "hidden_size", None, "field 'hidden_size' must be int"),
        ("codec", "num_units", 2.5, "field 'num_units' must be int, got 2.5"),
        ("codec", "smooth", "x", "field 'smooth' must be float"),
        ("judge", "layers", [2], "field 'layers' must be int"),
        ("judge", "bogus", 1, "unknown field(s) ['bogus']"),
    ],
)
def test_config_with_wrong_types_names_file_and_field(tmp_path, part, field, value, expected):
    d = damaged_copy(tmp_path, part)
    config = json.loads((d / "config.json").read_text())
    config[field] = value
    (d / "config.json").write_text(json.dumps(config))
    loaders = {"heads": load_drafter, "codec": UnitCodec.from_pretrained}
    load = loaders.get(part, Judge.from_pretrained)
    with pytest.raises(ValueError, match=str(d / "config.json")) as e:
        load(d)
    assert expected in str(e.value)


def test_block_config_missing_or_wrong_fields(tmp_path, demo_lm):
    d = damaged_copy(tmp_path, "block")
    good = json.loads((d / "block_config.json").read_text())
    for change, expected in [
        ({"block_size": "4"}, "field 'block_size' must be int"),
        ({"block_size": 0}, "block_size, vocab_size must be >= 1"),
        ({"mask_token_id": None}, "field 'mask_token_id' must be int"),
    ]:
        (d / "block_config.json").write_text(json.dumps(good | change))
        with pytest.raises(ValueError, match="block_config.json") as e:
            load_student(demo_lm, d)
        assert expected in str(e.value)
    (d / "block_config.json").write_text(json.dumps({k: v for k, v in good.items() if k != "vocab_size"}))
    with pytest.raises(ValueError, match=r"lacks the field\(s\) \['vocab_size'\]"):
        load_student(demo_lm, d)


def test_vocab_and_tree_files(tmp_path):
    vocab = tmp_path / "vocab.json"
    vocab.write_bytes(b'{"voices": ["a"], "rates": \xff}')
    with pytest.raises(ValueError, match=f"{vocab} is not valid JSON"):
        Vocab.load(vocab)
    vocab.write_text(json.dumps({"voices": "us_male", "rates": [], "phonemes": [], "num_units": 4}))
    with pytest.raises(ValueError, match="field 'voices' must be list"):
        Vocab.load(vocab)
    tree = tmp_path / "tree.json"
    tree.write_text(json.dumps({"paths": [[0], 5]}))
    with pytest.raises(ValueError, match=f"tree file {tree}:"):
        vadusa.Tree.from_json(tree)


def test_config_from_json_and_read_lines(tmp_path):
    path = tmp_path / "c.json"
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="must hold a JSON object, got list"):
        config_from_json(vadusa.HeadsConfig, path)
    path.write_text('{"num_heads": NaN}')
    with pytest.raises(ValueError, match="field 'num_heads' must be int, got nan"):
        config_from_json(vadusa.HeadsConfig, path)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(ValueError, match="has no non-empty line"):
        read_lines(empty)
    with pytest.raises(FileNotFoundError, match="it is a directory"):
        read_lines(tmp_path)


@pytest.mark.parametrize(
    ("main", "argv", "expected"),
    [
        (train_heads.main, ["--demo", "--out", "h", "--temperature", "-1"], "temperature must be a finite number"),
        (train_heads.main, ["--demo", "--out", "h", "--lr", "nan"], "lr must be a finite number >= 0, got nan"),
        (train_heads.main, ["--demo", "--out", "h", "--checkpoint-every", "0"], "checkpoint_every must be an integer"),
        (train_heads.main, ["--model", "/no-such-dir", "--out", "h"], "--model /no-such-dir is not a directory"),
        (train_block.main, ["--demo", "--steps", "0"], "steps must be an integer >= 1, got 0"),
        (train_block.main, ["--demo", "--teacher-temperature", "inf"], "temperature must be a finite number"),
        (train_block.main, ["--demo", "--block-size", "0"], "block_size and start_block_size must be >= 1"),
        (train_block.main, ["--model", "/no-such-dir", "--prompts", "p"], "--model /no-such-dir is not a directory"),
    ],
)
def test_training_options_fail_before_loading(capsys, monkeypatch, main, argv, expected):
    monkeypatch.setattr(train_heads, "load_base", lambda *a: pytest.fail("loaded the base"))
    monkeypatch.setattr(train_block, "demo_task", lambda *a: pytest.fail("loaded the base"))
    assert expected in one_error_line(capsys, main(argv))
