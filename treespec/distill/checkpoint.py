"""Resumable training state, safetensors only (no pickle): the drafter's tensors, AdamW's per-parameter state
flattened by name, and a JSON with the step, the arguments and the batch sampler's RNG state.

Both files are written under temporary names and renamed; the step is stored in both, so a pair left mixed by an
interruption between the two renames is refused instead of resumed from.
"""
from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from treespec.errors import ConfigError

CKPT_TENSORS, CKPT_JSON = "checkpoint.safetensors", "checkpoint.json"


@dataclass
class Checkpoint:
    step: int                  # optimizer steps done
    drafter: int               # which of the collective's drafters was training
    args: dict                 # TrainConfig as JSON
    data: dict                 # the dataset's key
    rng: torch.Tensor          # the batch sampler's generator state
    done: list[dict]           # results of the drafters finished before this one
    tensors: dict[str, torch.Tensor]


def save_checkpoint(out_dir: Path, step: int, drafter: int, args: dict, data: dict, rng: torch.Tensor,
                    net: torch.nn.Module, opt: torch.optim.Optimizer, done: list[dict]) -> None:
    from safetensors.torch import save_file
    tensors = {f"model/{name}": p.detach() for name, p in net.named_parameters()}
    for name, p in net.named_parameters():
        for key, value in opt.state.get(p, {}).items():
            tensors[f"adamw/{name}/{key}"] = torch.as_tensor(value)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"step": step, "drafter": drafter, "args": args, "data": data, "done": done,
            "rng": base64.b64encode(rng.numpy().tobytes()).decode("ascii")}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out_dir / (CKPT_TENSORS + ".tmp")),
              metadata={"step": str(step), "drafter": str(drafter)})
    (out_dir / (CKPT_JSON + ".tmp")).write_text(json.dumps(meta, indent=1) + "\n")
    os.replace(out_dir / (CKPT_TENSORS + ".tmp"), out_dir / CKPT_TENSORS)
    os.replace(out_dir / (CKPT_JSON + ".tmp"), out_dir / CKPT_JSON)


def load_checkpoint(out_dir: Path) -> Checkpoint | None:
    """The checkpoint in out_dir, or None when there is none (or only a half-written one)."""
    from safetensors import SafetensorError, safe_open
    try:
        meta = json.loads((out_dir / CKPT_JSON).read_text())
        with safe_open(str(out_dir / CKPT_TENSORS), "pt") as f:
            stamp = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        rng = torch.frombuffer(bytearray(base64.b64decode(meta["rng"])), dtype=torch.uint8)
        if stamp.get("step") != str(meta["step"]) or stamp.get("drafter") != str(meta["drafter"]):
            return None
        return Checkpoint(int(meta["step"]), int(meta["drafter"]), meta["args"], meta["data"], rng,
                          meta["done"], tensors)
    except (OSError, ValueError, KeyError, TypeError, SafetensorError):
        return None


def restore(ckpt: Checkpoint, net: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    """Put the checkpoint's tensors into net and its AdamW state into opt (whose params are net's)."""
    missing = [name for name, _ in net.named_parameters() if f"model/{name}" not in ckpt.tensors]
    if missing:
        raise ConfigError(f"--resume: the checkpoint lacks {missing[0]!r} (written by another treespec version?)")
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.copy_(ckpt.tensors[f"model/{name}"])
    for name, p in net.named_parameters():
        prefix = f"adamw/{name}/"
        state = {k[len(prefix):]: v.clone() for k, v in ckpt.tensors.items() if k.startswith(prefix)}
        if state:
            opt.state[p] = state


def remove_checkpoint(out_dir: Path) -> None:
    for name in (CKPT_TENSORS, CKPT_JSON):
        (out_dir / name).unlink(missing_ok=True)
