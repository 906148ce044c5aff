"""torchrun training: 2 gloo processes (CPU) train exactly what 1 process trains with the same global batch and
seed, for train_heads.py and train_block.py on a tiny saved model; resuming on another world size and a missing
rank's shard raise."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.test_train import peaky_llama
from vadusa import train

ROOT = Path(__file__).resolve().parents[1]


def torchrun(script: str, args: list[str], nproc: int = 2) -> None:
    """Run a top-level CLI of this checkout under torchrun (gloo on CPU, one thread per process)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(command + [str(ROOT / script), *args], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    """A tiny saved Llama with a character tokenizer, and a prompt file (as in test_cli_end_to_end)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("dist")
    peaky_llama().save_pretrained(root / "lm")
    vocab = {chr(97 + i): i for i in range(26)} | {"[UNK]": 26}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(root / "lm")
    (root / "train.txt").write_text("\n".join("abcdefghij"[i % 7 :] + "xyz"[: i % 3] for i in range(24)))
    return root


def test_two_processes_train_the_same_heads_as_one(lm, capsys):
    """torchrun 2 x batch 64 == python 1 x batch 128: the cache (shards split by rank), then the heads."""
    from vadusa.cli import train_heads

    common = ["--model", str(lm / "lm"), "--max-new-tokens", "24", "--shard-size", "8", "--sample-batch", "4"]
    common += ["--steps", "30", "--checkpoint-every", "10", "--lr", "3e-3"]
    run = ["--prompts", str(lm / "train.txt"), "--train"]
    torchrun(
        "train_heads.py", common + run + ["--cache", str(lm / "c2"), "--out", str(lm / "h2"), "--batch-tokens", "64"]
    )
    train_heads.main(common + run + ["--cache", str(lm / "c1"), "--out", str(lm / "h1"), "--batch-tokens", "128"])

    index = json.loads((lm / "c2" / "cache.json").read_text())
    assert index["world_size"] == 2 and [e["rank"] for e in index["shards"]] == [
        0,
        1,
        1,
    ]  # 24 prompts, 8 a shard, snake
    one, two = train.load_cache(lm / "c1"), train.load_cache(lm / "c2")
    assert torch.equal(one.gen, two.gen) and torch.equal(one.lengths, two.lengths)  # same samples, any world size
    torch.testing.assert_close(one.hidden, two.hidden, atol=1e-5, rtol=0)

    a, b = load_file(lm / "h1" / "model.safetensors"), load_file(lm / "h2" / "model.safetensors")
    assert a.keys() == b.keys()
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    moved = max(a[k].abs().max().item() for k in a if "block" in k)  # residual blocks start at zero
    assert diff <= 1e-5 and moved > 1e-2, (diff, moved)
    record = json.loads((lm / "h2" / "training.json").read_text())
    assert record["distributed"] == {"world_size": 2, "global_batch_tokens": 128, "global_batch_sequences": 16}
    assert not (lm / "h2" / "checkpoint.safetensors.tmp").exists()

    # bad inputs: resuming the 2-process run in 1 process, a missing rank-1 shard
    capsys.readouterr()  # what the runs above printed
    code = train_heads.main(
        common + ["--cache", str(lm / "c2"), "--out", str(lm / "h2"), "--batch-tokens", "64", "--resume"]
    )
    assert_user_error(capsys, code, "world size 2, this run has world size 1")
    (lm / "c2" / "cache-00001.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"cache shard cache-00001.safetensors \(rank 1 writes it\)"):
        train.load_cache(lm / "c2")


def test_two_processes_distill_the_same_block_adapter_as_one(lm, capsys):
    """train_block.py: torchrun 2 x batch 2 == python 1 x batch 4 (pool shards by rank, masks drawn globally)."""
    from vadusa.blockdiff.train import load_pool
    from vadusa.cli import train_block

    prompts = [[8 + (3 * i + j) % 40 for j in range(3 + i % 4)] for i in range(12)]
    (lm / "prompts.json").write_text(json.dumps(prompts))
    common = ["--model", str(lm / "lm"), "--prompts", str(lm / "prompts.json"), "--mask-token-id", "0"]
    common += ["--eos-token-id", "7", "--block-size", "3", "--steps", "8", "--pool-size", "16", "--pool-batch", "4"]
    common += ["--max-new-tokens", "12", "--eval-sequences", "4", "--eval-every", "4", "--no-progress", "--lr", "5e-3"]
    common += ["--teacher-prefix", "--anneal-fraction", "0.5"]
    torchrun("train_block.py", common + ["--out-dir", str(lm / "b2"), "--batch-size", "2"])
    train_block.main(common + ["--out-dir", str(lm / "b1"), "--batch-size", "4"])

    index = json.loads((lm / "b2" / "pool.json").read_text())
    assert [(e["name"], e["rank"]) for e in index["shards"]] == [
        ("pool-00000.safetensors", 0),
        ("pool-00001.safetensors", 1),
    ]
    for (x, p), (y, q) in zip(load_pool(lm / "b1"), load_pool(lm / "b2"), strict=True):
        assert torch.equal(x, y) and p == q
    a = load_file(lm / "b1" / "adapter" / "adapter_model.safetensors")
    b = load_file(lm / "b2" / "adapter" / "adapter_model.safetensors")
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    moved = max(a[k].abs().max().item() for k in a if "lora_B" in k)  # LoRA B starts at zero
    assert a.keys() == b.keys() and diff <= 1e-5 and moved > 1e-3, (diff, moved)
    logs = [[line for line in (lm / d / "log.jsonl").read_text().splitlines()] for d in ("b1", "b2")]
    one, two = ([json.loads(line) for line in log] for log in logs)
    assert [r["step"] for r in one] == [r["step"] for r in two]
    for r, s in zip(one, two, strict=True):  # the same global losses and token counts, logged by rank 0 alone
        assert r.get("targets_seen") == s.get("targets_seen")
        assert r.get("loss", 0) == pytest.approx(s.get("loss", 0), abs=1e-5)
        assert r.get("eval_loss", 0) == pytest.approx(s.get("eval_loss", 0), abs=1e-5)

    capsys.readouterr()
    code = train_block.main(common + ["--out-dir", str(lm / "b2"), "--batch-size", "2", "--resume"])
    assert_user_error(capsys, code, "world size 2, this run has world size 1")
    (lm / "b2" / "pool-00001.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"pool shard pool-00001.safetensors \(rank 1 writes it\)"):
        load_pool(lm / "b2")


def assert_user_error(capsys, code: int, expected: str) -> None:
    """The CLI's exit status 2 and its one `error: ...` line, after the base's loading progress, no traceback."""
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and expected in last, err


def weights(directory: Path) -> dict:
    """Every saved weight of a draft-model directory (heads or drafter, and a joint run's adapter)."""
    files = sorted(p for p in directory.glob("*.safetensors") if p.name != "checkpoint.safetensors")
    return {f"{p.name}:{k}": v for p in files for k, v in load_file(p).items()}


@pytest.mark.parametrize(
    "options",
    [["--kind", "feature", "--num-heads", "3"], ["--mode", "joint", "--lora-lr", "1e-2"]],
    ids=["feature", "joint"],
)
def test_two_processes_train_the_same_feature_drafter_and_joint_heads(lm, tmp_path, options):
    """The sequence-batched kinds: torchrun 2 x 3 sequences == python 1 x 6 (feature: a global first root)."""
    from vadusa.cli import train_heads

    common = ["--model", str(lm / "lm"), "--max-new-tokens", "24", "--train", "--cache", str(tmp_path / "c")]
    common += ["--steps", "12", "--checkpoint-every", "5", "--lr", "3e-3", "--warmup", "2", *options]
    torchrun("train_heads.py", common + ["--prompts", str(lm / "train.txt"), "--out", str(tmp_path / "h2"),
                                         "--batch-sequences", "3"])  # fmt: skip
    train_heads.main(common + ["--out", str(tmp_path / "h1"), "--batch-sequences", "6"])
    a, b = weights(tmp_path / "h1"), weights(tmp_path / "h2")
    assert a.keys() == b.keys() and len(a) > 0
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    assert diff <= 1e-5, diff
    fresh = tmp_path / "h0"
    train_heads.main(common + ["--out", str(fresh), "--batch-sequences", "6", "--steps", "1"])
    assert max((a[k] - v).abs().max().item() for k, v in weights(fresh).items()) > 1e-3  # 12 steps moved them
