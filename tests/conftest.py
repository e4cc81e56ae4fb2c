"""Tiny-model tests run on one torch thread: on 2 shared cores, idle OpenMP threads spinning on microsecond-sized
ops make them an order of magnitude slower. Tests marked `slow` (the real model) keep torch's default."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread_for_tiny_models(request):
    if request.node.get_closest_marker("slow"):
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
