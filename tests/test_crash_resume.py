"""Crash-resume: a SIGKILLed block distillation resumes bit-exactly, so does an interrupted judge training;
scripts/crash_resume.py's comparison; the whole script on both jobs (slow)."""

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import tiny_llama
from vadusa.blockdiff.train import read_log

ROOT = Path(__file__).resolve().parents[1]


def load_script(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


crash = load_script(ROOT / "scripts" / "crash_resume.py")


def tensors_equal(a: Path, b: Path) -> bool:
    x, y = load_file(str(a)), load_file(str(b))
    return x.keys() == y.keys() and all(x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]) for k in x)


# ----- block distillation: one real SIGKILL -----
def block_args(model_dir: Path, prompts: Path, out: Path) -> list[str]:
    """A tiny run: 18 training sequences in batches of 4 (the permutation's leftovers cross checkpoints)."""
    return ["--model", str(model_dir), "--prompts", str(prompts), "--mask-token-id", "0", "--eos-token-id", "7",
            "--out-dir", str(out), "--block-size", "3", "--steps", "30", "--batch-size", "4", "--pool-size", "22",
            "--pool-batch", "8", "--max-new-tokens", "12", "--eval-sequences", "4", "--eval-every", "8",
            "--log-every", "3", "--warmup-steps", "3", "--checkpoint-minutes", "0", "--no-progress"]  # fmt: skip


def kill_at_step(cmd: list[str], state: Path, step: int, timeout: float = 60) -> int:
    """Start `cmd`, SIGKILL it once `state` (checkpoint/state.json) records at least `step`; the step it had."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=crash.environment(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                seen = json.loads(state.read_text())["step"]
            except (FileNotFoundError, json.JSONDecodeError, KeyError):
                seen = -1
            if seen >= step:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return seen
            time.sleep(0.005)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    raise AssertionError(f"the run ended (code {proc.returncode}) before its checkpoint reached step {step}")


def test_sigkilled_block_distillation_resumes_bit_exactly(tmp_path):
    from vadusa.cli import train_block

    model_dir, prompts = tmp_path / "lm", tmp_path / "prompts.json"
    model = tiny_llama()
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)  # peaked next-token distributions (tests/test_block.py's sharp_llama)
    model.save_pretrained(model_dir)
    gen = torch.Generator().manual_seed(1)
    prompts.write_text(json.dumps([torch.randint(8, 48, (5,), generator=gen).tolist() for _ in range(11)]))

    clean, cut = tmp_path / "clean", tmp_path / "cut"
    assert train_block.main(block_args(model_dir, prompts, clean)) == 0
    cmd = [sys.executable, str(ROOT / "train_block.py")] + block_args(model_dir, prompts, cut)
    killed_at = kill_at_step(cmd, cut / "checkpoint" / "state.json", 10)
    assert killed_at < 30 and not (cut / "adapter").exists()
    assert train_block.main(block_args(model_dir, prompts, cut) + ["--resume"]) == 0

    for name in ("adapter/adapter_model.safetensors", "checkpoint/adapter.safetensors",
                 "checkpoint/optimizer.safetensors", "pool-00000.safetensors"):  # fmt: skip
        assert tensors_equal(clean / name, cut / name), name
    drop = lambda lines: [{k: v for k, v in line.items() if k != "minutes"} for line in lines]  # noqa: E731
    assert drop(read_log(cut)) == drop(read_log(clean))  # no line twice, none missing, the same losses
    assert crash.leftovers(cut) == []


def test_a_checkpoint_cut_between_its_renames_is_restored(tmp_path):
    from vadusa.blockdiff.train import restore_swapped

    (tmp_path / "checkpoint.old").mkdir()
    (tmp_path / "checkpoint.old" / "state.json").write_text("{}")
    restore_swapped(tmp_path / "checkpoint")
    assert (tmp_path / "checkpoint" / "state.json").is_file() and not (tmp_path / "checkpoint.old").exists()
    restore_swapped(tmp_path / "checkpoint")  # nothing to undo: unchanged
    assert (tmp_path / "checkpoint" / "state.json").is_file()


# ----- the demo build's judge: interrupted inside a checkpoint write -----
class Killed(Exception):
    pass


def test_judge_training_resumes_bit_exactly_after_a_cut_checkpoint(tmp_path, monkeypatch):
    """Killed after step 4's weights were written but before its JSON: resuming reads the step from the
    weights file, and the SpecAugment generator and the GRU's dropout RNG go on as in the clean run."""
    from vadusa.speech import train as speech_train
    from vadusa.speech.judge import Judge, JudgeConfig

    gen = torch.Generator().manual_seed(0)
    mels = [torch.randn(int(torch.randint(30, 60, (1,), generator=gen)), 80, generator=gen) for _ in range(12)]
    texts = ["the cat", "a dog ran", "hello", "so it goes"] * 3
    cfg = speech_train.JudgeTrainConfig(steps=6, frames=200, warmup=2, save_every=2)

    def trained(ckpt: Path) -> dict:
        torch.manual_seed(0)
        judge = speech_train.train_judge(
            Judge(JudgeConfig(channels=16, hidden=16)), mels, texts, cfg, ckpt, log=lambda m: None
        )
        return judge.state_dict()

    clean = trained(tmp_path / "clean" / "ckpt")
    real_write_json = speech_train.write_json

    def dies_at_step_4(path, obj):
        if obj.get("step") == 4:
            raise Killed
        real_write_json(path, obj)

    monkeypatch.setattr(speech_train, "write_json", dies_at_step_4)
    with pytest.raises(Killed):
        trained(tmp_path / "cut" / "ckpt")
    monkeypatch.setattr(speech_train, "write_json", real_write_json)
    assert json.loads((tmp_path / "cut" / "ckpt.json").read_text())["step"] == 2  # the stale JSON
    torch.manual_seed(123)  # another process: the global RNG is whatever it is
    resumed = trained(tmp_path / "cut" / "ckpt")
    assert all(torch.equal(clean[k], resumed[k]) for k in clean)


