"""Data-free self-distillation of draft heads: the frozen base teaches the heads its own future.

    prompts = read_prompts("prompts.txt", encode)                     # token ids per text line
    shards = build_cache(model, prompts, config, cache_dir, logits_processor=p, eos_token_id=e)
    heads = train(model, config, cache_dir, out_dir)                  # frozen or joint (LoRA) mode

1. `build_cache`: the base samples continuations of the prompts (temperature 1.0 by default, its own
   logits processor, batched `model.generate` with left padding) and its last hidden states and
   next-token distributions (top-k of the processed distribution) are written once to safetensors
   shards, so head epochs never re-run the base.
2. `train`: head k (0-based) reads the hidden state before generated token i and predicts token
   i+1+k (the base's own output layer predicts token i): KL to the base's distribution at that
   position ("kl") or cross-entropy on the sampled token ("ce"). Mode "frozen" trains the heads only,
   on the cached hidden states; mode "joint" adds a peft LoRA on the base, trained on the base's own
   samples with the LoRA-disabled base (the cache) as teacher plus a decaying weighted sum of head
   losses, and saves the adapter beside the heads.

Token layout of one cached sequence with prompt length P and G generated tokens (EOS included):
    gen[i]      generated token i                          (G,)
    hidden[i]   base last hidden state at position P-1+i   (G, D)  = the state that predicts gen[i]
    prompt_hidden[j]  base last hidden state at prompt position j < P-1   (P-1, D)  (read by feature drafters)
    teacher[i]  the base's processed distribution of gen[i] (top-k probabilities and ids)   (G, K)
Checkpoints are one safetensors file (heads, LoRA, optimizer state, step) replaced atomically, so an
interrupted run resumes bit-exactly: data order and learning rate are pure functions of (seed, step).

Under torchrun (vadusa.distributed) with N ranks: cache shard s is sampled and written by rank
`World.owner(s)` (snake order 0, 1, .., N-1, N-1, .., 0, 0, ..: shards are sorted by prompt length)
(cache.json lists every shard with its rank); step t's global batch is the batch a single process with
N x the per-rank batch draws at step t, rank r training piece r of it; each rank divides its loss sums by
the counts summed over all ranks and the gradients are summed (one all-reduce), so N ranks take exactly
the single process's steps. Rank 0 alone logs, checkpoints and saves; resuming needs the same N.
"""

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from . import distributed
from .artifacts import read_lines
from .checks import check_fields, check_values
from .drafter import FeatureDrafter, load_drafter
from .generate import split_model
from .heads import DraftHeads
from .processors import as_processor

CHECKPOINT_NAME = "checkpoint.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
TRAINING_RECORD = "training.json"


@dataclass
class TrainConfig:
    kind: str = (
        "heads"  # "heads": independent draft heads (vadusa.heads); "feature": a feature drafter (vadusa.drafter)
    )
    num_heads: int = 4  # H draft heads / depths unrolled: the deepest tree the draft model fills
    num_layers: int = 1  # residual SiLU blocks per head
    root_token: bool = True  # heads also read the root token x_{t+1} (vadusa.heads); False: plain Medusa heads
    shared_output: bool = False  # heads feed the base's output layer instead of their own copies of it
    feature_weight: float = 0.1  # feature drafter: weight of the feature regression (smooth L1) beside the KL
    mode: str = "frozen"  # "frozen": heads only on the cached states; "joint": peft LoRA on the base + heads
    loss: str = "kl"  # head loss: "kl" to the base's own distribution, "ce" on the sampled token
    temperature: float = 1.0  # sampling temperature of the base when building the cache
    top_k: int = 0  # top-k of the base when sampling (0 = off)
    max_new_tokens: int = 256  # cap on each sampled continuation
    samples_per_prompt: int = 1  # continuations sampled per prompt
    sample_batch: int = 32  # prompts per batched generate() call
    teacher_top_k: int = 64  # base distribution stored per position: its top-k probabilities (0 = full vocab)
    shard_size: int = 512  # sequences per cache shard
    steps: int = 1000  # optimizer steps
    batch_tokens: int = 1024  # frozen mode: hidden states (positions) per step
    batch_sequences: int = 8  # joint mode and feature drafters: sequences per step
    lr: float = 1e-3  # peak learning rate of the heads (AdamW)
    lora_lr: float = 3e-4  # peak learning rate of the LoRA weights (joint mode)
    weight_decay: float = 0.0  # AdamW weight decay
    warmup: int = 50  # linear warm-up steps, then cosine decay to 10% of the peak
    grad_clip: float = 1.0  # global gradient-norm clip (0 = off)
    head_decay: float = 0.8  # joint mode: head k's loss is weighted head_weight * head_decay**k; feature: decay**k
    head_weight: float = 0.2  # joint mode: weight of the head losses against the base's KL
    lora_rank: int = 8  # LoRA rank (joint mode)
    lora_alpha: int = 16  # LoRA alpha (joint mode)
    lora_targets: str = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"  # modules LoRA wraps
    init_heads: str = ""  # heads directory to start from (e.g. frozen-trained heads before joint mode); "" = fresh
    checkpoint_every: int = 100  # write a checkpoint every N steps (and at the end)
    seed: int = 0  # seeds sampling, LoRA init and data order

    def __post_init__(self):
        if self.kind not in ("heads", "feature"):
            raise ValueError(f"kind must be 'heads' or 'feature', got {self.kind!r}")
        if self.kind == "feature" and self.mode != "frozen":
            raise ValueError("a feature drafter trains on a frozen base: use mode='frozen'")
        if self.mode not in ("frozen", "joint"):
            raise ValueError(f"mode must be 'frozen' or 'joint', got {self.mode!r}")
        if self.loss not in ("kl", "ce"):
            raise ValueError(f"loss must be 'kl' or 'ce', got {self.loss!r}")
        check_values(temperature=self.temperature, top_k=self.top_k)  # the base's sampling, as when decoding
        at_least = {1: ("num_heads", "steps", "batch_tokens", "batch_sequences", "sample_batch", "max_new_tokens",
                        "samples_per_prompt", "shard_size", "checkpoint_every", "lora_rank", "lora_alpha"),
                    0: ("num_layers", "teacher_top_k", "warmup")}  # fmt: skip
        reals = ("lr", "lora_lr", "weight_decay", "grad_clip", "feature_weight", "head_decay", "head_weight")
        check_fields(self, at_least, reals)


