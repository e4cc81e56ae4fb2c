"""The offline Python API, shaped like vLLM's: LLM(model=..., speculative_config=...).generate(prompts, params)."""
from __future__ import annotations

import dataclasses
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from treespec.config import DrafterMethod, EngineConfig, SpecConfig, WeightQuantization
from treespec.distributed.launch import launched_rank, serve_as_worker, start_parallel
from treespec.distributed.source import CheckpointSource
from treespec.distributed.target import ParallelTarget
from treespec.device import DType, Kernels, Placement
from treespec.drafters.registry import build_drafters, resolve_auto
from treespec.engine.cost_model import CALIBRATION_TEXT, CostModel
from treespec.engine.engine import LLMEngine
from treespec.engine.request import Request
from treespec.errors import ConfigError, QueueFullError
from treespec.models.registry import build_model
from treespec.sampling import SamplingParams
from treespec.weights.loader import load_checkpoint, resolve_model


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str | None
    metrics: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_request(cls, r: Request, prompt: str | None) -> "RequestOutput":
        return cls(r.request_id, prompt, list(r.prompt_ids), r.text, list(r.output_ids),
                   r.finish_reason.value if r.finish_reason else None, r.metrics.as_dict())


class LLM:
    """Load a model (alias, HF directory or .gguf) and generate, with or without speculation."""

    def __init__(self, model: str = "gemma-3-270m", speculative_config: SpecConfig | dict | str | None = None,
                 max_model_len: int | None = None, weight_quantization: str = "auto",
                 progress: bool = False, device: str = "auto", dtype: DType | str = "auto",
                 kernels: Kernels | str = "auto", **engine_kwargs: Any) -> None:
        """device: auto (CUDA when torch sees one) | cpu | cuda | cuda:N; dtype: auto (bfloat16 on CUDA, float32
        on the CPU) | float32 | bfloat16 | float16; kernels: auto | cpu (fp32 CPU fast paths) | portable (plain
        torch ops, what CUDA runs). See treespec/device.py."""
        config = EngineConfig(model=model, max_model_len=max_model_len, weight_quantization=weight_quantization,
                              device=device, dtype=dtype, kernels=kernels, **engine_kwargs)
        spec = SpecConfig.parse(speculative_config)
        self.placement = Placement.resolve(config.device, config.dtype, config.kernels)
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        path = resolve_model(model)
        mode = config.weight_quantization.resolve(path.is_file() and self.placement.kernels is Kernels.CPU)
        config = dataclasses.replace(config, weight_quantization=mode)
        blocks = config.weight_quantization is WeightQuantization.BLOCKS
        if blocks and not path.is_file():
            raise ConfigError(f"weight_quantization 'blocks' needs a GGUF model; {path} is a Hugging Face directory "
                              f"(use 'none', 'fp16' or 'int8')")
        if config.weight_quantization is not WeightQuantization.NONE and self.placement.kernels is not Kernels.CPU:
            raise ConfigError(f"weight_quantization {config.weight_quantization.value!r} needs the CPU kernels "
                              f"(fp32 on the CPU); this model runs {self.placement.describe()}")
        if config.world_size > 1 and not self.placement.cpu_fp32:
            raise ConfigError(f"tensor_parallel_size, pipeline_parallel_size: the ranks run fp32 on the CPU for now; "
                              f"this model asks for {self.placement.describe()}")
        source = CheckpointSource(path, config.weight_quantization)
        if config.world_size > 1 and launched_rank(config) > 0:  # torchrun: this rank serves rank 0's forwards
            serve_as_worker(source, config)
            raise SystemExit(0)
        ckpt = load_checkpoint(str(path), progress=progress)
        self.checkpoint_source, self.tokenizer = ckpt.source, ckpt.tokenizer
        self.model_config = source.hf_config = ckpt.config
        target = build_model(ckpt.config, ckpt.tensors, placement=self.placement)
        del ckpt  # the model holds the weights it uses (split: only its shard of them)
        if config.world_size > 1:
            target = start_parallel(source, config, target)
        else:
            source.quantize(target)
        target.lm_head.prepare()  # the exact fast argmax's fp16 copy: built once here, not inside a timed step
        self.target, self.config = target, config
        self._cost: CostModel | None = None
        self.engine = self.make_engine(spec)

    def make_engine(self, speculative_config: SpecConfig | dict | str | None) -> LLMEngine:
        """Another engine over the same loaded target (e.g. to compare drafters side by side)."""
        spec = SpecConfig.parse(speculative_config)
        parallel = self.config.world_size > 1
        if parallel:
            _refuse_self_drafts(spec)
        spec = (resolve_auto(spec, self.checkpoint_source) if self.placement.cpu_fp32
                else _portable_drafters(spec, self.placement))
        if parallel:  # auto's drafter for sampling requests may be a self-draft: those requests then decode plainly
            spec = dataclasses.replace(spec, drafters=[d for d in spec.drafters
                                                       if d.method is not DrafterMethod.LAYER_SKIP])
        drafters = build_drafters(spec, self.target, self.tokenizer, self.placement)
        if spec.enabled and spec.budget is None and self._cost is None:
            c = self.config
            key = f"{self.checkpoint_source}|{c.weight_quantization.value}|{self.placement.describe()}"
            if parallel:
                key += f"|tp{c.tensor_parallel_size}|pp{c.pipeline_parallel_size}"
            text = self.tokenizer.encode(CALIBRATION_TEXT)
            self._cost = CostModel.load_or_measure(self.target, key, text)
        return LLMEngine(self.target, self.tokenizer, self.config, spec, drafters, self._cost)

    def close(self) -> None:
        """Stop the worker ranks of a tensor/pipeline-parallel target (also done at exit); a no-op otherwise."""
        if isinstance(self.target, ParallelTarget):
            self.target.shutdown()

    def encode_prompt(self, prompt: str | list[int], chat: bool = False) -> list[int]:
        if isinstance(prompt, list):
            return prompt
        if not isinstance(prompt, str) or not prompt:
            raise ConfigError("prompt: must be a non-empty string or a list of token ids")
        if chat:
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
            return self.tokenizer.encode(text, add_special_tokens=False)
        return self.tokenizer.encode(prompt)

    def generate(self, prompts: str | list[int] | Sequence[str | list[int]], sampling_params: SamplingParams | None = None,
                 chat: bool = False, on_token: Callable[[Request, str], None] | None = None,
                 speculate: bool = True) -> list[RequestOutput]:
        """Generate for every prompt (run together as one continuous batch); outputs in prompt order.

        Any number of prompts: they enter the engine as its waiting queue has room (that bound is the server's
        back-pressure, not a limit here). on_token(request, text_delta) is called as text becomes final
        (streaming). speculate=False decodes plainly with the same engine (e.g. to compare).
        """
        from treespec.engine.emit import stream_delta
        params = sampling_params or SamplingParams()
        single = isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int))
        items = [prompts] if single else list(prompts)
        if not items:
            raise ConfigError("prompts: empty list")
        pending = deque(enumerate(self.encode_prompt(p, chat) for p in items))
        reqs: list[Request | None] = [None] * len(items)
        try:
            while self._feed(pending, reqs, params, speculate) or self.engine.has_unfinished():
                for r in self.engine.step():
                    if on_token is not None and (delta := stream_delta(r)):
                        on_token(r, delta)
        finally:  # an error or an interrupt leaves nothing of this call in the engine
            for r in reqs:
                if r is not None and not r.finished:
                    self.engine.abort(r.request_id)
        return [RequestOutput.from_request(r, p if isinstance(p, str) else None) for r, p in zip(reqs, items)]

    def _feed(self, pending: deque[tuple[int, list[int]]], reqs: list[Request | None], params: SamplingParams,
              speculate: bool) -> bool:
        """Add waiting prompts until the engine's queue is full; True while prompts remain."""
        while pending:
            i, ids = pending[0]
            try:
                reqs[i] = self.engine.add_request(ids, params, speculate=speculate)
            except QueueFullError:
                if not self.engine.has_unfinished():  # an empty engine that refuses will never make room
                    raise
                return True
            pending.popleft()
        return False