# ----- the script's comparison -----
def test_compare_file_verdicts(tmp_path):
    from safetensors.torch import save_file

    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        d.mkdir()
    save_file({"w": torch.ones(3)}, str(a / "m.safetensors"))
    save_file({"w": torch.ones(3)}, str(b / "m.safetensors"))
    save_file({"w": torch.ones(3)}, str(a / "n.safetensors"))
    save_file({"w": torch.tensor([1.0, 1.0, 1.0 + 2**-20])}, str(b / "n.safetensors"))
    (a / "s.json").write_text(json.dumps({"step": 3, "minutes": 0.5, "x": {"minutes": 1}}))
    (b / "s.json").write_text(json.dumps({"step": 3, "minutes": 0.7, "x": {"minutes": 2}}))
    (a / "p.json").write_text(json.dumps({"out_dir": "/a", "minutes": 1}))
    (b / "p.json").write_text(json.dumps({"out_dir": "/b", "minutes": 1}))
    (a / "t.json").write_text(json.dumps({"step": 3}))
    (b / "t.json").write_text(json.dumps({"step": 4}))
    (a / "only.log").write_text("x")
    verdicts = crash.compare_dirs(a, b)
    assert verdicts == {
        "m.safetensors": "bit-exact",
        "n.safetensors": "differs: tensors ['w']",
        "p.json": "equal but out_dir",
        "s.json": "equal but minutes",
        "t.json": "differs: JSON contents",
        "only.log": "only in the clean run",
    }
    assert not crash.ok(verdicts) and crash.ok({k: verdicts[k] for k in ("m.safetensors", "s.json")})
    (b / "sub").mkdir()
    (b / "sub" / "x.safetensors.tmp").write_text("")
    (b / "checkpoint.old").mkdir()
    (b / ".adapter.tmp-1a2b").mkdir()
    assert crash.leftovers(b) == [".adapter.tmp-1a2b", "checkpoint.old", "sub/x.safetensors.tmp"]


def test_kill_delays_are_seeded_and_bounded():
    delays = crash.kill_delays(5, 60.0, 12.0, seed=3)  # in [6, 12 + 48 / 6 = 20]
    assert delays == crash.kill_delays(5, 60.0, 12.0, seed=3) != crash.kill_delays(5, 60.0, 12.0, seed=4)
    assert len(delays) == 5 and all(6.0 <= d <= 20.0 for d in delays)
    assert max(crash.kill_delays(200, 60.0, 12.0, seed=0)) > 12.0  # some land after the first save


# ----- the whole script (slow: minutes) -----
@pytest.mark.slow
@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs espeak-ng (demo prompts, the build's corpus)")
def test_crash_resume_script_on_both_jobs(tmp_path):
    """About 10 minutes on 2 cores: two kills each of the block distillation and of the quick demo build."""
    reports = tmp_path / "reports.json"
    code = crash.main(["--kills", "2", "--seed", "1", "--workdir", str(tmp_path), "--json", str(reports)])
    for report in json.loads(reports.read_text()):
        assert report["leftovers"] == [], report["job"]
        assert crash.ok(report["files"]), report["files"]
        assert len(report["kills"]) >= 1, report  # at least one attempt really died before resuming
    assert code == 0


def test_saved_work_fractions(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    assert crash.build_done(out, work) == 0.0
    (work / "corpus").mkdir(parents=True)
    for i in range(3):
        (work / "corpus" / f"shard-{i:05d}.safetensors").write_bytes(b"")
    (out / "codec").mkdir(parents=True)
    (out / "codec" / "model.safetensors").write_bytes(b"")
    (work / "judge").mkdir()
    (work / "judge" / "ckpt.json").write_text('{"step": 30}')
    assert crash.build_done(out, work) == (0.5 + 1 + 0.5 + 0) / 4
    (tmp_path / "b" / "checkpoint").mkdir(parents=True)
    assert crash.block_done(tmp_path / "b", 60) == 0.0
    (tmp_path / "b" / "checkpoint" / "state.json").write_text('{"step": 15}')
    assert crash.block_done(tmp_path / "b", 60) == 0.25
