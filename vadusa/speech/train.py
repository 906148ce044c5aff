"""Training loops of the demo build: the CTC judge and the codec LM. Both resume from checkpoints.

A checkpoint is one safetensors file (model weights, AdamW moments under `opt.<i>.*`, the RNG states under
`rng.*`, the step and counters in its metadata), written atomically every `save_every` steps, so an
interrupted build resumes where it stopped with the same schedule, batches and random draws: bit-exact.
A JSON copy of the metadata sits beside it for reading; a kill between the two writes can leave it stale,
so resuming reads the safetensors file alone.
"""

import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from tqdm import tqdm

from .store import read_json, read_tensors, write_json, write_tensors


@dataclass
class Schedule:
    steps: int  # optimizer steps in total
    lr: float  # peak learning rate
    warmup: int  # linear warm-up steps (of each cycle)
    final: float = 0.1  # cosine decays to final * lr
    restart: int = 0  # step of a warm restart: a second warm-up + cosine cycle from here to `steps` (0: none)

    def lr_at(self, step: int) -> float:
        start, end = (self.restart, self.steps) if 0 < self.restart <= step else (0, self.restart or self.steps)
        local = step - start
        if local < self.warmup:
            return self.lr * (local + 1) / self.warmup
        frac = min(1.0, (local - self.warmup) / max(1, end - start - self.warmup))
        return self.lr * (self.final + (1 - self.final) * 0.5 * (1 + math.cos(math.pi * frac)))


def optimizer_step(opt, lr: float, loss: torch.Tensor, params, max_norm: float = 1.0) -> None:
    """One AdamW step at learning rate `lr` with gradient-norm clipping."""
    for g in opt.param_groups:
        g["lr"] = lr
    opt.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(params, max_norm)
    opt.step()


def save_checkpoint(
    path: Path, model: nn.Module, opt: torch.optim.Optimizer, step: int, extra: dict, generator=None
) -> None:
    """Weights, AdamW state, the global RNG state (and `generator`'s) and {"step": step} | extra, in one file."""
    tensors = {f"model.{k}": v.detach().clone() for k, v in model.state_dict().items()}
    for i, p in enumerate(p for g in opt.param_groups for p in g["params"]):
        for name, value in opt.state.get(p, {}).items():
            if torch.is_tensor(value):
                tensors[f"opt.{i}.{name}"] = value.detach().clone().reshape(value.shape)
    tensors["rng.global"] = torch.get_rng_state()
    if generator is not None:
        tensors["rng.generator"] = generator.get_state()
    meta = {"step": step} | extra
    write_tensors(path.with_suffix(".safetensors"), tensors, metadata={"meta": json.dumps(meta)})
    write_json(path.with_suffix(".json"), meta)


def load_checkpoint(path: Path, model: nn.Module, opt: torch.optim.Optimizer, generator=None) -> dict:
    """Restore model, AdamW state and the RNG states; returns the metadata (with 'step'), {'step': 0} if there
    is no checkpoint. A file of an older build without metadata takes the step from the JSON beside it."""
    weights = path.with_suffix(".safetensors")
    if not weights.exists():
        return {"step": 0, "rng": False}
    with safe_open(str(weights), "pt") as f:
        meta = (f.metadata() or {}).get("meta")
    if meta is None and not path.with_suffix(".json").exists():
        return {"step": 0, "rng": False}
    meta = json.loads(meta) if meta is not None else read_json(path.with_suffix(".json"))
    tensors = read_tensors(weights)
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    for i, p in enumerate(p for g in opt.param_groups for p in g["params"]):
        state = {name.split(".", 2)[2]: v for name, v in tensors.items() if name.startswith(f"opt.{i}.")}
        if state:
            opt.state[p] = state
    if "rng.global" in tensors:
        torch.set_rng_state(tensors["rng.global"])
    if generator is not None and "rng.generator" in tensors:
        generator.set_state(tensors["rng.generator"])
    return meta | {"rng": "rng.global" in tensors}


