"""Stages of the demo build: corpus -> codec -> judge -> lm -> finetune. Each resumes and writes atomically.

    work/                          (outside the repo; caches)
      sentences.json               every usable sentence with its split, voice and rate
      phrases.json                 every short phrase (phrases.py) x voice x rate, all in the train split
      corpus/shard-00000.{json,safetensors}    phonemes + log-mel of 500 sentences each (60: --quick)
      corpus/phrases-00000.{json,safetensors}  the same for the short phrases
      units.safetensors, vocab.json            unit ids of every corpus item; the LM vocabulary
      judge/, lm/, finetune/       training checkpoints (resume from here), *.log
    out/                           (the shipped directory, vadusa/assets/demo by default)
      codec/ judge/ lm/            config.json + model.safetensors each; lm/training.json: its stages

The codec, judge and lm stages see sentences only; `finetune` then warm-starts from out/lm and trains
it on sentences and short phrases together (the shipped LM went through both). A stage whose output
already exists in out/ is skipped (resume); to rebuild, use a new --out or delete that stage's
directory (and the later ones: judge/ and lm/ depend on codec/).
"""

import multiprocessing
import os
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import LlamaForCausalLM

from . import corpus, phrases
from .audio import log_mel
from .codec import UnitCodec
from .judge import Judge, JudgeConfig
from .lm import LMConfig, Vocab, make_model
from .store import read_json, read_tensors, write_json, write_tensors
from .train import JudgeTrainConfig, LMTrainConfig, train_judge, train_lm

SHARD = 500  # sentences per corpus shard


@dataclass
class BuildConfig:
    work: Path  # cache directory for the corpus, units and checkpoints (outside the repo)
    out: Path  # shipped directory: codec/, judge/, lm/
    quick: bool = False  # tiny corpus and models: the whole build in about two minutes (CI)
    max_sentences: int | None = None  # cap on corpus sentences (None: every usable fortune sentence)
    workers: int = 2  # processes for the corpus synthesis (one torch thread each)
    judge_steps: int = 2420  # judge optimizer steps of the full build (8,000 mel frames each)
    judge_restart: int = 420  # judge warm restart: a second cosine cycle from this step (0: one cycle)
    lm_steps: int = 6650  # LM optimizer steps of the full build (2,048 padded tokens each)
    lm_restart: int = 2650  # LM warm restart: a second cosine cycle from this step (0: one cycle)
    finetune_steps: int = 3000  # fine-tune steps on sentences + short phrases (warm start from out/lm)
    finetune_lr: float = 5e-4  # peak learning rate of the fine-tune
    finetune_restart: int = 1500  # fine-tune warm restart: a second cosine cycle from this step (0: one cycle)


def sentence_table(cfg: BuildConfig) -> list[dict]:
    """Every corpus sentence with its split, voice and rate; written once to work/sentences.json."""
    path = cfg.work / "sentences.json"
    if path.exists():
        return read_json(path)
    sentences = corpus.read_sentences()
    limit = 360 if cfg.quick else cfg.max_sentences
    if limit is not None and limit < len(sentences):  # a fixed, spread-out subset
        sentences = sorted(sentences, key=lambda s: corpus._digest(s, "subset"))[:limit]
        sentences.sort()
    rows = []
    for s in sentences:
        voice, rate = corpus.voice_rate_of(s)
        rows.append({"text": s, "split": corpus.split_of(s), "voice": voice, "rate": rate})
    if cfg.quick:  # a tiny corpus still needs a few held-out sentences
        for i, row in enumerate(rows):
            row["split"] = "test" if i % 30 == 0 else "valid" if i % 30 == 1 else "train"
    write_json(path, rows)
    return rows


def phrase_table(cfg: BuildConfig) -> list[dict]:
    """Every short phrase in every voice and rate (train split only); written once to work/phrases.json."""
    path = cfg.work / "phrases.json"
    if path.exists():
        return read_json(path)
    chosen = phrases.read_phrases()
    if cfg.quick:  # a dozen phrases, spread out
        chosen = sorted(sorted(chosen, key=lambda p: corpus._digest(p, "subset"))[:12])
    rows = phrases.phrase_rows(chosen)
    write_json(path, rows)
    return rows


def _worker_init():
    torch.set_num_threads(1)


def _synth_one(row: dict) -> dict | None:
    try:
        return corpus.synthesize(row["text"], row["voice"], row["rate"])
    except (ValueError, RuntimeError) as e:
        print(f"skipping {row['text']!r}: {e}")
        return None