def _refuse_self_drafts(spec: SpecConfig) -> None:
    """ConfigError for layer_skip drafters under tensor/pipeline parallelism: they run the target's own layers, which
    are split over the ranks; drafters run on rank 0 beside it (ngram, draft_model, learned)."""
    if any(d.method is DrafterMethod.LAYER_SKIP for d in spec.drafters):
        raise ConfigError("speculative_config: layer_skip drafting is not available with tensor_parallel_size or "
                          "pipeline_parallel_size > 1 (the target's layers are split over the ranks); use ngram, "
                          "draft_model or learned")


def _portable_drafters(spec: SpecConfig, placement: Placement) -> SpecConfig:
    """Off fp32 CPU, the drafters that follow the target's placement: n-gram (no tensors) everywhere, draft models
    (loaded with the target's placement) on the CPU; `auto` is its n-gram drafter there (the shipped drafters
    are fp32 CPU ones). Model drafters on CUDA (their q rows on the device) are not built yet."""
    if spec.auto:
        return dataclasses.replace(spec, auto=False)
    allowed = {DrafterMethod.NGRAM} | ({DrafterMethod.DRAFT_MODEL} if placement.device.type == "cpu" else set())
    for d in spec.drafters:
        if d.method not in allowed:
            raise ConfigError(f"method: {d.method.value!r} does not draft for a model on {placement.describe()} yet "
                              f"(use {' or '.join(sorted(repr(m.value) for m in allowed))})")
    return spec
