"""Data-free block distillation: the LM teaches a LoRA copy of itself to fill masked blocks.

    config = TrainConfig(block_size=4, steps=2000, out_dir="runs/block")
    adapter_dir = train(model, prompts, config, logits_processor=None, mask_token_id=0)

1. Pool: the teacher (the base, LoRA disabled) samples one continuation per prompt at temperature 1
   (through `logits_processor`, e.g. the TTS's unit-only restriction). No real labels are used.
2. Step: a batch of pooled sequences; the student reads [clean sequence ; noised copy ; complementary
   copy] with the block-causal training mask (`masks.py`). Each block's inputs after its first are
   masked by a per-block ratio; the complementary copy masks exactly the other ones, so every target
   is trained as unknown. The loss is the generalised JSD (`loss.py`) between the teacher's
   auto-regressive distribution at each unknown target and the student's prediction read one slot
   earlier (token shift). Known targets (visible in the window) carry no loss.
3. Annealing over the first `anneal_fraction` of training: block size 2 -> B, masked positions from
   the end of the block (a suffix, as auto-regression leaves them) to anywhere, the mask-ratio window
   from `ratio_start` to `ratio_end`.
   Block size 1 (causal, no mask token) is where the student starts: it IS the teacher there, the loss
   is 0 and the gradients are float noise, which Adam would scale up to lr-sized random steps (measured:
   the loss drifted from 0 to 0.006 in 40 such steps). So the schedule starts at 2 (`start_block_size`).
Teacher prefix (`teacher_prefix`, masks.py): the clean sequence runs once through the base (no gradient),
giving the teacher's distributions and its KV cache; the student (LoRA on) runs only the noised copies of
each block's window, attending to that cache. Each block's first target is the base's own, so the
student learns only the targets after it (and a step costs ~0.6x: no backward through the clean copy).
Progress is steps done / `steps`, or elapsed / `max_minutes` when that is larger (a time box).
Checkpoints (adapter + optimizer + RNG state, safetensors, swapped in atomically) allow `resume`.

Under torchrun (vadusa.distributed) with N ranks: pool batch j is sampled by rank World.owner(j) into its own
shard pool-<rank>.safetensors (pool.json lists them); every rank runs the same generator, so a step's
global batch (N x batch_size sequences) and its masks are those one process with N x batch_size draws;
rank r trains piece r, its loss divided by the global count of targets, and the gradients are summed.
Rank 0 alone logs, evaluates and checkpoints (its clock sets the time box); resuming needs the same N.
"""

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from .. import distributed
from ..checks import check_fields, check_values
from .loss import generalized_jsd
from .masks import prefix_layout, prefix_training_mask, training_mask
from .student import BlockConfig, check_adapter, make_student, save_adapter


@dataclass
class TrainConfig:
    out_dir: str = "runs/block"  # pool, checkpoint, log.jsonl and the final adapter/ go here
    block_size: int = 4  # final block size B
    steps: int = 2000  # optimizer steps (progress = step / steps unless the time box runs out first)
    max_minutes: float | None = None  # time box: progress = max(step / steps, minutes / max_minutes)
    batch_size: int = 16  # sequences per step
    lr: float = 2e-3  # AdamW peak learning rate (linear warm-up, cosine decay to 10%)
    warmup_steps: int = 30  # warm-up steps
    weight_decay: float = 0.0  # AdamW weight decay on the LoRA weights
    grad_clip: float = 1.0  # gradient-norm clip
    rank: int = 8  # LoRA rank
    alpha: float = 16.0  # LoRA alpha (scale alpha / rank)
    target_modules: str = "all-linear"  # peft target modules ("all-linear" or comma-separated names)
    beta: float = 0.5  # generalised-JSD teacher weight: 0 forward KL, 1 reverse KL, 0.5 symmetric (loss.py)
    complementary: bool = True  # add the complementary-mask copy of every sample
    causal_clean: bool = False  # clean copy causal instead of block-causal (still read through the LoRA)
    teacher_prefix: bool = False  # the base itself runs the prefix and draws each block's first target (masks.py)
    anneal_fraction: float = 0.3  # fraction of progress spent annealing (0: start at the final setting)
    start_block_size: int = 2  # block size at the start of annealing (1 is the teacher itself: zero loss, see doc)
    ratio_start: tuple[float, float] = (0.1, 0.5)  # per-block mask-ratio window U[lo, hi] at the start
    ratio_end: tuple[float, float] = (0.2, 1.0)  # ... and after annealing
    pool_size: int = 2048  # teacher continuations sampled once, then reused with fresh masks
    pool_batch: int = 64  # prompts per teacher sampling call
    max_new_tokens: int = 256  # teacher continuation cap
    teacher_temperature: float = 1.0  # temperature of the teacher's samples
    teacher_top_k: int = 0  # keep only the teacher's top-k distribution in the loss (0: the full one)
    seed: int = 0  # seed of pool sampling, batch order and masks
    log_every: int = 10  # steps between log.jsonl lines
    eval_every: int = 50  # steps between held-out evaluations (0: never)
    eval_sequences: int = 32  # pooled sequences held out of training for the evaluation
    checkpoint_minutes: float = 3.0  # minutes between checkpoints
    progress: bool = True  # tqdm bar
    init_adapter: str | None = None  # start the LoRA from this adapter directory (same base, rank and layout)

    def __post_init__(self):
        self.ratio_start, self.ratio_end = tuple(self.ratio_start), tuple(self.ratio_end)
        if self.block_size < 1 or self.start_block_size < 1:
            raise ValueError(
                f"block_size and start_block_size must be >= 1, got {self.block_size}, {self.start_block_size}"
            )
        self.start_block_size = min(self.start_block_size, self.block_size)
        check_values(temperature=self.teacher_temperature, top_k=self.teacher_top_k, max_new_tokens=self.max_new_tokens)
        check_fields(
            self,
            {1: ("steps", "batch_size", "rank", "pool_size", "pool_batch", "log_every")},
            ("lr", "weight_decay", "grad_clip", "alpha", "anneal_fraction", "checkpoint_minutes"),
        )
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {self.beta}")
        for lo, hi in (self.ratio_start, self.ratio_end):
            if not 0.0 <= lo <= hi <= 1.0:
                raise ValueError(
                    f"mask-ratio windows need 0 <= lo <= hi <= 1, got {self.ratio_start}, {self.ratio_end}"
                )


