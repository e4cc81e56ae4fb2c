"""Tensor and pipeline parallelism on torch.distributed (gloo on CPU).

Rank 0 drives, as in vLLM: it schedules, drafts, builds each tree and its mask, broadcasts one step's inputs
(step.py), runs its own shard and verifies; every other rank replays rank 0's KV-cache operations on its own caches
and runs its shard of the same forward (worker.py). tensor_parallel.py splits each layer (Megatron), pipeline.py
splits the layer stack into stages; launch.py starts the ranks (spawned here, torchrun or Ray) and target.py is
the model rank 0's engine sees.
"""