def build_corpus(cfg: BuildConfig) -> list[Path]:
    """Synthesise every sentence and phrase into shards of phonemes + log-mel; existing shards are kept."""
    shards = []
    todo = []
    size = 60 if cfg.quick else SHARD  # the quick corpus (360 sentences) in several shards too: resumable
    for prefix, rows in (("shard", sentence_table(cfg)), ("phrases", phrase_table(cfg))):
        for start in range(0, len(rows), size):
            path = cfg.work / "corpus" / f"{prefix}-{start // size:05d}.safetensors"
            shards.append(path)
            if not path.exists():
                todo.append((path, rows[start : start + size]))
    if not todo:
        return shards
    bar = tqdm(total=sum(len(r) for _, r in todo), desc="corpus (espeak-ng)", unit="sent")
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(cfg.workers, initializer=_worker_init) as pool:
        for path, chunk in todo:
            items = []
            for item in pool.imap(_synth_one, chunk, chunksize=8):
                bar.update(1)
                if item is not None:
                    items.append(item)
            write_shard(path, items, chunk)
    bar.close()
    return shards


def write_shard(path: Path, items: list[dict], rows: list[dict]) -> None:
    split = {r["text"]: r["split"] for r in rows}
    kind = {r["text"]: r.get("kind", "sentence") for r in rows}
    meta = [
        {k: it[k] for k in ("text", "voice", "rate", "phonemes")}
        | {"split": split[it["text"]], "kind": kind[it["text"]]}
        for it in items
    ]
    lengths = torch.tensor([it["mel"].shape[0] for it in items], dtype=torch.long)
    write_json(path.with_suffix(".json"), meta)  # JSON first: a shard counts as done once its tensors exist
    write_tensors(path, {"mel": torch.cat([it["mel"] for it in items]), "lengths": lengths})


def shard_paths(cfg: BuildConfig) -> list[Path]:
    """The corpus shards written so far: sentences, then phrases (the order of every per-item list)."""
    corpus_dir = cfg.work / "corpus"
    return sorted(corpus_dir.glob("shard-*.safetensors")) + sorted(corpus_dir.glob("phrases-*.safetensors"))


def load_corpus(cfg: BuildConfig) -> tuple[list[dict], list[torch.Tensor]]:
    """(metadata rows, (T, 80) float16 log-mels) of every synthesised item: sentences, then phrases."""
    rows, mels = [], []
    for path in shard_paths(cfg):
        rows += [{"kind": "sentence"} | r for r in read_json(path.with_suffix(".json"))]
        t = read_tensors(path)
        mels += list(torch.split(t["mel"], t["lengths"].tolist()))
    return rows, mels


# ----- codec -----
def build_codec(cfg: BuildConfig):
    """Fit k-means on the training mels (unless out/codec exists), encode every sentence, fix the vocabulary.

    An existing out/codec (and out/lm/vocab.json) is reused, never refitted: the LM in out/ depends on it.
    """
    out = cfg.out / "codec"
    units_path = cfg.work / "units.safetensors"
    items = sum(len(read_json(p.with_suffix(".json"))) for p in shard_paths(cfg))
    done = units_path.exists() and len(read_tensors(units_path)["lengths"]) == items  # else: new corpus items
    if (out / "model.safetensors").exists() and done and (cfg.work / "vocab.json").exists():
        return UnitCodec.from_pretrained(out)
    rows, mels = load_corpus(cfg)
    if not rows:
        raise RuntimeError(f"no corpus under {cfg.work / 'corpus'}: run the corpus stage first")
    if (out / "model.safetensors").exists():
        codec = UnitCodec.from_pretrained(out)
    else:
        train = [m for r, m in zip(rows, mels, strict=True) if _is_train_sentence(r)]
        codec = UnitCodec.fit(train, num_units=64 if cfg.quick else 1024)
        codec.save_pretrained(out)
    units = [codec.encode(m) for m in tqdm(mels, desc="codec encode", unit="sent")]
    counts = torch.bincount(torch.cat(units), minlength=codec.config.num_units)
    print(f"codec: {codec.config.num_units} units, {int((counts == 0).sum())} unused")
    write_tensors(units_path, {"units": torch.cat(units), "lengths": torch.tensor([len(u) for u in units])})
    if (cfg.out / "lm" / "vocab.json").exists():
        vocab = Vocab.load(cfg.out / "lm" / "vocab.json")
    else:
        phonemes = sorted({p for r in rows if _is_train_sentence(r) for p in r["phonemes"]})
        vocab = Vocab(voices=list(corpus.VOICES), rates=list(corpus.RATES), phonemes=phonemes,
                      num_units=codec.config.num_units)  # fmt: skip
    vocab.save(cfg.work / "vocab.json")
    return codec