# ----- prompts -----
def read_prompts(path: str | os.PathLike, encode=None) -> list:
    """Non-empty lines of a text file (optionally mapped through `encode`); missing or empty files raise."""
    lines = read_lines(path, "prompt file")
    return [encode(line) for line in lines] if encode else lines


# ----- sampling the base -----
def left_pad(prompts: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (B, T) left-padded ids and (B, T) attention mask."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, width - len(p) :] = torch.as_tensor(p, dtype=torch.long)
        mask[b, width - len(p) :] = 1
    return ids, mask


def eos_cut(gen: torch.Tensor, eos: set[int]) -> int:
    """Length of a generated row up to and including its first EOS."""
    hits = [i for i, t in enumerate(gen.tolist()) if t in eos]
    return hits[0] + 1 if hits else len(gen)


@torch.no_grad()
def sample_batch(
    model,
    prompts,
    config: TrainConfig,
    logits_processor=None,
    eos_token_id=None,
    seed: int = 0,
    greedy=False,
    caps: list[int] | None = None,
):
    """Sample one continuation per prompt in one batched generate() call.

    Returns per prompt (gen (G,), log_probs (G, V)): the tokens and the base's processed log-distribution
    (processors, temperature, top-k: exactly what was sampled from) at each generated position.
    `caps`: a cap on new tokens per prompt (default: config.max_new_tokens for all).
    """
    caps = caps or [config.max_new_tokens] * len(prompts)
    ids, mask = left_pad(prompts)
    eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or [])
    torch.manual_seed(seed)  # generate() samples from the global RNG
    sampling = {"do_sample": False} if greedy else {"do_sample": True, "temperature": config.temperature}
    if not greedy:
        sampling |= {"top_k": config.top_k or 0, "top_p": 1.0}
    out = model.generate(
        input_ids=ids.to(model.device),
        attention_mask=mask.to(model.device),
        max_new_tokens=max(caps),
        logits_processor=as_processor(logits_processor),
        eos_token_id=eos_token_id,
        pad_token_id=next(iter(eos)) if eos else 0,
        output_scores=True,
        return_dict_in_generate=True,
        **sampling,
    )
    gens = out.sequences[:, ids.shape[1] :].cpu()  # (B, G)
    scores = torch.stack(out.scores, dim=1).float().cpu()  # (B, G, V) processed scores
    rows = []
    for b in range(len(prompts)):
        g = min(eos_cut(gens[b], eos), caps[b])
        rows.append((gens[b, :g].clone(), torch.log_softmax(scores[b, :g], dim=-1)))
    return rows


@torch.no_grad()
def last_hidden(model, prompt: list[int], gen: torch.Tensor) -> torch.Tensor:
    """(G, D) the base's last hidden states at positions P-1 .. P+G-2 (each predicts gen[i])."""
    body, _ = split_model(model)
    full = torch.cat([torch.as_tensor(prompt, dtype=torch.long), gen])[None].to(model.device)
    states = body(input_ids=full).last_hidden_state[0]  # (P+G, D)
    return states[len(prompt) - 1 : len(prompt) - 1 + len(gen)].float().cpu()


@torch.no_grad()
def batch_hidden(model, prompts: list[list[int]], gens: list[torch.Tensor]) -> list[torch.Tensor]:
    """(P+G-1, D) per sequence: the base's last hidden states at positions 0 .. P+G-2, each predicting the next
    token, from one right-padded forward (causal: padding after a row never affects it)."""
    body, _ = split_model(model)
    fulls = [torch.cat([torch.as_tensor(p, dtype=torch.long), g]) for p, g in zip(prompts, gens, strict=True)]
    width = max(len(f) for f in fulls)
    ids = torch.zeros(len(fulls), width, dtype=torch.long)
    for b, f in enumerate(fulls):
        ids[b, : len(f)] = f
    states = body(input_ids=ids.to(model.device)).last_hidden_state.float().cpu()  # (B, T, D)
    return [states[b, : len(f) - 1] for b, f in enumerate(fulls)]


