"""Training learned drafters on a DistillData: soft cross-entropy against the target's top-K labels.

Loss of pass j (rows t >= j, each row times its weight): CE(target's renormalised top-K, draft log-softmax over the
draft vocabulary) + for a head `feature_weight` x smooth-L1(pass output, h_{t+1}). Passes are the EAGLE-3-style
unrolled levels of distill/net.py (one for an ssm). AdamW with warmup then cosine decay, grad-norm clip 1.0.

Collective boost-tuning (SpecInfer): drafters 0..K-1 train in turn; drafter k's row weight is 0 where an earlier
drafter's pass-0 argmax already equals the target's top-1, so later drafters learn the rows the others miss.
The rows are judged with each drafter as shipped (fp16 weights), so a resumed run sees the same weights.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from treespec.distill.batches import Window, batched, gather, sample_windows, split, tile_windows
from treespec.distill.checkpoint import Checkpoint, load_checkpoint, remove_checkpoint, restore, save_checkpoint
from treespec.distill.data import DistillData
from treespec.distill.net import TrainDraftNet
from treespec.errors import ConfigError
from treespec.models.draft_net import WEIGHTS_FILE, DraftNetConfig, DraftNetKind, load_drafter, save_drafter

SPEC_FILE = "speculative.json"
GRAD_CLIP = 1.0
WEIGHT_DECAY = 0.01  # matrices only; norm weights are not decayed


@dataclass(frozen=True)
class TrainConfig:
    kind: DraftNetKind = DraftNetKind.HEAD
    layers: int = 1
    heads: int | None = None              # None: the target's
    head_dim: int | None = None           # None: the target's
    intermediate_size: int | None = None  # None: the target's
    steps: int = 2000
    batch_size: int = 8
    seq_len: int = 256
    lr: float = 1e-3
    unroll: int = 3                       # passes for a head (an ssm has one)
    num_drafters: int = 1
    feature_weight: float = 0.1
    seed: int = 0
    checkpoint_every: int = 500
    eval_every: int = 200

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "kind", DraftNetKind(self.kind))
        except ValueError:
            raise ConfigError(f"--kind: {self.kind!r} is not one of 'head', 'ssm'") from None
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name in ("kind", "lr", "feature_weight", "seed") or (v is None and f.default is None):
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ConfigError(f"--{f.name.replace('_', '-')}: must be a positive integer, got {v!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"--seed: must be an integer >= 0, got {self.seed!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"--lr: must be a positive number, got {self.lr!r}")
        if not (math.isfinite(self.feature_weight) and self.feature_weight >= 0):
            raise ConfigError(f"feature_weight: must be >= 0, got {self.feature_weight!r}")

    @property
    def passes(self) -> int:
        return self.unroll if self.kind is DraftNetKind.HEAD else 1

    @property
    def warmup(self) -> int:
        return max(1, min(200, self.steps // 10))

    def lr_at(self, step: int) -> float:
        """Linear warmup, then cosine decay to zero at `steps`."""
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        done = (step - self.warmup) / max(1, self.steps - self.warmup)
        return self.lr * 0.5 * (1.0 + math.cos(math.pi * done))

    def to_json(self) -> dict:
        return {**asdict(self), "kind": self.kind.value}


@dataclass
class DrafterResult:
    path: str
    steps: int
    wall_s: float                  # this run's training time (0 for a drafter finished before a resume)
    rows_per_s: float              # training rows (padding excluded) per second
    acceptance_start: list[float]  # held-out acceptance per pass before training (or at the resumed step)
    acceptance: list[float]        # held-out acceptance per pass at the end
    size_bytes: int
    row_weights: torch.Tensor | None = None  # [T] the boost weights it trained with (per dataset position)

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "row_weights"}


@dataclass
class TrainResult:
    drafters: list[DrafterResult]
    spec_path: Path


def draft_config(model, data: DistillData, cfg: TrainConfig, target_name: str = "") -> DraftNetConfig:
    """The drafter's shape: the target's width and vocabulary, the target's head layout unless overridden."""
    mc = model.config
    heads = cfg.heads or mc.num_heads
    raw = DraftNetConfig(cfg.kind, mc.hidden_size, mc.vocab_size, int(data.vocab_ids.numel()), cfg.layers, heads,
                         heads, cfg.head_dim or mc.head_dim, cfg.intermediate_size or mc.intermediate_size,
                         mc.rms_norm_eps, max_position_embeddings=mc.max_position_embeddings, target=target_name)
    return DraftNetConfig.from_json(raw.to_json())  # validates (e.g. an odd head_dim)