# ----- the schedule -----
@dataclass
class Stage:
    block_size: int  # current block size
    p_anywhere: float  # probability that a block's masks are placed anywhere (else as a suffix)
    ratio: tuple[float, float]  # current per-block mask-ratio window


def stage_at(progress: float, cfg: TrainConfig) -> Stage:
    """The annealed setting at `progress` in [0, 1]."""
    a = 1.0 if cfg.anneal_fraction <= 0 else min(1.0, progress / cfg.anneal_fraction)
    sizes = cfg.block_size - cfg.start_block_size + 1
    block = min(cfg.block_size, cfg.start_block_size + int(a * sizes))
    lo = cfg.ratio_start[0] + a * (cfg.ratio_end[0] - cfg.ratio_start[0])
    hi = cfg.ratio_start[1] + a * (cfg.ratio_end[1] - cfg.ratio_start[1])
    return Stage(block, a, (lo, hi))


def learning_rate(step: int, progress: float, cfg: TrainConfig) -> float:
    warm = min(1.0, (step + 1) / max(1, cfg.warmup_steps))
    return cfg.lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def sample_masks(gen_len: int, stage: Stage, generator) -> torch.Tensor:
    """(gen_len,) bool: which noised inputs s + j are masked. Slot 0 of each block (a known token) never is."""
    maskable = torch.arange(gen_len) % stage.block_size > 0
    return sample_block_masks(maskable, stage, generator)


def sample_block_masks(maskable: torch.Tensor, stage: Stage, generator) -> torch.Tensor:
    """(G,) bool over slots cut into blocks of `stage.block_size`: which `maskable` slots are masked.

    Per block: a ratio r ~ U[lo, hi] and a count of Bernoulli(r) draws over its maskable slots; with
    probability p_anywhere the draws themselves are the mask, else the same count sits on the block's
    last maskable slots (a suffix, as auto-regression leaves them).
    """
    gen_len, b = maskable.shape[0], stage.block_size
    block = torch.arange(gen_len) // b  # (G,)
    blocks = int(block[-1]) + 1
    lo, hi = stage.ratio
    ratio = lo + (hi - lo) * torch.rand(blocks, generator=generator)  # (blocks,)
    draws = (torch.rand(gen_len, generator=generator) < ratio[block]) & maskable  # (G,)
    count = torch.zeros(blocks, dtype=torch.long).index_add_(0, block, draws.long())  # (blocks,)
    total = torch.zeros(blocks, dtype=torch.long).index_add_(0, block, maskable.long())  # (blocks,)
    seen = maskable.long().cumsum(0)  # (G,) maskable slots up to and including j
    first = (seen - maskable.long())[torch.arange(blocks) * b]  # (blocks,) maskable slots before each block
    rank = seen - first[block] - 1  # (G,) index of a maskable slot among its block's maskable slots
    suffix = maskable & (total[block] - 1 - rank < count[block])
    anywhere = torch.rand(blocks, generator=generator) < stage.p_anywhere  # (blocks,)
    return torch.where(anywhere[block], draws, suffix)