def teacher_topk(log_probs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(G, V) log-probs -> (G, K) probabilities and (G, K) ids of the top-k (k=0: the full distribution)."""
    if k <= 0 or k >= log_probs.shape[-1]:
        k = log_probs.shape[-1]
    top = torch.topk(log_probs, k, dim=-1)
    return top.values.exp(), top.indices.int()


def build_cache(
    model,
    prompts: list[list[int]],
    config: TrainConfig,
    cache_dir: str | os.PathLike,
    logits_processor=None,
    eos_token_id=None,
    caps: list[int] | None = None,
    progress: bool = True,
) -> list[Path]:
    """Sample the base on `prompts` and write shards cache-00000.safetensors ... (skips shards already written).

    `caps`: a cap on new tokens per prompt (e.g. what the TTS allows for it); default config.max_new_tokens.
    Under torchrun every rank calls this with the same prompts: shard s is sampled by rank `world.owner(s)` (its seeds
    depend only on the shard's place, so the cache is the same for any N), and cache.json lists the shards
    with their ranks before sampling starts, so a shard missing later is named with the rank that owed it.
    """
    if not prompts:
        raise ValueError("no prompts to sample from")
    caps = [min(c, config.max_new_tokens) for c in caps] if caps else [config.max_new_tokens] * len(prompts)
    if len(caps) != len(prompts):
        raise ValueError(f"got {len(caps)} caps for {len(prompts)} prompts")
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    jobs = [(p, c) for p, c in zip(prompts, caps, strict=True) for _ in range(config.samples_per_prompt)]
    jobs.sort(key=lambda j: len(j[0]))  # similar lengths share a batch: less padding, batches end together
    sampling = ("temperature", "top_k", "max_new_tokens", "samples_per_prompt", "teacher_top_k", "shard_size", "seed")
    record = {
        "prompts_sha256": hashlib.sha256(json.dumps(jobs).encode()).hexdigest(),
        "sampling": {k: getattr(config, k) for k in sampling},
    }
    world = distributed.world()
    starts = range(0, len(jobs), config.shard_size)
    index = record | {
        "prompts": len(prompts),
        "world_size": world.size,
        "shards": [
            {
                "name": f"cache-{s:05d}.safetensors",
                "rank": world.owner(s),
                "sequences": len(jobs[a : a + config.shard_size]),
            }
            for s, a in enumerate(starts)
        ],
    }
    meta_path = cache_dir / "cache.json"
    if world.is_main:
        if meta_path.is_file():
            old = json.loads(meta_path.read_text())
            if {k: old.get(k) for k in record} != record:
                raise ValueError(f"cache {cache_dir} holds other prompts or sampling settings: use a new directory")
        _write_text(meta_path, json.dumps(index, indent=2))
    distributed.barrier()
    shards = [cache_dir / e["name"] for e in index["shards"]]
    mine = sum(e["sequences"] for e in index["shards"] if e["rank"] == world.rank)
    bar = tqdm(total=mine, desc="sample base", disable=not (progress and world.is_main))
    for s, (start, path) in enumerate(zip(starts, shards, strict=True)):
        chunk = jobs[start : start + config.shard_size]
        if not world.owns(s):
            continue
        if path.is_file():  # written by an earlier (interrupted) call with the same settings
            bar.update(len(chunk))
            continue
        seqs = []
        for b in range(0, len(chunk), config.sample_batch):
            batch = [p for p, _ in chunk[b : b + config.sample_batch]]
            batch_caps = [c for _, c in chunk[b : b + config.sample_batch]]
            seed = config.seed * 1_000_003 + start + b
            rows = sample_batch(model, batch, config, logits_processor, eos_token_id, seed=seed, caps=batch_caps)
            hiddens = batch_hidden(model, batch, [g for g, _ in rows])  # (P+G-1, D) each
            for p, (g, lp), h in zip(batch, rows, hiddens, strict=True):
                seqs.append((p, g, h[len(p) - 1 :], h[: len(p) - 1], *teacher_topk(lp, config.teacher_top_k)))
            bar.update(len(batch))
        save_shard(path, seqs)
    bar.close()
    distributed.barrier()  # every rank's shards are written before anyone trains on the cache
    distributed.check_shards(cache_dir, index["shards"], "cache")
    return shards


def save_shard(path: Path, seqs) -> None:
    """Concatenate sequences (prompt, gen, hidden, prompt hidden, probs, ids) into flat tensors + lengths;
    write atomically."""
    tensors = {
        "prompt": torch.cat([torch.as_tensor(p, dtype=torch.long) for p, *_ in seqs]),
        "prompt_lengths": torch.tensor([len(p) for p, *_ in seqs]),
        "gen": torch.cat([g for _, g, *_ in seqs]),
        "gen_lengths": torch.tensor([len(g) for _, g, *_ in seqs]),
        "hidden": torch.cat([h for _, _, h, *_ in seqs]).contiguous(),  # (M, D)
        "prompt_hidden": torch.cat([ph for _, _, _, ph, *_ in seqs]).contiguous(),  # (sum(P-1), D)
        "teacher_probs": torch.cat([tp for *_, tp, _ in seqs]).contiguous(),  # (M, K)
        "teacher_ids": torch.cat([ti for *_, ti in seqs]).contiguous(),  # (M, K)
    }
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, tmp)
    os.replace(tmp, path)


@dataclass
class Cache:
    """All shards in memory, flat over generated positions m = 0..M-1."""

    prompts: list[torch.Tensor]  # per sequence (P,)
    starts: torch.Tensor  # (S,) flat index of each sequence's first generated token
    lengths: torch.Tensor  # (S,) generated tokens per sequence
    gen: torch.Tensor  # (M,) generated tokens
    hidden: torch.Tensor  # (M, D) state predicting gen[m]
    teacher_probs: torch.Tensor  # (M, K)
    teacher_ids: torch.Tensor  # (M, K)
    prompt_hidden: list[torch.Tensor] | None = None  # per sequence (P-1, D) prompt states; None in old caches

    @property
    def seq_of(self) -> torch.Tensor:
        """(M,) sequence index of every flat position."""
        return torch.repeat_interleave(torch.arange(len(self.lengths)), self.lengths)

    def to(self, device) -> "Cache":
        """The cache on `device` (a GPU rank keeps its whole cache there)."""
        if torch.device(device) == self.gen.device:
            return self
        move = lambda xs: None if xs is None else [x.to(device) for x in xs]  # noqa: E731
        tensors = {
            f: getattr(self, f).to(device)
            for f in ("starts", "lengths", "gen", "hidden", "teacher_probs", "teacher_ids")
        }
        return Cache(prompts=move(self.prompts), prompt_hidden=move(self.prompt_hidden), **tensors)

    def targets(self, num_heads: int) -> torch.Tensor:
        """(M, H) flat index of head k's target for the state at m (m + 1 + k), -1 past the sequence's end."""
        end = (self.starts + self.lengths)[self.seq_of]  # (M,)
        idx = torch.arange(len(self.gen))[:, None] + 1 + torch.arange(num_heads)[None]  # (M, H)
        return torch.where(idx < end[:, None], idx, torch.full_like(idx, -1))


def load_cache(cache_dir: str | os.PathLike) -> Cache:
    """Every shard cache.json lists (a missing one raises, naming its rank); caches without that list: all shards."""
    cache_dir = Path(cache_dir)
    meta = cache_dir / "cache.json"
    entries = json.loads(meta.read_text()).get("shards", []) if meta.is_file() else []
    if entries and isinstance(entries[0], dict):
        shards = distributed.check_shards(cache_dir, entries, "cache")
    else:  # written before the index listed its shards
        shards = sorted(cache_dir.glob("cache-*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"no cache shards (cache-*.safetensors) in {cache_dir}: run build_cache first")
    parts = [load_file(s) for s in shards]
    prompts = []
    for part in parts:
        prompts += list(torch.split(part["prompt"], part["prompt_lengths"].tolist()))
    lengths = torch.cat([p["gen_lengths"] for p in parts])
    prompt_hidden = None
    if all("prompt_hidden" in p for p in parts):
        prompt_hidden = []
        for part in parts:
            prompt_hidden += list(torch.split(part["prompt_hidden"].float(), (part["prompt_lengths"] - 1).tolist()))
    return Cache(
        prompts=prompts,
        starts=torch.cumsum(lengths, 0) - lengths,
        lengths=lengths,
        gen=torch.cat([p["gen"] for p in parts]),
        hidden=torch.cat([p["hidden"] for p in parts]).float(),
        teacher_probs=torch.cat([p["teacher_probs"] for p in parts]).float(),
        teacher_ids=torch.cat([p["teacher_ids"] for p in parts]).long(),
        prompt_hidden=prompt_hidden,
    )


# ----- losses -----
def soft_cross_entropy(logits: torch.Tensor, probs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """(N, V) logits vs a (N, K) top-k teacher (renormalised): -sum p log q, per row (N,)."""
    p = probs / probs.sum(-1, keepdim=True)
    return -(p * torch.log_softmax(logits.float(), -1).gather(-1, ids)).sum(-1)


def head_losses(
    logits: torch.Tensor, targets: torch.Tensor, cache: Cache, loss: str
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per head: the per-row losses and top-1 hits (vs the sampled token), (n_k,) each, of the rows whose
    target exists (reduce them with `distributed.global_means`).

    logits (N, H, V) of the heads at N states; targets (N, H) flat target indices (-1: none).
    """
    losses, hits = [], []
    for k in range(logits.shape[1]):
        valid = targets[:, k] >= 0
        idx = targets[valid, k]
        lk = logits[valid, k]  # (n, V)
        if loss == "kl":
            per_row = soft_cross_entropy(lk, cache.teacher_probs[idx], cache.teacher_ids[idx])
        else:
            per_row = torch.nn.functional.cross_entropy(lk.float(), cache.gen[idx], reduction="none")
        losses.append(per_row)
        hits.append((lk.argmax(-1) == cache.gen[idx]).float())
    return losses, hits


# ----- schedule and data order: pure functions of (seed, step) -----
def learning_rate(step: int, peak: float, config: TrainConfig) -> float:
    if step < config.warmup:
        return peak * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def batch_indices(step: int, population: int, batch: int, seed: int) -> torch.Tensor:
    """The `step`-th batch of a per-epoch shuffled order of range(population)."""
    batch = min(batch, population)
    per_epoch = population // batch
    epoch, i = divmod(step, per_epoch)
    perm = torch.randperm(population, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return perm[i * batch : (i + 1) * batch]


def lengths_of(seqs: list[torch.Tensor]) -> torch.Tensor:
    return torch.tensor([len(x) for x in seqs])


def bucketed_indices(step: int, lengths: torch.Tensor, batch: int, seed: int, bucket: int = 32) -> torch.Tensor:
    """The `step`-th batch of sequences of similar length: per epoch, a shuffled order cut into groups of
    `bucket` batches, each group sorted by length, the batches of the epoch in shuffled order (less padding).
    A pure function of (seed, step), like `batch_indices`."""
    population = len(lengths)
    batch = min(batch, population)
    per_epoch = population // batch
    epoch, i = divmod(step, per_epoch)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(population, generator=g)[: per_epoch * batch]
    groups = [perm[a : a + bucket * batch] for a in range(0, len(perm), bucket * batch)]
    ordered = torch.cat([grp[torch.argsort(lengths[grp], stable=True)] for grp in groups])
    order = torch.randperm(per_epoch, generator=g)
    return ordered.view(per_epoch, batch)[order[i]]


# ----- joint mode: LoRA on the base -----
def add_lora(model, config: TrainConfig):
    from peft import LoraConfig, get_peft_model

    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    targets = [t for t in config.lora_targets.split(",") if t in names]
    if not targets:
        raise ValueError(f"none of the LoRA target modules {config.lora_targets!r} exist in {type(model).__name__}")
    torch.manual_seed(config.seed)
    lora = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=0.0, target_modules=targets)
    return get_peft_model(model, lora)


def joint_batch(peft_model, cache: Cache, seqs: torch.Tensor):
    """Re-run the LoRA'd base on whole sequences: (N, D) states at the flat positions of `seqs`, and those positions."""
    body, _ = split_model(peft_model.get_base_model())
    prompts = [cache.prompts[s] for s in seqs.tolist()]
    starts, lengths = cache.starts[seqs], cache.lengths[seqs]
    fulls = [
        torch.cat([p, cache.gen[a : a + n]]) for p, a, n in zip(prompts, starts.tolist(), lengths.tolist(), strict=True)
    ]
    width = max(len(f) for f in fulls)
    ids = torch.zeros(len(fulls), width, dtype=torch.long)
    for b, f in enumerate(fulls):
        ids[b, : len(f)] = f
    device = peft_model.get_base_model().device
    states = body(input_ids=ids.to(device)).last_hidden_state  # (B, T, D), LoRA active
    rows, flat = [], []
    for b, (p, a, n) in enumerate(zip(prompts, starts.tolist(), lengths.tolist(), strict=True)):
        rows.append(states[b, len(p) - 1 : len(p) - 1 + n])
        flat.append(torch.arange(a, a + n))
    return torch.cat(rows), torch.cat(flat)


# ----- feature drafters: whole sequences, unrolled -----
def feature_batch(cache: Cache, seqs: torch.Tensor, depth: int, first_root: int | None = None) -> dict:
    """Right-padded tensors of whole sequences for `FeatureDrafter.unrolled_features`.

    ids (S, T + depth) tokens x_0.. (0-padded), feats (S, T, D) the base's f_0 .. f_{T-1} (T = P + G - 1 at
    most), and per row j and step k: teacher (S, T, depth) flat cache index of the target x_{j+2+k} (-1: none,
    i.e. past the end or a prompt token) and feat_ok (S, T, depth) whether f_{j+1+k} exists; start: the first
    row deeper steps draft from, `first_root` (default: the shortest prompt's last row; a rank's share of a
    global batch passes the global batch's).
    """
    if cache.prompt_hidden is None:
        raise ValueError("this cache has no prompt states (built before feature drafters): rebuild it")
    rows = []
    for s in seqs.tolist():
        start, g = int(cache.starts[s]), int(cache.lengths[s])
        prompt = cache.prompts[s]
        ids = torch.cat([prompt, cache.gen[start : start + g]])  # (P + G,)
        feats = torch.cat([cache.prompt_hidden[s], cache.hidden[start : start + g]])  # (P + G - 1, D)
        rows.append((len(prompt), start, ids, feats))
    width = max(len(f) for *_, f in rows)
    d = rows[0][3].shape[1]
    ids = torch.zeros(len(rows), width + depth, dtype=torch.long)
    feats = torch.zeros(len(rows), width, d)
    teacher = torch.full((len(rows), width, depth), -1, dtype=torch.long)
    feat_ok = torch.zeros(len(rows), width, depth, dtype=torch.bool)
    j = torch.arange(width)[:, None] + torch.arange(depth)[None]  # (T, depth): j + k
    for b, (p, start, x, f) in enumerate(rows):
        ids[b, : len(x)] = x
        feats[b, : len(f)] = f
        q = j + 2  # sequence position of the target token
        ok = (q >= p) & (q < len(x)) & (torch.arange(width)[:, None] < len(f))
        teacher[b] = torch.where(ok, start + q - p, -1)
        feat_ok[b] = (j + 1 < len(f)) & (torch.arange(width)[:, None] < len(f))
    if first_root is None:
        first_root = min(p for p, *_ in rows) - 1  # the first row a decoding step can start from (the first root's)
    device = cache.gen.device
    tensors = {"ids": ids, "feats": feats, "teacher": teacher, "feat_ok": feat_ok}
    return {k: v.to(device) for k, v in tensors.items()} | {"start": first_root}


def feature_losses(drafter, model, cache: Cache, batch: dict):
    """Per unrolled step k: per-row KL to the base's distribution of x_{j+2+k}, per-element smooth L1 to
    f_{j+1+k} and top-1 hits vs the sampled token -> (kl, reg, hits) lists of length depth; step k's loss is
    mean(kl) + feature_weight x mean(reg)."""
    embed = model.get_input_embeddings().weight.detach()
    out_weight = model.get_output_embeddings().weight.detach()
    feats = batch["feats"]
    t, start = feats.shape[1], batch["start"]
    outs = drafter.unrolled_features(embed[batch["ids"][:, 1:]].float(), feats, batch["teacher"].shape[-1], start)
    kls, regs, hits = [], [], []
    for k, out in enumerate(outs):
        first = t - out.shape[1]  # row of out[:, 0]
        target = batch["teacher"][:, first:, k]  # (S, rows)
        ok = target >= 0
        logits = out[ok] @ out_weight.float().T  # (n, V)
        idx = target[ok]
        kls.append(soft_cross_entropy(logits, cache.teacher_probs[idx], cache.teacher_ids[idx]))  # (n,)
        fok = batch["feat_ok"][:, first:, k]
        shifted = torch.zeros_like(feats)
        shifted[:, : t - 1 - k] = feats[:, 1 + k :]  # f_{j+1+k} at row j
        regs.append(torch.nn.functional.smooth_l1_loss(out[fok], shifted[:, first:][fok], reduction="none"))
        hits.append((logits.argmax(-1) == cache.gen[idx]).float())
    return kls, regs, hits


# ----- checkpoints -----
def trainable(heads: DraftHeads, peft_model) -> dict[str, torch.nn.Parameter]:
    params = {f"heads.{k}": p for k, p in heads.named_parameters()}
    if peft_model is not None:
        params |= {f"lora.{k}": p for k, p in peft_model.named_parameters() if p.requires_grad}
    return params


def save_checkpoint(path: Path, step: int, params: dict, optimizer, config: TrainConfig, world_size: int = 1) -> None:
    """Params, AdamW state, step and the run's world size in ONE safetensors file, replaced atomically."""
    tensors = {k: p.detach().cpu().contiguous() for k, p in params.items()}
    state = optimizer.state_dict()
    for i, s in state["state"].items():
        for name, value in s.items():
            tensors[f"optim.{i}.{name}"] = torch.as_tensor(value).detach().cpu().contiguous()
    meta = {"step": str(step), "config": json.dumps(asdict(config)), "param_groups": json.dumps(state["param_groups"])}
    meta["world_size"] = str(world_size)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, tmp, metadata=meta)
    os.replace(tmp, path)


def load_checkpoint(path: Path, params: dict, optimizer, config: TrainConfig, world_size: int = 1) -> int:
    """Restore params and optimizer from `path`; the config and world size must match the ones it was written with."""
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        meta = f.metadata()
    saved_world = int(meta.get("world_size", 1))
    if saved_world != world_size:
        raise ValueError(
            f"cannot resume from {path}: it was written by a run of world size {saved_world}, this run has world size"
            f" {world_size}; resume with the same number of processes (torchrun --nproc_per_node {saved_world}"
            f" ..., or plain python for 1): the data order is defined per world size"
        )
    saved = json.loads(meta["config"])
    diff = {k: (saved.get(k), v) for k, v in asdict(config).items() if saved.get(k) != v and k != "checkpoint_every"}
    if diff:
        raise ValueError(f"cannot resume from {path}: its config differs in {diff} (saved, now)")
    tensors = load_file(path)
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(tensors[k])
    state = {"state": {}, "param_groups": json.loads(meta["param_groups"])}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, i, name = key.split(".", 2)
            state["state"].setdefault(int(i), {})[name] = value
    optimizer.load_state_dict(state)
    return int(meta["step"])


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ----- training -----
def _layout(drafter) -> tuple:
    """What a warm start must match: the kind and its layer counts (a feature drafter's depth is how far training
    unrolls its one layer, not a layout: a warm start may train it deeper)."""
    if isinstance(drafter, FeatureDrafter):
        return ("feature",)
    c = drafter.config
    return ("heads", c.num_heads, c.num_layers, c.root_token)


def warm_start(heads, config: TrainConfig) -> None:
    """Load the draft model in `config.init_heads` into the fresh `heads` (same kind and sizes).

    Its base is not checked against the model: a warm start is how heads follow a fine-tuned base (the demo
    LM after its short-phrase fine-tune); the trained result carries the new base's identity.
    """
    start = load_drafter(config.init_heads)
    have, want = _layout(start), _layout(heads)
    if have != want:
        raise ValueError(f"init_heads {config.init_heads} holds {have}, the config asks for {want}")
    try:
        heads.load_state_dict(start.state_dict())
    except RuntimeError as e:
        raise ValueError(f"init_heads {config.init_heads} does not fit this model's sizes: {e}") from e


def train(
    model,
    config: TrainConfig,
    cache_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    resume: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
) -> DraftHeads:
    """Train heads (and in joint mode a LoRA) on the cache; save heads (+ adapter) to `out_dir`.

    `stop_after` ends the run early after that step's checkpoint (used to test resuming).
    Under torchrun every rank calls this; batch_tokens / batch_sequences are per rank (global = x world size).
    """
    world = distributed.world()
    progress = progress and world.is_main
    out_dir = Path(out_dir)
    if world.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    if config.kind == "feature":
        heads = FeatureDrafter.from_model(model, depth=config.num_heads, seed=config.seed).float().train()
    else:
        heads = (
            DraftHeads.from_model(model, config.num_heads, config.num_layers, config.root_token, config.shared_output)
            .float()
            .train()
        )
    if config.init_heads:
        warm_start(heads, config)
    device = model.get_output_embeddings().weight.device
    cache = load_cache(cache_dir).to(device)
    hidden_size = split_model(model)[1].weight.shape[1]
    if cache.hidden.shape[1] != hidden_size:
        raise ValueError(f"cache {cache_dir} holds hidden size {cache.hidden.shape[1]}, the model has {hidden_size}")
    targets = cache.targets(config.num_heads)  # (M, H)
    usable = (targets[:, 0] >= 0).nonzero().flatten()  # states with at least head 0's target
    if config.kind == "feature" and cache.prompt_hidden is None:
        raise ValueError(f"cache {cache_dir} has no prompt states (built before feature drafters): rebuild it")
    sequence_lengths = cache.lengths.cpu() + lengths_of(cache.prompts)  # (S,) prompt + generated, for bucketing
    if len(cache.lengths) < world.size:
        raise ValueError(f"cache {cache_dir} holds {len(cache.lengths)} sequences, fewer than the {world.size} ranks")

    peft_model = None
    if config.mode == "joint":
        for p in model.parameters():
            p.requires_grad_(False)
        peft_model = add_lora(model, config)
    params = trainable(heads, peft_model)
    distributed.broadcast_params(list(params.values()))  # every rank starts from rank 0's weights
    groups = [{"params": list(heads.parameters()), "lr": config.lr, "peak": config.lr}]
    if peft_model is not None:
        lora = [p for k, p in params.items() if k.startswith("lora.")]
        groups.append({"params": lora, "lr": config.lora_lr, "peak": config.lora_lr})
    optimizer = torch.optim.AdamW(groups, weight_decay=config.weight_decay)

    ckpt = out_dir / CHECKPOINT_NAME
    step = load_checkpoint(ckpt, params, optimizer, config, world.size) if resume and ckpt.is_file() else 0
    if resume and not ckpt.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint {ckpt} to resume from")
    weights = [
        (config.head_weight * config.head_decay**k)
        if config.mode == "joint"
        else (config.head_decay**k if config.kind == "feature" else 1.0)
        for k in range(config.num_heads)
    ]
    bar = tqdm(total=config.steps, initial=step, desc=f"train {config.mode}", disable=not progress)
    history = []
    while step < config.steps:
        for g in optimizer.param_groups:
            g["lr"] = learning_rate(step, g["peak"], config)
        base_loss, h = None, config.num_heads
        if config.kind == "feature":
            seqs = bucketed_indices(step, sequence_lengths, config.batch_sequences * world.size, config.seed)
            start = int(min(len(cache.prompts[s]) for s in seqs.tolist())) - 1  # the global batch's first root
            batch = feature_batch(cache, world.share(seqs), h, start)
            kls, regs, hits = feature_losses(heads, model, cache, batch)
            means = distributed.global_means(kls + regs + hits)
            losses = [means[k] + config.feature_weight * means[h + k] for k in range(h)]
        elif peft_model is None:
            rows = world.share(usable[batch_indices(step, len(usable), config.batch_tokens * world.size, config.seed)])
            logits = heads(cache.hidden[rows], cache.gen[rows])
            per_row, hits = head_losses(logits, targets[rows], cache, config.loss)
            means = distributed.global_means(per_row + hits)
            losses = means[:h]
        else:
            seqs = world.share(
                batch_indices(step, len(cache.lengths), config.batch_sequences * world.size, config.seed)
            )
            states, rows = joint_batch(peft_model, cache, seqs)
            logits = split_model(peft_model.get_base_model())[1](states)  # (N, V)
            base_rows = soft_cross_entropy(logits, cache.teacher_probs[rows], cache.teacher_ids[rows])  # (N,)
            per_row, hits = head_losses(heads(states.float(), cache.gen[rows]), targets[rows], cache, config.loss)
            means = distributed.global_means([base_rows] + per_row + hits)
            base_loss, losses = means[0], means[1 : h + 1]
        top1 = means[-h:]  # this rank's share of each head's global top-1
        total = sum(w * lk for w, lk in zip(weights, losses, strict=True))
        if base_loss is not None:
            total = total + base_loss
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        distributed.all_reduce_grads([p for g in groups for p in g["params"]])  # sum of shares = global gradient
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], config.grad_clip)
        optimizer.step()
        step += 1
        shares = [total, *losses, *top1] + ([base_loss] if base_loss is not None else [])
        stats = distributed.all_reduce_sum(torch.stack([x.detach().float() for x in shares])).tolist()
        record = {"step": step, "loss": stats[0], "head_loss": stats[1 : h + 1], "top1": stats[h + 1 : 2 * h + 1]}
        if base_loss is not None:
            record["base_loss"] = stats[-1]
        history.append(record)
        bar.set_postfix(loss=f"{record['loss']:.3f}", top1="/".join(f"{a:.2f}" for a in record["top1"]))
        bar.update()
        if step % config.checkpoint_every == 0 or step == config.steps:
            if world.is_main:
                save_checkpoint(ckpt, step, params, optimizer, config, world.size)
            if stop_after is not None and step >= stop_after:
                break
    bar.close()
    heads.eval().requires_grad_(False)
    if world.is_main:
        heads.save_pretrained(out_dir)
        if peft_model is not None:
            save_adapter(peft_model, out_dir)
        batch = {"world_size": world.size, "global_batch_tokens": config.batch_tokens * world.size}
        batch["global_batch_sequences"] = config.batch_sequences * world.size
        record = {"config": asdict(config), "distributed": batch, "last": history[-1:]}
        _write_text(out_dir / TRAINING_RECORD, json.dumps(record, indent=2))
    if peft_model is not None:
        peft_model.unload()  # leave the caller's model as it was (LoRA layers removed, base weights untouched)
    distributed.barrier()  # the artifacts are saved before any rank returns
    return heads


