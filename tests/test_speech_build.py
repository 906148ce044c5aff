"""scripts/build_demo.py --quick end to end (espeak-ng + fortunes needed; about two minutes on 2 cores)."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from vadusa.speech import TTSPipeline, phrases
from vadusa.speech.corpus import FORTUNES
from vadusa.speech.pipeline import REQUIRED

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(
    shutil.which("espeak-ng") is None or not FORTUNES.is_dir(), reason="needs espeak-ng and the fortunes package"
)


def build(out: Path, work: Path, *extra: str) -> float:
    start = time.perf_counter()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(ROOT / "scripts" / "build_demo.py"), "--quick", "--out", str(out), "--work", str(work)]
    subprocess.run(cmd + list(extra), check=True, env=env, capture_output=True, timeout=600)
    return time.perf_counter() - start


@pytest.mark.slow
def test_quick_build_end_to_end_and_resume(tmp_path):
    out, work = tmp_path / "demo", tmp_path / "work"
    build(out, work)
    assert all((out / f).is_file() for f in REQUIRED)
    assert not list(out.rglob("*.tmp"))  # atomic writes leave no temp files behind
    pipe = TTSPipeline.from_pretrained(out)
    wav, sr, gen = pipe.synthesize("The cat sat on the mat.", seed=0)
    assert sr == 16000 and gen.new_tokens > 0 and 0.0 <= pipe.cer(wav, sr, "The cat sat on the mat.") <= 1.0
    assert len(pipe.units(gen)) * 2 * 320 >= len(wav)  # 25 units/s of 16 kHz audio

    stages = json.loads((out / "lm" / "training.json").read_text())
    assert [r["stage"] for r in stages] == ["lm", "finetune"] and stages[1]["phrase_sequences"] == 12 * 9
    items = [r for f in sorted((work / "corpus").glob("*.json")) for r in json.loads(f.read_text())]
    short = [r for r in items if r["kind"] == "phrase"]
    assert len(short) == 12 * 9 and {r["split"] for r in short} == {"train"}  # short phrases: train split only
    assert not {phrases.key(r["text"]) for r in short} & {phrases.key(p) for p in phrases.HELD_OUT}
    assert {r["split"] for r in items if r["kind"] == "sentence"} == {"train", "valid", "test"}

    stamp = {f: (out / f).stat().st_mtime_ns for f in REQUIRED}
    assert build(out, work) < 60  # everything exists: nothing is redone
    assert {f: (out / f).stat().st_mtime_ns for f in REQUIRED} == stamp

    (out / "lm" / "model.safetensors").unlink()  # LM and caches lost: the codec is reused, the LM retrained
    shutil.rmtree(work / "lm")
    shutil.rmtree(work / "finetune")
    (work / "units.safetensors").unlink()
    build(out, work, "--stage", "codec", "--stage", "lm", "--stage", "finetune")
    assert (out / "codec" / "model.safetensors").stat().st_mtime_ns == stamp["codec/model.safetensors"]
    again = TTSPipeline.from_pretrained(out)
    assert torch.equal(again.model.model.embed_tokens.weight, pipe.model.model.embed_tokens.weight)
