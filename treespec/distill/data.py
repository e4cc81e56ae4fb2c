"""The distillation dataset: the target's own text, its features and its next-token distributions.

1. Text: the target's own (distill/generate.py: sampled "user texts" from generic seed prefixes, continued
   greedily or sampled, mostly through the chat template). Or `--text FILE`, cut into pieces.
2. Draft vocabulary: the `draft_vocab` most frequent token ids of that text (ties: lower id first).
3. Teacher pass: one target forward per sequence keeps its post-norm hidden states h (the features) and its top-K
   probabilities over the draft vocabulary (the labels; softmax over the subset only, as the draft sees it).

Position i of a sequence stores h_i and the target's distribution of x_{i+1}; training pairs index into these.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from tqdm import tqdm

from treespec.attention.metadata import SeqAttention
from treespec.models.truncated_head import VocabSubset
from treespec.errors import ConfigError
from treespec.models.lm_head import capped

DATASET_FILE, DATASET_META = "dataset.safetensors", "dataset.json"
FORMAT = 1
MAX_TEACHER_ROWS = 2048  # rows per teacher forward (several sequences packed ragged)


@dataclass(frozen=True)
class DataConfig:
    num_samples: int = 512    # generated sequences (ignored with `text`)
    max_tokens: int = 256     # tokens generated per sequence; with `text`, tokens per piece
    draft_vocab: int = 32768
    top_k: int = 8            # label probabilities kept per row
    seed: int = 0
    text: str | None = None   # a local UTF-8 file to use instead of generated text

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name in ("num_samples", "max_tokens", "draft_vocab", "top_k") and not _positive_int(v):
                raise ConfigError(f"--{f.name.replace('_', '-')}: must be a positive integer, got {v!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"--seed: must be an integer >= 0, got {self.seed!r}")
        if self.text is not None and not (os.path.isfile(self.text) and os.access(self.text, os.R_OK)):
            raise ConfigError(f"--text: cannot read {self.text!r} (not a readable file)")

    def key(self, target: str) -> dict:
        """Everything the dataset depends on: a stored dataset is reused only when this matches."""
        key = {**asdict(self), "target": target, "format": FORMAT}
        if self.text is not None:
            del key["num_samples"]  # not used with a text file
            key["text"] = str(Path(self.text).resolve())
            key["text_sha256"] = hashlib.sha256(Path(self.text).read_bytes()).hexdigest()
        return key


def _positive_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


@dataclass
class DistillData:
    """Sequences packed flat; sequence s owns positions offsets[s]:offsets[s+1] of every per-position tensor."""
    tokens: torch.Tensor       # [T] int32
    offsets: torch.Tensor      # [S + 1] int64
    features: torch.Tensor     # [T, D] fp16, the target's h_i
    label_ids: torch.Tensor    # [T, K] int32, indices into vocab_ids, best first
    label_probs: torch.Tensor  # [T, K] fp16, the target's p(x_{i+1}) over the draft vocabulary
    vocab_ids: torch.Tensor    # [N] int64, ascending target ids
    key: dict = field(default_factory=dict)
    stats: dict = field(default_factory=dict)

    @property
    def num_seqs(self) -> int:
        return self.offsets.numel() - 1

    def lengths(self) -> torch.Tensor:  # -> [S]
        return self.offsets[1:] - self.offsets[:-1]

    def save(self, out_dir: Path) -> None:
        from safetensors.torch import save_file
        out_dir.mkdir(parents=True, exist_ok=True)
        tensors = {"tokens": self.tokens, "offsets": self.offsets, "features": self.features,
                   "label_ids": self.label_ids, "label_probs": self.label_probs, "vocab_ids": self.vocab_ids}
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(out_dir / (DATASET_FILE + ".tmp")))
        os.replace(out_dir / (DATASET_FILE + ".tmp"), out_dir / DATASET_FILE)
        # the JSON last: a dataset without it (an interrupted save) is never reused
        (out_dir / DATASET_META).write_text(json.dumps({"key": self.key, "stats": self.stats}, indent=2) + "\n")

    @classmethod
    def load(cls, out_dir: Path, key: dict) -> "DistillData | None":
        """The dataset stored in out_dir if it was built with `key`, else None."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            meta = json.loads((out_dir / DATASET_META).read_text())
            if meta.get("key") != key:
                return None
            t = load_file(str(out_dir / DATASET_FILE))
            return cls(t["tokens"], t["offsets"], t["features"], t["label_ids"], t["label_probs"], t["vocab_ids"],
                       meta["key"], meta.get("stats", {}))
        except (OSError, ValueError, KeyError, SafetensorError):
            return None