def unknown_targets(masked: torch.Tensor, block_size: int) -> torch.Tensor:
    """(G,) bool over noised slots j: is target s + j + 1 unknown to the window (masked, or past its end)?"""
    gen_len = masked.shape[0]
    nxt = torch.arange(1, gen_len + 1)  # slot of the target inside the noised copy
    past_end = (nxt % block_size == 0) | (nxt == gen_len)
    masked_next = torch.cat([masked[1:], masked.new_zeros(1)])
    return past_end | masked_next


# ----- a batch -----
@dataclass
class Batch:
    ids: torch.Tensor  # (N, L) [clean ; noised copies] token ids
    positions: torch.Tensor  # (N, L) position ids
    mask: torch.Tensor  # (N, 1, L, L) additive block-causal mask
    clean: torch.Tensor  # (N, S) clean ids alone (the teacher's input)
    rows: torch.Tensor  # (M,) flat indices into (N * L) of the student rows that carry loss
    teacher_rows: torch.Tensor  # (M,) flat indices into (N * S) of the teacher rows they are compared with
    targets: int = 0  # generated tokens in the batch
    inputs: int = 0  # non-padding input tokens of the student
    teacher_prefix: bool = False  # ids are the noised copies alone, attending to the teacher's cache of `clean`

    def to(self, device) -> "Batch":
        tensors = {
            f: getattr(self, f).to(device) for f in ("ids", "positions", "mask", "clean", "rows", "teacher_rows")
        }
        return replace(self, **tensors)


def prefix_width(seqs) -> int:
    """Noised slots per copy of a teacher-prefix batch of `seqs`: its longest generated part less one."""
    return max(1, max(len(ids) - p - 1 for ids, p in seqs))


def draw_masks(seqs, stage: Stage, generator, teacher_prefix: bool = False) -> list[torch.Tensor]:
    """Each sequence's masked slots, drawn in order from `generator` as `make_batch` draws them for `seqs`.

    Drawn for a global batch, they let each rank build its share (`make_batch(share, masks=...)`) with exactly
    the masks one process draws; teacher-prefix masks span the global batch's `prefix_width`."""
    if not teacher_prefix:
        return [sample_masks(len(ids) - p, stage, generator) for ids, p in seqs]
    width = prefix_width(seqs)
    return [
        sample_block_masks(prefix_layout(p, len(ids), stage.block_size, width)[2], stage, generator) for ids, p in seqs
    ]


def make_batch(
    seqs, stage: Stage, complementary: bool, mask_token_id: int, generator, dtype=torch.float32, causal_clean=False,
    teacher_prefix=False, masks: list[torch.Tensor] | None = None,
) -> Batch:  # fmt: skip
    """seqs: list of (ids (T,), prompt_len). Right-padded with the mask token (padding is never visible).
    `masks`: each sequence's masks from `draw_masks` (default: drawn here from `generator`)."""
    masks = draw_masks(seqs, stage, generator, teacher_prefix) if masks is None else masks
    if teacher_prefix:
        return make_prefix_batch(seqs, stage, complementary, mask_token_id, masks, dtype)
    copies = 2 if complementary else 1
    clean_size = max(len(ids) for ids, _ in seqs)
    noised_size = max(len(ids) - p for ids, p in seqs)
    width = clean_size + copies * noised_size
    ids = torch.full((len(seqs), width), mask_token_id, dtype=torch.long)
    positions = torch.zeros(len(seqs), width, dtype=torch.long)
    attention, rows, teacher_rows, inputs = [], [], [], 0
    for i, (seq, p) in enumerate(seqs):
        length, gen_len, start = len(seq), len(seq) - p, p - 1
        ids[i, :length] = seq
        positions[i, :clean_size] = torch.arange(clean_size)
        masked = masks[i]
        for c, m in enumerate([masked, ~masked & (torch.arange(gen_len) % stage.block_size > 0)][:copies]):
            at = clean_size + c * noised_size
            ids[i, at : at + gen_len] = torch.where(m, mask_token_id, seq[start : start + gen_len])
            positions[i, at : at + noised_size] = start + torch.arange(noised_size)
            slots = unknown_targets(m, stage.block_size).nonzero()[:, 0]  # (k,)
            rows.append(i * width + at + slots)
            teacher_rows.append(i * clean_size + start + slots)
        window = training_mask(p, length, stage.block_size, clean_size, noised_size, copies, dtype, causal_clean)
        attention.append(window)
        inputs += length + copies * gen_len
    return Batch(
        ids=ids,
        positions=positions,
        mask=torch.stack(attention),
        clean=ids[:, :clean_size],
        rows=torch.cat(rows),
        teacher_rows=torch.cat(teacher_rows),
        targets=sum(len(s) - p for s, p in seqs),
        inputs=inputs,
    )