def length_batches(lengths: list[int], budget: int, seed: int) -> list[list[int]]:
    """Indices grouped into batches of similar length whose padded size (n * longest) stays <= budget."""
    rng = random.Random(seed)
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], rng.random()))
    batches, cur, longest = [], [], 0
    for i in order:
        longest_new = max(longest, lengths[i])
        if cur and longest_new * (len(cur) + 1) > budget:
            batches.append(cur)
            cur, longest_new = [], lengths[i]
        cur.append(i)
        longest = longest_new
    if cur:
        batches.append(cur)
    rng.shuffle(batches)
    return batches


def epoch_batches(lengths: list[int], budget: int, seed: int):
    """Endless stream of (epoch, batch) over reshuffled length-bucketed batches."""
    epoch = 0
    while True:
        for batch in length_batches(lengths, budget, seed + epoch):
            yield epoch, batch
        epoch += 1


# ----- judge -----
@dataclass
class JudgeTrainConfig:
    steps: int = 3000  # optimizer steps
    frames: int = 12000  # padded mel frames per batch (50 frames/s: 4 minutes of audio)
    lr: float = 2e-3  # peak AdamW learning rate
    warmup: int = 200  # warm-up steps
    time_masks: int = 2  # SpecAugment time masks per utterance (up to 10 frames each)
    freq_masks: int = 2  # SpecAugment band masks per utterance (up to 8 bands each)
    save_every: int = 200  # checkpoint period in steps
    seed: int = 0  # batch order and augmentation
    restart: int = 0  # warm restart step: a second cosine cycle from here to `steps` (0: one cycle)


def spec_augment(mel: torch.Tensor, cfg: JudgeTrainConfig, gen: torch.Generator) -> torch.Tensor:
    """(T, M) -> a copy with a few time spans and mel bands set to the utterance mean."""
    mel = mel.clone()
    fill = mel.mean()
    for _ in range(cfg.time_masks):
        w = int(torch.randint(0, 11, (1,), generator=gen))
        t0 = int(torch.randint(0, max(1, mel.shape[0] - w), (1,), generator=gen))
        mel[t0 : t0 + w] = fill
    for _ in range(cfg.freq_masks):
        w = int(torch.randint(0, 9, (1,), generator=gen))
        f0 = int(torch.randint(0, mel.shape[1] - w, (1,), generator=gen))
        mel[:, f0 : f0 + w] = fill
    return mel


def train_judge(judge, mels: list[torch.Tensor], texts: list[str], cfg: JudgeTrainConfig, ckpt: Path, log=print):
    """CTC training over (log-mel, text) pairs; resumes from `ckpt` and returns the trained judge."""
    from .judge import encode_text

    labels = [encode_text(t) for t in texts]
    opt = torch.optim.AdamW(judge.parameters(), lr=cfg.lr, betas=(0.9, 0.98), weight_decay=0.01)
    sched = Schedule(cfg.steps, cfg.lr, cfg.warmup, restart=cfg.restart)
    gen = torch.Generator().manual_seed(cfg.seed)  # SpecAugment's draws (GRU dropout: the global RNG)
    meta = load_checkpoint(ckpt, judge, opt, gen)
    step = meta["step"]
    if step and not meta["rng"]:  # a checkpoint of an older build, without RNG states
        gen.manual_seed(cfg.seed + step)
    ctc = nn.CTCLoss(blank=0, zero_infinity=True)
    stream = epoch_batches([m.shape[0] for m in mels], cfg.frames, cfg.seed)
    for _ in range(step):  # replay the batch order up to the resumed step
        next(stream)
    judge.train()
    bar = tqdm(total=cfg.steps, initial=step, desc="judge", unit="step")
    start, recent = time.perf_counter(), []
    while step < cfg.steps:
        _, batch = next(stream)
        lengths = torch.tensor([mels[i].shape[0] for i in batch])
        x = nn.utils.rnn.pad_sequence([spec_augment(mels[i].float(), cfg, gen) for i in batch], batch_first=True)
        y = torch.cat([labels[i] for i in batch])
        y_len = torch.tensor([len(labels[i]) for i in batch])
        logp = judge(x, lengths)  # (B, T/2, V)
        loss = ctc(logp.transpose(0, 1), y, judge.out_lengths(lengths), y_len)
        optimizer_step(opt, sched.lr_at(step), loss, judge.parameters())
        step += 1
        recent.append(loss.item())
        bar.update(1)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{sum(recent) / len(recent):.3f}")
            log(f"judge step {step} loss {sum(recent) / len(recent):.4f} ({time.perf_counter() - start:.0f} s)")
            recent = []
        if step % cfg.save_every == 0 or step == cfg.steps:
            save_checkpoint(ckpt, judge, opt, step, {}, gen)
    bar.close()
    return judge.eval()