def new_net(model, data: DistillData, dcfg: DraftNetConfig, seed: int) -> TrainDraftNet:
    head_rows = model.lm_head.weight[data.vocab_ids]
    return TrainDraftNet(dcfg, model.embed_tokens.weight.detach(), model.embed_tokens.scale, head_rows,
                         torch.Generator().manual_seed(seed), model.lm_head.softcap)


def batch_loss(net: TrainDraftNet, b, cfg: TrainConfig) -> torch.Tensor:
    """Sum over passes of the row-weighted mean loss (pass j scores rows t >= j)."""
    outs = net.unrolled(b.tokens, b.features if net.cfg.features else None, cfg.passes)
    total = torch.zeros(())
    for j, out in enumerate(outs):                                       # out: [B, L, D]
        w = b.weights.clone()
        w[:, :j] = 0.0
        denom = w.sum().clamp(min=1.0)
        logq = net.logits(out).log_softmax(dim=-1)                            # [B, L, N]
        ce = -(b.label_probs * logq.gather(-1, b.label_ids)).sum(-1)          # [B, L]
        loss = (ce * w).sum() / denom
        if net.cfg.features and cfg.feature_weight:
            feat = F.smooth_l1_loss(out, b.next_features, reduction="none").mean(-1)
            loss = loss + cfg.feature_weight * (feat * w).sum() / denom
        total = total + loss
    return total


@torch.no_grad()
def pass_hits(net: TrainDraftNet, b, passes: int) -> list[torch.Tensor]:
    """Per pass, [B, L] bool: a scored row (not padding, t >= j) whose draft argmax is the target's top-1."""
    outs = net.unrolled(b.tokens, b.features if net.cfg.features else None, passes)
    hits = []
    for j, out in enumerate(outs):
        scored = b.weights > 0
        scored[:, :j] = False
        hits.append(scored & (net.logits(out).argmax(-1) == b.label_ids[..., 0]))
    return hits


@torch.no_grad()
def evaluate(net: TrainDraftNet, data: DistillData, windows: list[Window], cfg: TrainConfig) -> list[float]:
    """Held-out acceptance per pass: the share of scored rows whose draft argmax equals the target's top-1."""
    right, count = torch.zeros(cfg.passes), torch.zeros(cfg.passes)
    for group in batched(windows, cfg.batch_size):
        b = gather(data, group, cfg.seq_len)
        for j, hit in enumerate(pass_hits(net, b, cfg.passes)):
            right[j] += hit.sum()
            count[j] += (b.weights[:, j:] > 0).sum()
    return (right / count.clamp(min=1)).tolist()


@torch.no_grad()
def first_pass_hits(net: TrainDraftNet, data: DistillData, seqs: list[int], cfg: TrainConfig) -> torch.Tensor:
    """[T] bool per dataset position: rows of seqs where the drafter's pass-0 argmax equals the target's top-1."""
    hits = torch.zeros(data.tokens.numel(), dtype=torch.bool)
    for group in batched(tile_windows(data, seqs, cfg.seq_len), cfg.batch_size):
        b = gather(data, group, cfg.seq_len)
        (hit,) = pass_hits(net, b, 1)
        hits[b.rows[hit]] = True
    return hits


def check_resume(out_dir: Path, cfg: TrainConfig) -> Checkpoint:
    """The checkpoint to resume from; ConfigError if there is none or it was written with other arguments."""
    ckpt = load_checkpoint(out_dir)
    if ckpt is None:
        raise ConfigError(f"--resume: no checkpoint in {str(out_dir)!r}")
    args = cfg.to_json()
    diff = [f"{k} {ckpt.args.get(k)!r} -> {args.get(k)!r}" for k in sorted(set(args) | set(ckpt.args))
            if args.get(k) != ckpt.args.get(k)]
    if diff:
        raise ConfigError(f"--resume: the checkpoint was written with other arguments: {', '.join(diff)}")
    return ckpt