def make_prefix_batch(seqs, stage: Stage, complementary: bool, mask_token_id: int, masks, dtype=torch.float32):
    """The teacher-prefix batch (masks.py): ids are the noised copies of each block's window, right-padded to
    the masks' width."""
    copies, b = (2 if complementary else 1), stage.block_size
    clean_size = max(len(ids) for ids, _ in seqs)
    noised_size = len(masks[0])
    width = copies * noised_size
    clean = torch.full((len(seqs), clean_size), mask_token_id, dtype=torch.long)
    ids = torch.full((len(seqs), width), mask_token_id, dtype=torch.long)
    positions = torch.zeros(len(seqs), width, dtype=torch.long)
    attention, rows, teacher_rows, inputs = [], [], [], 0
    for i, (seq, p) in enumerate(seqs):
        length = len(seq)
        clean[i, :length] = seq
        position, _, valid = prefix_layout(p, length, b, noised_size)  # (G,) each
        tokens = torch.full((noised_size,), mask_token_id, dtype=torch.long)
        tokens[valid] = seq[position[valid]]
        masked = masks[i]
        valid_next = torch.cat([valid[1:], valid.new_zeros(1)])
        for c, m in enumerate([masked, valid & ~masked][:copies]):
            at = c * noised_size
            ids[i, at : at + noised_size] = torch.where(m, mask_token_id, tokens)
            positions[i, at : at + noised_size] = position
            m_next = torch.cat([m[1:], m.new_zeros(1)])
            slots = (valid & (~valid_next | m_next)).nonzero()[:, 0]  # (k,) slots whose target is unknown
            rows.append(i * width + at + slots)
            teacher_rows.append(i * clean_size + position[slots])  # the teacher's row for target position + 1
        attention.append(prefix_training_mask(p, length, b, clean_size, noised_size, copies, dtype))
        inputs += copies * int(valid.sum())
    return Batch(
        ids=ids,
        positions=positions,
        mask=torch.stack(attention),
        clean=clean,
        rows=torch.cat(rows),
        teacher_rows=torch.cat(teacher_rows),
        targets=sum(len(s) - p for s, p in seqs),
        inputs=inputs,
        teacher_prefix=True,
    )


def teacher_forward(student, clean: torch.Tensor, top_k: int, cache: bool = False):
    """(logits (N, S, V), cache or None): the base's causal pass (LoRA disabled); outside the top-k -> -inf."""
    with torch.no_grad(), student.disable_adapter():
        out = student(input_ids=clean, use_cache=cache)
    logits = out.logits.float()
    if top_k:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return logits, (out.past_key_values if cache else None)


def batch_loss(student, batch: Batch, beta: float, top_k: int = 0) -> torch.Tensor:
    """Mean generalised JSD over the unknown targets of the batch."""
    return batch_losses(student, batch, beta, top_k).mean()


def batch_losses(student, batch: Batch, beta: float, top_k: int = 0) -> torch.Tensor:
    """(M,) generalised JSD at each unknown target of the batch."""
    batch = batch.to(next(student.parameters()).device)
    teacher, cache = teacher_forward(student, batch.clean, top_k, cache=batch.teacher_prefix)
    logits = student(
        input_ids=batch.ids, attention_mask=batch.mask, position_ids=batch.positions, past_key_values=cache
    ).logits  # (N, L, V)
    vocab = logits.shape[-1]
    s = logits.reshape(-1, vocab)[batch.rows]  # (M, V)
    t = teacher.reshape(-1, vocab)[batch.teacher_rows]  # (M, V)
    return generalized_jsd(s, t, beta)


@torch.no_grad()
def evaluate(student, held_out, cfg: TrainConfig, mask_token_id: int, dtype) -> float:
    """Loss on the held-out sequences at the final stage, same (complementary) masks every time: a clean curve."""
    was_training = student.training
    student.eval()
    final = stage_at(1.0, cfg)
    generator = torch.Generator().manual_seed(12345)
    total, count = 0.0, 0
    for at in range(0, len(held_out), cfg.batch_size):
        group = held_out[at : at + cfg.batch_size]
        batch = make_batch(group, final, True, mask_token_id, generator, dtype, cfg.causal_clean, cfg.teacher_prefix)
        total += batch_loss(student, batch, cfg.beta, cfg.teacher_top_k).item() * len(batch.rows)
        count += len(batch.rows)
    student.train(was_training)
    return total / count