def save_adapter(peft_model, out_dir: Path) -> None:
    """adapter_config.json + adapter_model.safetensors (peft's own file names) beside the heads."""
    tmp = out_dir / "adapter.tmp"
    peft_model.save_pretrained(tmp, safe_serialization=True)
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        os.replace(tmp / name, out_dir / name)
    for leftover in tmp.iterdir():
        leftover.unlink()
    tmp.rmdir()


@torch.no_grad()
def evaluate(heads, cache: Cache, loss: str = "kl", batch: int = 4096, model=None) -> dict:
    """Mean head loss and top-1 accuracy (vs the sampled token) per head (per depth) over a whole cache.

    A feature drafter needs the base `model` (its embedding and output layer)."""
    if isinstance(heads, FeatureDrafter):
        return evaluate_feature(heads, model, cache)
    targets = cache.targets(heads.config.num_heads)
    h = heads.config.num_heads
    sums, hit_sums, counts = [0.0] * h, [0.0] * h, [0] * h
    for start in range(0, len(cache.gen), batch):
        rows = torch.arange(start, min(start + batch, len(cache.gen)))
        losses, hits = head_losses(heads(cache.hidden[rows], cache.gen[rows]), targets[rows], cache, loss)
        for k in range(h):
            n = len(hits[k])
            sums[k] += float(losses[k].sum())
            hit_sums[k] += float(hits[k].sum())
            counts[k] += n
    return {
        "loss": [s / max(1, c) for s, c in zip(sums, counts, strict=True)],
        "top1": [s / max(1, c) for s, c in zip(hit_sums, counts, strict=True)],
    }