# ----- codec LM -----
@dataclass
class LMTrainConfig:
    steps: int = 3000  # optimizer steps
    tokens: int = 2048  # padded tokens per batch
    lr: float = 1.5e-3  # peak AdamW learning rate
    warmup: int = 200  # warm-up steps
    weight_decay: float = 0.1  # AdamW weight decay
    save_every: int = 100  # checkpoint period in steps
    seed: int = 0  # batch order
    restart: int = 0  # warm restart step: a second cosine cycle from here to `steps` (0: one cycle)


def lm_batch(seqs: list[list[int]], prompt_lens: list[int], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (B, T) ids and labels; only units and <eos> are predicted (prompt and padding -100).

    No attention mask is needed: with right padding and causal attention no real token sees padding.
    """
    longest = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), longest), pad, dtype=torch.long)
    labels = torch.full((len(seqs), longest), -100, dtype=torch.long)
    for b, (s, p) in enumerate(zip(seqs, prompt_lens, strict=True)):
        ids[b, : len(s)] = torch.tensor(s)
        labels[b, p : len(s)] = torch.tensor(s[p:])
    return ids, labels


@torch.no_grad()
def lm_loss(model, seqs, prompt_lens, pad: int, tokens: int = 4096) -> float:
    """Mean loss per predicted token over `seqs` (evaluation mode)."""
    model.eval()
    total, count = 0.0, 0
    for batch in length_batches([len(s) for s in seqs], tokens, 0):
        ids, labels = lm_batch([seqs[i] for i in batch], [prompt_lens[i] for i in batch], pad)
        n = int((labels[:, 1:] != -100).sum())
        total += model(input_ids=ids, labels=labels).loss.item() * n
        count += n
    model.train()
    return total / max(1, count)


def train_lm(model, seqs, prompt_lens, valid, cfg: LMTrainConfig, ckpt: Path, pad: int, log=print):
    """Next-unit training of the codec LM; resumes from `ckpt`; `valid` = (seqs, prompt_lens) for loss logs."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95))
    sched = Schedule(cfg.steps, cfg.lr, cfg.warmup, restart=cfg.restart)
    meta = load_checkpoint(ckpt, model, opt)
    step, seen = meta["step"], meta.get("tokens_seen", 0)
    stream = epoch_batches([len(s) for s in seqs], cfg.tokens, cfg.seed)
    for _ in range(step):
        next(stream)
    model.train()
    bar = tqdm(total=cfg.steps, initial=step, desc="lm", unit="step")
    start, recent = time.perf_counter(), []
    while step < cfg.steps:
        epoch, batch = next(stream)
        ids, labels = lm_batch([seqs[i] for i in batch], [prompt_lens[i] for i in batch], pad)
        loss = model(input_ids=ids, labels=labels).loss
        optimizer_step(opt, sched.lr_at(step), loss, model.parameters())
        step += 1
        seen += sum(len(seqs[i]) for i in batch)
        recent.append(loss.item())
        bar.update(1)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{sum(recent) / len(recent):.3f}", tokens=f"{seen / 1e6:.2f}M")
            log(
                f"lm step {step} epoch {epoch} loss {sum(recent) / len(recent):.4f} tokens {seen}"
                f" ({time.perf_counter() - start:.0f} s)"
            )
            recent = []
        if step % cfg.save_every == 0 or step == cfg.steps:
            extra = {"tokens_seen": seen}
            if step % (cfg.save_every * 5) == 0 or step == cfg.steps:
                extra["valid_loss"] = lm_loss(model, *valid, pad)
                log(f"lm step {step} valid loss {extra['valid_loss']:.4f}")
            save_checkpoint(ckpt, model, opt, step, extra)
    bar.close()
    return model.eval()