# ----- the teacher's pool -----
@torch.no_grad()
def sample_pool(
    model, prompts, cfg: TrainConfig, mask_token_id: int, eos_token_id, logits_processor, generator, world=None,
    draw_only=False,
):  # fmt: skip
    """One teacher continuation per prompt (cycling through `prompts`), as (ids (T,), prompt_len) pairs.

    `world`: sample only the batches this rank owns (batch j: rank `world.owner(j)`), as (pool index, ids, prompt_len);
    every rank draws the seeds of all batches, so the pool and the generator are the same for any N.
    `draw_only`: advance `generator` as sampling would, sample nothing (a resumed rank's shard exists)."""
    from transformers import GenerationConfig

    eos = eos_token_id if eos_token_id is None or isinstance(eos_token_id, int) else list(eos_token_id)
    eos_ids = set() if eos is None else {eos} if isinstance(eos, int) else set(eos)
    gconf = GenerationConfig(
        do_sample=True,
        temperature=cfg.teacher_temperature,
        top_k=0,
        top_p=1.0,
        max_new_tokens=cfg.max_new_tokens,
        eos_token_id=eos,
        pad_token_id=mask_token_id,
    )
    order = torch.randperm(len(prompts), generator=generator).tolist()
    chosen = [prompts[order[i % len(prompts)]] for i in range(cfg.pool_size)]
    pool, mine = [], world or distributed.World()
    batches = range(0, len(chosen), cfg.pool_batch)
    for j, at in enumerate(tqdm(batches, desc="teacher samples", disable=not (cfg.progress and mine.is_main))):
        seed = int(torch.randint(0, 2**31, (1,), generator=generator))
        if draw_only or not mine.owns(j):
            continue
        group = chosen[at : at + cfg.pool_batch]
        width = max(len(p) for p in group)
        ids = torch.full((len(group), width), mask_token_id, dtype=torch.long)
        attention = torch.zeros(len(group), width, dtype=torch.long)
        for i, p in enumerate(group):  # left padding for batched generation
            ids[i, width - len(p) :] = torch.tensor(p)
            attention[i, width - len(p) :] = 1
        torch.manual_seed(seed)  # generate() uses the global RNG
        out = model.generate(
            ids.to(model.device),
            attention_mask=attention.to(model.device),
            generation_config=gconf,
            logits_processor=logits_processor,
        )  # (n, width + new)
        for i, p in enumerate(group):
            new = out[i, width:].tolist()
            cut = next((k + 1 for k, t in enumerate(new) if t in eos_ids), len(new))
            sequence = (torch.tensor(p + new[:cut]), len(p))
            pool.append(sequence if world is None else (at + i, *sequence))
    return pool


POOL_INDEX = "pool.json"


def pool_shard(rank: int) -> str:
    return f"pool-{rank:05d}.safetensors"


def save_pool(pool, path: Path, rng_state: torch.Tensor | None = None) -> None:
    """(ids, prompt_len) pairs, or (pool index, ids, prompt_len) triples of one rank's shard; `rng_state`: the
    global RNG state sampling left (a resumed run restores it, so the LoRA drawn next is the same)."""
    index = [e[0] for e in pool] if pool and len(pool[0]) == 3 else list(range(len(pool)))
    pool = [e[-2:] for e in pool]
    tensors = {
        "ids": torch.cat([ids for ids, _ in pool]) if pool else torch.zeros(0, dtype=torch.long),
        "lengths": torch.tensor([len(ids) for ids, _ in pool], dtype=torch.long),
        "prompt_lengths": torch.tensor([p for _, p in pool], dtype=torch.long),
        "index": torch.tensor(index, dtype=torch.long),
    }
    if rng_state is not None:
        tensors["rng_state"] = rng_state
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)


def load_pool(path: Path):
    """The pool as (ids, prompt_len) pairs in pool order: from an out_dir (every shard its pool.json lists; a
    missing one raises, naming its rank) or from one pool file."""
    path = Path(path)
    if path.is_dir():
        index = json.loads((path / POOL_INDEX).read_text())
        files = distributed.check_shards(path, index["shards"], "pool")
    else:
        files = [path]
    entries = []
    for file in files:
        t = load_file(str(file))
        if not len(t["lengths"]):  # a rank that owned no batch
            continue
        seqs = torch.split(t["ids"], t["lengths"].tolist())
        index = t["index"].tolist() if "index" in t else range(len(seqs))
        entries += zip(index, seqs, t["prompt_lengths"].tolist(), strict=True)
    return [(ids, p) for _, ids, p in sorted(entries, key=lambda e: e[0])]