def _is_train_sentence(row: dict) -> bool:
    """The codec, vocabulary, judge and base LM are built from training sentences; phrases only fine-tune."""
    return row["split"] == "train" and row["kind"] == "sentence"


def load_units(cfg: BuildConfig) -> list[torch.Tensor]:
    t = read_tensors(cfg.work / "units.safetensors")
    return list(torch.split(t["units"], t["lengths"].tolist()))


# ----- judge -----
def judge_configs(cfg: BuildConfig) -> tuple[JudgeConfig, JudgeTrainConfig, int]:
    """(model, training, number of Griffin-Lim vocoded training sentences)."""
    if cfg.quick:
        judge_train = JudgeTrainConfig(steps=60, frames=6000, warmup=10, save_every=15)  # checkpoints: resumable
        return JudgeConfig(channels=64, hidden=64), judge_train, 16
    return JudgeConfig(), JudgeTrainConfig(steps=cfg.judge_steps, frames=8000, restart=cfg.judge_restart), 1200


def vocoded_mels(codec: UnitCodec, units: list[torch.Tensor], path: Path) -> list[torch.Tensor]:
    """log-mel of the Griffin-Lim audio of each unit sequence (the judge's vocoder domain); cached at `path`."""
    if path.exists():
        t = read_tensors(path)
        return list(torch.split(t["mel"], t["lengths"].tolist()))
    mels = [log_mel(codec.vocode(u, seed=i)[0]).half() for i, u in enumerate(tqdm(units, desc="vocode", unit="sent"))]
    write_tensors(path, {"mel": torch.cat(mels), "lengths": torch.tensor([m.shape[0] for m in mels])})
    return mels


def build_judge(cfg: BuildConfig) -> Judge:
    """Train the CTC judge on espeak mels, unit-quantised mels and Griffin-Lim vocoded mels (train split)."""
    out = cfg.out / "judge"
    if (out / "model.safetensors").exists():
        return Judge.from_pretrained(out)
    rows, mels = load_corpus(cfg)
    units = load_units(cfg)
    codec = UnitCodec.from_pretrained(cfg.out / "codec")
    model_cfg, train_cfg, n_vocoded = judge_configs(cfg)
    train = [i for i, r in enumerate(rows) if _is_train_sentence(r)]
    rng = random.Random(0)
    voc_ids = sorted(rng.sample(train, min(n_vocoded, len(train))))
    voc = vocoded_mels(codec, [units[i] for i in voc_ids], cfg.work / "judge" / "vocoded.safetensors")
    x = [mels[i] for i in train] + [codec.decode(units[i]).half() for i in train] + voc
    y = [rows[i]["text"] for i in train] * 2 + [rows[i]["text"] for i in voc_ids]
    torch.manual_seed(0)
    judge = train_judge(Judge(model_cfg), x, y, train_cfg, cfg.work / "judge" / "ckpt", log=_logger(cfg, "judge"))
    judge.save_pretrained(out)
    return judge


# ----- codec LM -----
def lm_configs(cfg: BuildConfig) -> tuple[LMConfig, LMTrainConfig]:
    if cfg.quick:
        return LMConfig(layers=2, width=64, heads=2, mlp=128), LMTrainConfig(
            steps=120, warmup=10, lr=3e-3, save_every=30
        )
    return LMConfig(), LMTrainConfig(steps=cfg.lm_steps, restart=cfg.lm_restart)


def corpus_units(cfg: BuildConfig) -> tuple[list[dict], list[torch.Tensor]]:
    """(metadata rows, unit ids) of every corpus item."""
    rows, _ = load_corpus(cfg)
    units = load_units(cfg)
    if len(units) != len(rows):
        raise RuntimeError(f"{len(rows)} corpus items but {len(units)} unit sequences: run the codec stage first")
    return rows, units


