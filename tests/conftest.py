"""Tiny-model tests run on one torch thread: on 2 shared cores, idle OpenMP threads spinning on microsecond-sized
ops make them an order of magnitude slower. Module-scoped too, so module fixtures (live servers, engines) get it.
Tests marked `slow` (the real model) run with torch's default thread count. Tests marked `cuda` are skipped where
torch sees no CUDA device (benchmarks/gpu_check.sh runs them on a GPU)."""
import pytest
import torch

_DEFAULT_THREADS = torch.get_num_threads()


@pytest.fixture(autouse=True, scope="module")
def _one_thread_per_module():
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(_DEFAULT_THREADS)


@pytest.fixture(autouse=True)
def _default_threads_for_slow_tests(request):
    if not request.node.get_closest_marker("slow"):
        yield
        return
    torch.set_num_threads(_DEFAULT_THREADS)
    yield
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("cuda"):
            item.add_marker(skip)