def pooled(model, prompts, cfg: TrainConfig, mask_token_id, eos_token_id, logits_processor, generator, resume):
    """Sample (or, resuming, reuse) the teacher's pool under <out_dir>: each rank writes its own shard, rank 0
    the index; every rank returns the whole pool."""
    out, world = Path(cfg.out_dir), distributed.world()
    mine = out / pool_shard(world.rank)
    batches = -(-cfg.pool_size // cfg.pool_batch)
    index = {
        "pool_size": cfg.pool_size,
        "world_size": world.size,
        "shards": [
            {"name": pool_shard(r), "rank": r, "batches": sum(world.owner(j) == r for j in range(batches))}
            for r in range(world.size)
        ],
    }
    if world.is_main:
        old = json.loads((out / POOL_INDEX).read_text()) if (out / POOL_INDEX).is_file() else index
        if resume and old["world_size"] != world.size:
            raise ValueError(
                f"cannot resume in {out}: its pool was sampled by a run of world size {old['world_size']}, this run"
                f" has world size {world.size}; resume with the same number of processes"
            )
        tmp = out / (POOL_INDEX + ".tmp")
        tmp.write_text(json.dumps(index, indent=1) + "\n")
        os.replace(tmp, out / POOL_INDEX)
    if resume and mine.is_file():
        sample_pool(model, prompts, cfg, mask_token_id, eos_token_id, logits_processor, generator, world, True)
        saved = load_file(str(mine))
        if "rng_state" in saved:  # the global RNG as sampling left it: the LoRA is drawn from it next
            torch.set_rng_state(saved["rng_state"])
    else:
        share = sample_pool(model, prompts, cfg, mask_token_id, eos_token_id, logits_processor, generator, world)
        save_pool(share, mine, torch.get_rng_state())
    distributed.barrier()
    return load_pool(out)


# ----- checkpoints -----
def save_checkpoint(directory: Path, student, optimizer, state: dict, generator) -> None:
    """Adapter weights, AdamW moments, RNG state and counters (with the batch order left and the log window's
    losses: a resumed run goes on as the uninterrupted one), swapped in as one directory (`restore_swapped`)."""
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(
        {k: v.contiguous() for k, v in get_peft_model_state_dict(student).items()}, str(tmp / "adapter.safetensors")
    )
    moments = {
        f"{i}.{k}": v for i, s in optimizer.state_dict()["state"].items() for k, v in s.items() if torch.is_tensor(v)
    }
    moments["rng"] = generator.get_state()
    save_file({k: v.contiguous() for k, v in moments.items()}, str(tmp / "optimizer.safetensors"))
    (tmp / "state.json").write_text(json.dumps(state, indent=1) + "\n")
    old = directory.with_name(directory.name + ".old")
    if directory.exists():
        os.replace(directory, old)
    os.replace(tmp, directory)
    shutil.rmtree(old, ignore_errors=True)


def restore_swapped(directory: Path) -> None:
    """Undo a swap that a kill cut between its two renames (`save_checkpoint`): the previous checkpoint, moved
    aside to <name>.old, goes back in place (the new one, in <name>.tmp, is rewritten by the next save)."""
    old = directory.with_name(directory.name + ".old")
    if not directory.exists() and old.is_dir():
        os.replace(old, directory)


def append_log(out: Path, line: dict, state: dict) -> None:
    """One log.jsonl line; state["log_lines"] counts them, so a run resumed from a checkpoint of this state
    knows which lines come after it (`cut_log`)."""
    with open(out / "log.jsonl", "a") as f:
        f.write(json.dumps(line) + "\n")
    state["log_lines"] = state.get("log_lines", 0) + 1


def cut_log(out: Path, lines: int) -> None:
    """Keep the first `lines` lines of log.jsonl: those written after the checkpoint (one maybe cut short by a
    kill) are written again by the resumed run, so its log is the uninterrupted run's (but for the minutes)."""
    path = out / "log.jsonl"
    if path.is_file():
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(path.read_text().splitlines(keepends=True)[:lines]))
        os.replace(tmp, path)


def load_checkpoint(directory: Path, student, optimizer, generator) -> dict:
    set_peft_model_state_dict(student, load_file(str(directory / "adapter.safetensors")))
    moments = load_file(str(directory / "optimizer.safetensors"))
    generator.set_state(moments.pop("rng"))
    state = optimizer.state_dict()
    params = state["param_groups"][0]["params"]
    state["state"] = {i: {} for i in params}
    for key, value in moments.items():
        i, name = key.split(".", 1)
        state["state"][int(i)][name] = value
    optimizer.load_state_dict(state)
    return json.loads((directory / "state.json").read_text())