def lm_data(rows, units, vocab: Vocab, split: str, kinds=("sentence",)) -> tuple[list[list[int]], list[int]]:
    """(token sequences, prompt lengths) of the corpus items of `split` whose kind is in `kinds`."""
    seqs, prompts = [], []
    for r, u in zip(rows, units, strict=True):
        if r["split"] == split and r["kind"] in kinds:
            prompt = vocab.prompt_ids(r["phonemes"], r["voice"], r["rate"])
            seqs.append(prompt + (u + vocab.unit_offset).tolist() + [vocab.eos])
            prompts.append(len(prompt))
    return seqs, prompts


def build_lm(cfg: BuildConfig):
    """Train the codec LM and write lm/ (transformers save_pretrained + vocab.json + lm.json)."""
    out = cfg.out / "lm"
    if (out / "model.safetensors").exists():
        return
    vocab = Vocab.load(cfg.work / "vocab.json")
    model_cfg, train_cfg = lm_configs(cfg)
    rows, units = corpus_units(cfg)
    seqs, prompts = lm_data(rows, units, vocab, "train")
    valid = lm_data(rows, units, vocab, "valid")
    longest = max(len(s) for s in seqs)
    if longest > model_cfg.max_positions:
        raise RuntimeError(f"a training sequence has {longest} tokens > max_positions {model_cfg.max_positions}")
    torch.manual_seed(0)
    model = make_model(vocab, model_cfg)
    model = train_lm(model, seqs, prompts, valid, train_cfg, cfg.work / "lm" / "ckpt", vocab.pad, _logger(cfg, "lm"))
    save_lm(model, vocab, model_cfg, out, [{"stage": "lm", "sequences": len(seqs), **asdict(train_cfg)}])


def finetune_config(cfg: BuildConfig) -> LMTrainConfig:
    if cfg.quick:
        return LMTrainConfig(steps=30, warmup=5, lr=1e-3, save_every=10)
    return LMTrainConfig(
        steps=cfg.finetune_steps, warmup=50, lr=cfg.finetune_lr, save_every=100, restart=cfg.finetune_restart
    )


def build_finetune(cfg: BuildConfig):
    """Warm-start from out/lm and train on sentences + short phrases; rewrites out/lm (once: its
    training.json then ends with this stage)."""
    out = cfg.out / "lm"
    if not (out / "model.safetensors").exists():
        raise RuntimeError(f"no LM in {out} to fine-tune: run the lm stage first")
    stages = read_json(out / "training.json") if (out / "training.json").exists() else []
    if stages and stages[-1]["stage"] == "finetune":
        return
    vocab = Vocab.load(out / "vocab.json")
    model_cfg = LMConfig(**read_json(out / "lm.json"))
    train_cfg = finetune_config(cfg)
    rows, units = corpus_units(cfg)
    seqs, prompts = lm_data(rows, units, vocab, "train", kinds=("sentence", "phrase"))
    valid = lm_data(rows, units, vocab, "valid")
    model = LlamaForCausalLM.from_pretrained(out)
    log = _logger(cfg, "finetune")
    model = train_lm(model, seqs, prompts, valid, train_cfg, cfg.work / "finetune" / "ckpt", vocab.pad, log)
    phrase_count = sum(r["kind"] == "phrase" for r in rows)
    record = {"stage": "finetune", "sequences": len(seqs), "phrase_sequences": phrase_count, **asdict(train_cfg)}
    save_lm(model, vocab, model_cfg, out, stages + [record])


def save_lm(model, vocab: Vocab, model_cfg: LMConfig, out: Path, stages: list[dict] | None = None) -> None:
    """transformers save_pretrained into a temp directory, then one rename (atomic for readers).

    `stages`: how it was trained, one record per build stage (lm/training.json; none: not written)."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    vocab.save(tmp / "vocab.json")
    write_json(tmp / "lm.json", asdict(model_cfg))
    if stages is not None:
        write_json(tmp / "training.json", stages)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


def _logger(cfg: BuildConfig, name: str):
    path = cfg.work / f"{name}.log"
    path.parent.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        with open(path, "a") as f:
            f.write(msg + "\n")

    return log


STAGES = ["corpus", "codec", "judge", "lm", "finetune"]


def run(cfg: BuildConfig, stages) -> None:
    steps = {"corpus": build_corpus, "codec": build_codec, "judge": build_judge, "lm": build_lm,
             "finetune": build_finetune}  # fmt: skip
    for name in STAGES:
        if name in stages:
            steps[name](cfg)