def train_drafters(model, data: DistillData, cfg: TrainConfig, out_dir: Path, resume: bool = False,
                   target_name: str = "", progress: bool = True) -> TrainResult:
    """Train cfg.num_drafters drafters in turn into out_dir/drafter-k, then write out_dir/speculative.json."""
    ckpt = check_resume(out_dir, cfg) if resume else None
    if ckpt is not None and ckpt.data != data.key:
        raise ConfigError("--resume: the checkpoint was trained on a different dataset")
    train_seqs, eval_seqs = split(data, cfg.seed)
    dcfg = draft_config(model, data, cfg, target_name)
    results = [DrafterResult(**d) for d in ckpt.done] if ckpt is not None else []
    caught = torch.zeros(data.tokens.numel(), dtype=torch.bool)  # rows an earlier drafter gets right
    for k in range(len(results)):
        caught |= _shipped_hits(model, data, dcfg, out_dir / f"drafter-{k}", train_seqs, cfg)
    for k in range(len(results), cfg.num_drafters):
        weights = (~caught).float()
        results.append(_train_one(model, data, cfg, dcfg, k, weights, train_seqs, eval_seqs, out_dir,
                                  ckpt, results, progress))
        ckpt = None
        if k + 1 < cfg.num_drafters:
            caught |= _shipped_hits(model, data, dcfg, out_dir / f"drafter-{k}", train_seqs, cfg)
    spec = {"drafters": [{"method": "learned", "model": str((out_dir / f"drafter-{k}").resolve())}
                         for k in range(cfg.num_drafters)]}
    spec_path = out_dir / SPEC_FILE
    spec_path.write_text(json.dumps(spec, indent=2) + "\n")
    remove_checkpoint(out_dir)
    return TrainResult(results, spec_path)


def _shipped_hits(model, data: DistillData, dcfg: DraftNetConfig, path: Path, seqs: list[int],
                  cfg: TrainConfig) -> torch.Tensor:
    """first_pass_hits of the drafter saved at path (fp16 weights, as shipped)."""
    saved_cfg, tensors, _ = load_drafter(path)
    if saved_cfg != dcfg:
        raise ConfigError(f"--resume: {str(path)!r} does not match this run's drafter config")
    net = new_net(model, data, dcfg, 0)
    net.load_tensors(tensors)
    return first_pass_hits(net, data, seqs, cfg)


def _train_one(model, data: DistillData, cfg: TrainConfig, dcfg: DraftNetConfig, k: int, weights: torch.Tensor,
               train_seqs: list[int], eval_seqs: list[int], out_dir: Path, ckpt: Checkpoint | None,
               done: list[DrafterResult], progress: bool) -> DrafterResult:
    """Train drafter k from scratch (or from ckpt), checkpointing every cfg.checkpoint_every steps."""
    net = new_net(model, data, dcfg, cfg.seed * 1009 + k)
    matrices = [p for p in net.parameters() if p.dim() > 1]
    vectors = [p for p in net.parameters() if p.dim() <= 1]
    opt = torch.optim.AdamW([{"params": matrices, "weight_decay": WEIGHT_DECAY},
                             {"params": vectors, "weight_decay": 0.0}], lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed * 1009 + k + 1)
    step = 0
    if ckpt is not None:
        restore(ckpt, net, opt)
        gen.set_state(ckpt.rng)
        step = ckpt.step
    eval_windows = tile_windows(data, eval_seqs, cfg.seq_len)
    acc_start = acc = evaluate(net, data, eval_windows, cfg)
    rows, t0, loss = 0, time.perf_counter(), float("nan")
    desc = f"drafter {k}" if cfg.num_drafters > 1 else "training"
    with tqdm(total=cfg.steps, initial=step, desc=desc, unit="step", disable=not progress) as bar:
        while step < cfg.steps:
            for group in opt.param_groups:
                group["lr"] = cfg.lr_at(step)
            b = gather(data, sample_windows(data, train_seqs, cfg.batch_size, cfg.seq_len, gen), cfg.seq_len, weights)
            opt.zero_grad(set_to_none=True)
            total = batch_loss(net, b, cfg)
            total.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), GRAD_CLIP)
            opt.step()
            step += 1
            rows += b.num_rows
            loss = float(total.detach())
            if step % cfg.eval_every == 0 or step == cfg.steps:
                acc = evaluate(net, data, eval_windows, cfg)
            bar.set_postfix_str(f"loss={loss:.3f} acc0={acc[0]:.3f}" + (f" acc{len(acc) - 1}={acc[-1]:.3f}"
                                                                        if len(acc) > 1 else ""))
            bar.update(1)
            if step % cfg.checkpoint_every == 0 and step < cfg.steps:
                save_checkpoint(out_dir, step, k, cfg.to_json(), data.key, gen.get_state(), net, opt,
                                [d.to_json() for d in done])
    wall = time.perf_counter() - t0
    path = out_dir / f"drafter-{k}"
    save_drafter(path, dcfg, net.tensors(), data.vocab_ids)
    return DrafterResult(str(path), cfg.steps, wall, rows / wall if wall > 0 else 0.0, acc_start, acc,
                         (path / WEIGHTS_FILE).stat().st_size, weights)