def initial_adapter(model, cfg: TrainConfig, block_config: BlockConfig) -> tuple[dict, dict]:
    """(LoRA weights, training record) of `cfg.init_adapter`, after checking it fits this base, rank and layout."""
    directory = Path(cfg.init_adapter)
    found = check_adapter(model, directory, same_base=False)  # any version of this base: vocabulary, then shapes
    rank = json.loads((directory / "adapter_config.json").read_text()).get("r")
    mine = (cfg.rank, block_config.mask_token_id, block_config.causal_clean, block_config.teacher_prefix)
    theirs = (rank, found.mask_token_id, found.causal_clean, found.teacher_prefix)
    if mine != theirs:
        raise ValueError(
            f"init_adapter {directory} has (rank, mask_token_id, causal_clean, teacher_prefix) = {theirs}; "
            f"this run asks for {mine}"
        )
    return load_file(str(directory / "adapter_model.safetensors")), found.training


def load_adapter_weights(student, weights: dict, source) -> None:
    result = set_peft_model_state_dict(student, weights)
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"init_adapter {source} does not match this LoRA (target modules?): missing {missing[:3]}, "
            f"unexpected {list(result.unexpected_keys)[:3]}"
        )


# ----- the loop -----
def train(
    model,
    prompts: list[list[int]],
    cfg: TrainConfig,
    mask_token_id: int | None,
    eos_token_id=None,
    logits_processor=None,
    resume: bool = False,
) -> Path:
    """Distill `model` (wrapped in place with a LoRA) and save the adapter to <out_dir>/adapter; returns that path."""
    out, world = Path(cfg.out_dir), distributed.world()
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = out / "checkpoint"
    if resume and world.is_main:
        restore_swapped(checkpoint)
    distributed.barrier()
    if resume and (checkpoint / "state.json").is_file():
        saved = json.loads((checkpoint / "state.json").read_text()).get("world_size", 1)
        if saved != world.size:
            raise ValueError(
                f"cannot resume from {checkpoint}: it was written by a run of world size {saved}, this run has world"
                f" size {world.size}; resume with the same number of processes (torchrun --nproc_per_node {saved}"
                " ..., or plain python for 1): the batch order and masks are defined per world size"
            )
    block_config = BlockConfig.for_model(  # of the bare base
        model, mask_token_id, cfg.block_size, cfg.causal_clean, cfg.teacher_prefix
    )
    generator = torch.Generator().manual_seed(cfg.seed)
    model.eval().requires_grad_(False)
    initial, initial_record = initial_adapter(model, cfg, block_config) if cfg.init_adapter else (None, None)

    pool = pooled(model, prompts, cfg, mask_token_id, eos_token_id, logits_processor, generator, resume)
    pool = [(ids, p) for ids, p in pool if len(ids) > p]  # at least one generated token
    held_out, pool = pool[: cfg.eval_sequences], pool[cfg.eval_sequences :]
    if not pool:
        raise ValueError(
            f"pool_size {cfg.pool_size} leaves no sequences for training after {cfg.eval_sequences} held out"
        )

    student = make_student(model, cfg.rank, cfg.alpha, cfg.target_modules)
    if initial is not None:
        load_adapter_weights(student, initial, cfg.init_adapter)
    params = [p for p in student.parameters() if p.requires_grad]
    # the LoRA is drawn from the global RNG as the pool's last sampling batch left it (as in one process): the
    # rank that sampled that batch sends its LoRA to every rank
    distributed.broadcast_params(params, src=world.owner(-(-cfg.pool_size // cfg.pool_batch) - 1))
    dtype = params[0].dtype
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    state = {"step": 0, "minutes": 0.0, "targets_seen": 0, "inputs_seen": 0, "config": asdict(cfg)}
    state["world_size"] = world.size
    losses, order = [], []  # the losses of the log window so far; pool indices left of the current permutation
    if resume and checkpoint.is_dir():
        state = load_checkpoint(checkpoint, student, optimizer, generator)
        losses, order = state.pop("losses", []), state.pop("order", [])
        if world.is_main and "log_lines" in state:
            cut_log(out, state["log_lines"])
    elif world.is_main:  # from step 0: a log of an earlier start is dropped
        (out / "log.jsonl").unlink(missing_ok=True)
    held_out = held_out if world.is_main else []  # rank 0 evaluates and logs

    def progress_now(minutes: float) -> float:
        by_time = minutes / cfg.max_minutes if cfg.max_minutes else 0.0
        return max(state["step"] / cfg.steps, by_time)

    if held_out and cfg.eval_every and state["step"] == 0:  # the initial student (the teacher) at the final stage
        append_log(out, {"step": 0, "eval_loss": evaluate(student, held_out, cfg, mask_token_id, dtype)}, state)
    start, minutes_before = time.perf_counter(), state["minutes"]
    last_save = time.perf_counter()
    bar = tqdm(total=cfg.steps, initial=state["step"], desc="distill", disable=not (cfg.progress and world.is_main))
    student.train()
    global_batch = cfg.batch_size * world.size
    while True:
        elapsed = torch.tensor(minutes_before + (time.perf_counter() - start) / 60, dtype=torch.float64)
        minutes = float(distributed.broadcast(elapsed))  # rank 0's clock: every rank agrees on the time box
        progress = progress_now(minutes)
        if progress >= 1.0:
            break
        stage = stage_at(progress, cfg)
        if len(order) < global_batch:
            order += torch.randperm(len(pool), generator=generator).tolist()
        picked, order = order[:global_batch], order[global_batch:]
        seqs = [pool[i] for i in picked]
        masks = draw_masks(seqs, stage, generator, cfg.teacher_prefix)  # the global batch's, in order
        share = world.share(torch.arange(len(seqs))).tolist()  # this rank's sequences of the global batch
        batch = make_batch(
            [seqs[i] for i in share],
            stage,
            cfg.complementary,
            mask_token_id,
            generator,
            dtype,
            cfg.causal_clean,
            cfg.teacher_prefix,
            masks=[masks[i] for i in share],
        )
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(state["step"], progress, cfg)
        (loss,) = distributed.global_means([batch_losses(student, batch, cfg.beta, cfg.teacher_top_k)])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        distributed.all_reduce_grads(params)  # the ranks' shares sum to the global batch's gradient
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()

        totals = torch.tensor([loss.item(), batch.targets, batch.inputs], dtype=torch.float64)
        loss_value, targets, inputs = distributed.all_reduce_sum(totals).tolist()
        state["step"] += 1
        state["targets_seen"] += int(targets)
        state["inputs_seen"] += int(inputs)
        state["minutes"] = minutes_before + (time.perf_counter() - start) / 60
        losses.append(loss_value)
        bar.update()
        bar.set_postfix(loss=f"{losses[-1]:.4f}", block=stage.block_size)
        evaluation = {}
        if held_out and cfg.eval_every and state["step"] % cfg.eval_every == 0:
            evaluation = {"eval_loss": evaluate(student, held_out, cfg, mask_token_id, dtype)}
        if (state["step"] % cfg.log_every == 0 or evaluation) and world.is_main:
            line = {
                "step": state["step"],
                "minutes": round(state["minutes"], 3),
                "progress": round(progress, 4),
                "block_size": stage.block_size,
                "loss": sum(losses) / len(losses),
                "lr": optimizer.param_groups[0]["lr"],
                "targets_seen": state["targets_seen"],
                "inputs_seen": state["inputs_seen"],
                **evaluation,
            }
            append_log(out, line, state)
            losses = [] if state["step"] % cfg.log_every == 0 else losses
        if time.perf_counter() - last_save > 60 * cfg.checkpoint_minutes and world.is_main:
            save_checkpoint(checkpoint, student, optimizer, state | {"losses": losses, "order": order}, generator)
            last_save = time.perf_counter()
    bar.close()
    if not world.is_main:
        distributed.barrier()  # rank 0 saves the adapter
        return out / "adapter"
    if held_out and state.get("evaluated") != state["step"]:  # once per final step (a resumed finished run: done)
        append_log(
            out, {"step": state["step"], "eval_loss": evaluate(student, held_out, cfg, mask_token_id, dtype)}, state
        )
    state["evaluated"] = state["step"]
    save_checkpoint(checkpoint, student, optimizer, state | {"losses": losses, "order": order}, generator)
    student.eval()
    block_config.training = training_record(state, cfg, initial_record)
    adapter = save_adapter(student, block_config, out / "adapter")
    distributed.barrier()
    return adapter


def training_record(state: dict, cfg: TrainConfig, initial_record: dict | None = None) -> dict:
    """What block_config.json keeps of a run: its totals, its config (no machine paths) and, after a warm
    start, the initial adapter's own record."""
    record = {k: state[k] for k in ("step", "minutes", "targets_seen", "inputs_seen")}
    record["config"] = {k: v for k, v in asdict(cfg).items() if k != "out_dir"}
    if cfg.init_adapter:
        record["config"]["init_adapter"] = Path(cfg.init_adapter).name
        record["init_adapter"] = initial_record
    return record


def read_log(out_dir) -> list[dict]:
    path = Path(out_dir) / "log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
