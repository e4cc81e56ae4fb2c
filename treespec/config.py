"""Engine and speculation settings: small validated dataclasses, built from dicts/JSON with errors naming the field.

Accepted speculative configs:
- vLLM-compatible: {"method": "ngram", "prompt_lookup_min": a, "prompt_lookup_max": b, "num_speculative_tokens": k}
  and {"method": "draft_model", "model": PATH, "num_speculative_tokens": k}.
- self-speculation: {"method": "layer_skip", "layers": [0, 2, ...] | [[...], [...]] | null (auto),
  "draft_vocab_size": 32768 | null, "draft_vocab_counts": PATH | null, "quantization": "none" | "fp16" | "int8"}.
- treespec's tree form: {"drafters": [{...}, {...}], "budget": 24 | "auto", "max_depth": 8,
  "draft_sampling": "iid" | "without_replacement" | "deterministic" | "coupled"}; each drafter dict takes the fields of
  DrafterConfig. A top-level "method" is shorthand for a single drafter.
- learned drafters: {"method": "learned", "model": DIR} (a `treespec distill` output directory: head or ssm).
- {"method": "auto"}: the best drafters available for the model: n-gram drafting (prompt lookup + hierarchical
  databases) merged with the trained drafter shipped for that model where that measured faster, and for sampling
  requests the model's shipped sampling drafter if any (default model: the coupled fp16 self-draft).
- every drafter takes "requests": "all" | "greedy" | "sampling" (which requests it drafts for).
- {"method": "none"} (or an empty dict) disables speculation.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from enum import Enum
from pathlib import Path
from typing import Any

from treespec.device import DType, Kernels, check_device
from treespec.errors import ConfigError


class DrafterMethod(Enum):
    NGRAM = "ngram"              # prompt lookup + hierarchical n-gram databases
    DRAFT_MODEL = "draft_model"  # a smaller LM with the same tokenizer (SpecInfer's SSM)
    LAYER_SKIP = "layer_skip"    # the target itself with layers skipped (self-speculation, no extra weights)
    LEARNED = "learned"          # a head or SSM trained by `treespec distill` (over the target's embeddings)


class DraftRequests(Enum):
    """Which requests a drafter drafts for: `auto` gives greedy and sampling requests different drafters."""
    ALL = "all"
    GREEDY = "greedy"      # temperature 0 only
    SAMPLING = "sampling"  # temperature > 0 only


class DraftSampling(Enum):
    """How a drafter picks children when the request samples (T > 0); greedy requests always use top-k."""
    IID = "iid"                                  # i.i.d. draws from q: SpecInfer MSS
    WITHOUT_REPLACEMENT = "without_replacement"  # Gumbel-top-k draws: Sequoia's rule with the q-update
    DETERMINISTIC = "deterministic"              # top-k children, q treated as one-hot
    COUPLED = "coupled"                          # one-hot children ranked with the output's own Gumbel noise


class ExecutorBackend(Enum):
    """Who starts the ranks of a tensor/pipeline-parallel group (vLLM's names)."""
    MP = "mp"                                # treespec spawns its workers on this node (multiprocessing)
    RAY = "ray"                              # workers placed by a Ray placement group (several nodes)
    EXTERNAL_LAUNCHER = "external_launcher"  # every rank started by torchrun; rank 0 drives, the others serve


class WeightQuantization(Enum):
    NONE = "none"  # fp32, exact
    FP16 = "fp16"  # fp16 weights, fp32 math (fbgemm); approximate
    INT8 = "int8"  # int8 weights; approximate
    BLOCKS = "blocks"  # a GGUF's quantized weights computed from their blocks, fp32 math; exact (the GGUF's model)
    AUTO = "auto"  # BLOCKS for a GGUF (tensor-parallel shards too), else NONE: the fastest exact mode

    def resolve(self, blocks_possible: bool) -> "WeightQuantization":
        """AUTO -> BLOCKS where they can run (a GGUF on the CPU kernels), else NONE; other modes unchanged."""
        if self is not WeightQuantization.AUTO:
            return self
        return WeightQuantization.BLOCKS if blocks_possible else WeightQuantization.NONE


def _enum(enum: type[Enum], value: Any, name: str) -> Enum:
    if isinstance(value, enum):
        return value
    try:
        return enum(value)
    except ValueError:
        allowed = ", ".join(repr(m.value) for m in enum)
        raise ConfigError(f"{name}: {value!r} is not one of {allowed}") from None


def _check_int(value: Any, name: str, lo: int, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name}: expected an integer, got {value!r}")
    if value < lo or (hi is not None and value > hi):
        bound = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ConfigError(f"{name}: {value} must be {bound}")
    return value


@dataclass
class DrafterConfig:
    method: DrafterMethod
    num_speculative_tokens: int | None = None  # tree depth this drafter proposes (default: ngram 8, others 5)
    model: str | None = None                 # draft_model: path or alias of the SSM; learned: its directory
    expansion: list[int] | None = None       # draft_model: static expansion <k1..km>; None = best-first under budget
    branch: int = 4                          # draft_model best-first: children considered per expanded node
    prompt_lookup_min: int = 1               # ngram: shortest suffix matched
    prompt_lookup_max: int = 5               # ngram: longest suffix matched (vLLM's default)
    max_continuations: int = 8               # ngram: distinct continuations merged into one tree
    corpus: str | None = None                # ngram: optional static corpus text file (lowest-locality database)
    layers: list[int] | list[list[int]] | None = None  # layer_skip: layer subset(s) to choose from; None = auto
    draft_vocab_size: int | None = None      # layer_skip: draft head over the N most frequent tokens; None = all
    draft_vocab_counts: str | None = None    # layer_skip: JSON token counts seeding the frequencies
    quantization: WeightQuantization = WeightQuantization.NONE  # layer_skip: the draft's own fp16/int8 copy of its layers
    requests: DraftRequests = DraftRequests.ALL  # the requests it drafts for (others get the other drafters' trees)

    def __post_init__(self) -> None:
        self.method = _enum(DrafterMethod, self.method, "method")
        self.requests = _enum(DraftRequests, self.requests, "requests")
        if self.num_speculative_tokens is None:
            self.num_speculative_tokens = 8 if self.method is DrafterMethod.NGRAM else 5
        _check_int(self.num_speculative_tokens, "num_speculative_tokens", 1, 64)
        _check_int(self.branch, "branch", 1, 64)
        _check_int(self.prompt_lookup_min, "prompt_lookup_min", 1, 64)
        _check_int(self.prompt_lookup_max, "prompt_lookup_max", 1, 64)
        _check_int(self.max_continuations, "max_continuations", 1, 64)
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ConfigError("prompt_lookup_min: must be <= prompt_lookup_max")
        if self.method in (DrafterMethod.DRAFT_MODEL, DrafterMethod.LEARNED) and not self.model:
            raise ConfigError(f"model: the {self.method.value} method needs a draft model path")
        self._check_layer_skip()
        if self.expansion is not None:
            if not isinstance(self.expansion, list) or not self.expansion:
                raise ConfigError("expansion: expected a non-empty list of integers, e.g. [1, 1, 3, 1]")
            for k in self.expansion:
                _check_int(k, "expansion", 1, 16)

    def _check_layer_skip(self) -> None:
        self.quantization = _enum(WeightQuantization, self.quantization, "quantization")
        if self.method is not DrafterMethod.LAYER_SKIP:
            for name in ("layers", "draft_vocab_size", "draft_vocab_counts"):
                if getattr(self, name) is not None:
                    raise ConfigError(f"{name}: only the layer_skip method takes it")
            if self.quantization is not WeightQuantization.NONE:
                raise ConfigError("quantization: only the layer_skip method takes it")
            return
        if self.quantization in (WeightQuantization.BLOCKS, WeightQuantization.AUTO):
            raise ConfigError("quantization: a layer_skip draft takes 'none', 'fp16' or 'int8' (its layers are the "
                              f"target's; '{self.quantization.value}' is a load-time mode)")
        if self.layers is not None:
            sets = self.layers if self.layers and isinstance(self.layers[0], list) else [self.layers]
            for s in sets:
                if not isinstance(s, list) or not s:
                    raise ConfigError("layers: expected a non-empty list of layer indices, or a list of such lists")
                for i in s:
                    _check_int(i, "layers", 0)
                if s != sorted(set(s)):
                    raise ConfigError(f"layers: {s} must be ascending without repeats")
        if self.draft_vocab_size is not None:
            _check_int(self.draft_vocab_size, "draft_vocab_size", 1)
        if self.draft_vocab_counts is not None and self.draft_vocab_size is None:
            raise ConfigError("draft_vocab_counts: needs draft_vocab_size")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DrafterConfig":
        return cls(**_known_fields(cls, d, "drafter"))


@dataclass
class SpecConfig:
    drafters: list[DrafterConfig] = field(default_factory=list)
    budget: int | None = None                 # max draft nodes per tree; None = chosen by the cost model
    max_depth: int = 8
    draft_sampling: DraftSampling = DraftSampling.IID
    auto: bool = False                        # {"method": "auto"}: the loader adds the model's shipped drafters

    def __post_init__(self) -> None:
        self.draft_sampling = _enum(DraftSampling, self.draft_sampling, "draft_sampling")
        if self.budget is not None:
            _check_int(self.budget, "budget", 1, 256)
        _check_int(self.max_depth, "max_depth", 1, 64)

    @property
    def enabled(self) -> bool:
        return bool(self.drafters)

    @classmethod
    def parse(cls, spec: "SpecConfig | dict | str | None") -> "SpecConfig":
        """From a SpecConfig, a dict, a JSON string or the path of a JSON file (the CLI's --speculative-config)."""
        if spec is None or isinstance(spec, SpecConfig):
            return spec or cls()
        if isinstance(spec, str):
            if not spec.lstrip().startswith("{") and os.path.isfile(spec):  # a JSON file (distill's speculative.json)
                try:
                    spec = Path(spec).read_text()
                except OSError as e:
                    raise ConfigError(f"speculative_config: cannot read {spec!r}: {e}") from None
            try:
                spec = json.loads(spec)
            except json.JSONDecodeError as e:
                raise ConfigError(f"speculative_config: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(spec, dict):
            raise ConfigError("speculative_config: expected a JSON object")
        d = dict(spec)
        method = d.pop("method", None)
        top = {k: d.pop(k) for k in ("budget", "max_depth", "draft_sampling") if k in d}
        if top.get("budget") == "auto":
            top["budget"] = None
        if method == "auto":
            if d:
                raise ConfigError(f"speculative_config: 'auto' takes no other field(s), got {sorted(d)}")
            return cls(drafters=[DrafterConfig(DrafterMethod.NGRAM)], auto=True, **top)
        if method in (None, "none") and "drafters" not in d:
            if d:
                raise ConfigError(f"speculative_config: unknown field(s) {sorted(d)} without a method")
            return cls(**top)
        if method is not None and method != "none":
            if "drafters" in d:
                raise ConfigError("speculative_config: give either 'method' or 'drafters', not both")
            drafters = [DrafterConfig.from_dict({"method": method, **d})]
        else:
            raw = d.pop("drafters")
            if d:
                raise ConfigError(f"speculative_config: unknown field(s) {sorted(d)}")
            if not isinstance(raw, list) or not all(isinstance(x, dict) for x in raw):
                raise ConfigError("drafters: expected a list of drafter objects")
            drafters = [DrafterConfig.from_dict(x) for x in raw]
        cfg = cls(drafters=drafters, **top)
        if "max_depth" not in top:
            cfg.max_depth = max(dc.num_speculative_tokens for dc in drafters)
        return cfg


@dataclass
class EngineConfig:
    model: str = "gemma-3-270m"
    max_model_len: int | None = None          # None = the model's context length
    max_num_seqs: int = 16                    # running requests at once
    max_num_batched_tokens: int = 512         # per-step token budget (prefill chunks + tree nodes)
    max_waiting: int = 256                    # waiting-queue bound; beyond it submit() is refused
    kv_cache_bytes: int = 4 << 30             # KV memory all running requests may hold together
    weight_quantization: WeightQuantization = WeightQuantization.AUTO  # resolved by LLM when it loads the model
    num_threads: int | None = None            # torch intra-op threads; None = torch's default
    tensor_parallel_size: int = 1             # ranks splitting every layer (Megatron); rank 0 drives
    pipeline_parallel_size: int = 1           # ranks holding consecutive layer stages
    distributed_executor_backend: ExecutorBackend = ExecutorBackend.MP
    device: str = "auto"                      # auto (CUDA when torch sees one) | cpu | cuda | cuda:N
    dtype: DType = DType.AUTO                 # auto: bfloat16 on CUDA, float32 on the CPU
    kernels: Kernels = Kernels.AUTO           # auto: the CPU fast paths for fp32 on the CPU, else portable

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise ConfigError("model: expected a model path or alias")
        if self.max_model_len is not None:
            _check_int(self.max_model_len, "max_model_len", 2)
        _check_int(self.max_num_seqs, "max_num_seqs", 1, 4096)
        _check_int(self.max_num_batched_tokens, "max_num_batched_tokens", 16)
        _check_int(self.max_waiting, "max_waiting", 0)
        _check_int(self.kv_cache_bytes, "kv_cache_bytes", 1 << 20)
        self.weight_quantization = _enum(WeightQuantization, self.weight_quantization, "weight_quantization")
        if self.num_threads is not None:
            _check_int(self.num_threads, "num_threads", 1, 1024)
        _check_int(self.tensor_parallel_size, "tensor_parallel_size", 1, 1024)
        _check_int(self.pipeline_parallel_size, "pipeline_parallel_size", 1, 1024)
        if self.tensor_parallel_size > 1 and self.pipeline_parallel_size > 1:
            raise ConfigError("tensor_parallel_size, pipeline_parallel_size: combining both is not supported; "
                              "use one of them")
        self.distributed_executor_backend = _enum(ExecutorBackend, self.distributed_executor_backend,
                                                  "distributed_executor_backend")
        check_device(self.device)
        self.dtype = _enum(DType, self.dtype, "dtype")
        self.kernels = _enum(Kernels, self.kernels, "kernels")

    @property
    def world_size(self) -> int:
        """Processes running the target: 1 unless tensor or pipeline parallel."""
        return self.tensor_parallel_size * self.pipeline_parallel_size


def _known_fields(cls: type, d: dict[str, Any], what: str) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(f"{what}: unknown field(s) {unknown}; known: {sorted(names)}")
    return d