def config_from_dict(values: dict) -> TrainConfig:
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown training option(s) {unknown}; expected some of {sorted(known)}")
    return TrainConfig(**values)


@torch.no_grad()
def evaluate_feature(drafter: FeatureDrafter, model, cache: Cache, sequences: int = 16) -> dict:
    """`evaluate` for a feature drafter: loss and top-1 per unrolled depth, over whole sequences."""
    if model is None:
        raise ValueError("evaluating a feature drafter needs the base model")
    depth = drafter.config.depth
    weight = TrainConfig.feature_weight
    sums, hit_sums, counts = [0.0] * depth, [0.0] * depth, [0] * depth
    for start in range(0, len(cache.lengths), sequences):
        seqs = torch.arange(start, min(start + sequences, len(cache.lengths)))
        kls, regs, hits = feature_losses(drafter, model, cache, feature_batch(cache, seqs, depth))
        for k in range(depth):
            loss = kls[k].mean() + weight * regs[k].mean() if len(kls[k]) else torch.zeros(())
            sums[k] += float(loss) * len(hits[k])
            hit_sums[k] += float(hits[k].sum())
            counts[k] += len(hits[k])
    return {
        "loss": [s / max(1, c) for s, c in zip(sums, counts, strict=True)],
        "top1": [s / max(1, c) for s, c in zip(hit_sums, counts, strict=True)],
    }