def build_dataset(llm, cfg: DataConfig, out_dir: Path, progress: bool = True) -> DistillData:
    """Reuse out_dir's dataset when it was built from the same arguments; else build and save it."""
    key = cfg.key(str(llm.checkpoint_source))
    if (data := DistillData.load(out_dir, key)) is not None:
        if progress:
            print(f"reusing the dataset in {out_dir} ({data.num_seqs} sequences, {data.tokens.numel()} tokens)")
        return data
    t0 = time.perf_counter()
    if cfg.text is not None:
        seqs = text_sequences(llm, cfg.text, min(cfg.max_tokens, llm.engine.max_len))
    else:
        seqs = generate_sequences(llm, cfg, progress)
    gen_s = time.perf_counter() - t0
    vocab_ids = draft_vocabulary(seqs, llm.target.config.vocab_size, cfg.draft_vocab)
    t1 = time.perf_counter()
    features, label_ids, label_probs = teacher_pass(llm.target, seqs, vocab_ids, cfg.top_k, progress)
    lengths = torch.tensor([0] + [len(s) for s in seqs])
    stats = {"sequences": len(seqs), "tokens": int(lengths.sum()), "text_s": round(gen_s, 3),
             "teacher_s": round(time.perf_counter() - t1, 3)}
    data = DistillData(torch.tensor([t for s in seqs for t in s], dtype=torch.int32), lengths.cumsum(0),
                       features, label_ids, label_probs, vocab_ids, key, stats)
    data.save(out_dir)
    return data


# ---- 1. text ------------------------------------------------------------------------------------------------
def generate_sequences(llm, cfg: DataConfig, progress: bool = True) -> list[list[int]]:
    """num_samples sequences (prompt + output ids) written by the target (see distill/generate.py)."""
    from treespec.distill.generate import GenerationPlan, self_generated_sequences
    seqs = self_generated_sequences(llm, GenerationPlan(cfg.num_samples, cfg.max_tokens, cfg.seed), progress)
    return [s for s in seqs if len(s) >= 2]


def text_sequences(llm, path: str, piece: int) -> list[list[int]]:
    """A local text file, tokenized once and cut into pieces of `piece` tokens (a last piece under 2 is dropped)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--text: cannot read {path!r}: {e}") from None
    ids = llm.tokenizer.encode(text) if text.strip() else []
    seqs = [ids[i:i + piece] for i in range(0, len(ids), piece)]
    seqs = [s for s in seqs if len(s) >= 2]
    if len(seqs) < 2:
        raise ConfigError(f"--text: {path!r} gives {len(ids)} tokens, too few for two sequences of {piece}")
    return seqs


# ---- 2. draft vocabulary --------------------------------------------------------------------------------------
def draft_vocabulary(seqs: list[list[int]], vocab_size: int, size: int) -> torch.Tensor:  # -> [N] int64
    """The `size` most frequent ids over seqs (ties: lower id first), ascending."""
    counts = torch.bincount(torch.tensor([t for s in seqs for t in s]), minlength=vocab_size)[:vocab_size]
    return VocabSubset(vocab_size, size, counts).ids().clone()


# ---- 3. teacher pass ------------------------------------------------------------------------------------------
def subset_logits(hidden: torch.Tensor, head_rows: torch.Tensor,
                  softcap: float | None) -> torch.Tensor:  # hidden: [..., D], head_rows: [N, D] -> [..., N]
    """The target's logits restricted to the draft vocabulary (softcapped like its full head)."""
    return capped(hidden @ head_rows.T, softcap)


@torch.inference_mode()
def teacher_pass(model, seqs: list[list[int]], vocab_ids: torch.Tensor, top_k: int,
                 progress: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """features [T, D] fp16, label ids [T, K] int32 (subset-local) and probs [T, K] fp16 for seqs packed flat."""
    head_rows = model.lm_head.weight[vocab_ids]
    k = min(top_k, vocab_ids.numel())
    feats, ids, probs = [], [], []
    with tqdm(total=sum(map(len, seqs)), desc="teacher pass", unit="tok", disable=not progress) as bar:
        for group in ragged_groups([len(s) for s in seqs], MAX_TEACHER_ROWS):
            h = target_features(model, [seqs[i] for i in group])
            p = subset_logits(h, head_rows, model.lm_head.softcap).softmax(dim=-1)
            top = p.topk(k, dim=-1)
            feats.append(h.half())
            ids.append(top.indices.int())
            probs.append(top.values.half())
            bar.update(h.shape[0])
    return torch.cat(feats), torch.cat(ids), torch.cat(probs)


def ragged_groups(lengths: list[int], max_rows: int) -> list[list[int]]:
    """Consecutive sequence indices packed while their total stays <= max_rows (a longer one goes alone)."""
    groups: list[list[int]] = []
    rows = 0
    for i, n in enumerate(lengths):
        if not groups or rows + n > max_rows:
            groups.append([])
            rows = 0
        groups[-1].append(i)
        rows += n
    return groups


def target_features(model, seqs: list[list[int]]) -> torch.Tensor:  # -> [sum of lengths, D] fp32
    """The target's post-norm final hidden states of several sequences, each from position 0, in one forward."""
    tokens, positions, meta = [], [], []
    start = 0
    for s in seqs:
        cache = model.new_cache(len(s))
        cache.reserve(len(s))
        tokens.append(torch.tensor(s, dtype=torch.long))
        positions.append(torch.arange(len(s)))
        meta.append(SeqAttention(cache=cache, start=start, n=len(s)))
        start += len(s)
    return model(torch.cat(tokens), torch.cat(positions), meta)
