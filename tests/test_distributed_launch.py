"""Starting and losing ranks: torchrun launches, a worker that dies fails its requests with a clear error (never a
hang), and startup failures (a rank that never joins, a port in use) are one line."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
from serving_tiny import save_tiny_model_dir
from test_drafter_model import StubTokenizer
from tiny_hf import hf_model

from treespec.config import EngineConfig
from treespec.distributed.launch import start_parallel
from treespec.distributed.source import TensorsSource
from treespec.engine.engine import LLMEngine
from treespec.models.registry import build_model
from treespec.sampling import SamplingParams

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_dead_worker_fails_its_requests_with_a_clear_error():
    hf = hf_model("llama")
    config, tensors = hf.config.to_dict(), hf.state_dict()
    target = start_parallel(TensorsSource(config, tensors), EngineConfig(model="tiny", tensor_parallel_size=2),
                            build_model(config, tensors))
    try:
        engine = LLMEngine(target, StubTokenizer(), EngineConfig(model="tiny"))
        params = SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True)
        req = engine.add_request([1, 2, 3], params)
        engine.step()  # prefill
        target.workers.processes[0].kill()
        target.workers.processes[0].wait()
        while engine.has_unfinished():
            engine.step()
        assert req.finish_reason.value == "error"
        assert "rank 1 (exit code -9) died" in req.error
        late = engine.add_request([4, 5], params)  # later requests fail at once too, with the same reason
        engine.step()
        assert late.finish_reason.value == "error" and "died" in late.error
    finally:
        target.shutdown()


def external_rank0(model_dir, port: int, timeout_s: str) -> subprocess.CompletedProcess:
    """`treespec generate -tp 2` as torchrun's rank 0 whose rank 1 never comes (a fresh process: a failed
    init_process_group leaves torch's group counter behind)."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2", "RANK": "0",
           "TREESPEC_DIST_TIMEOUT": timeout_s}
    return subprocess.run([sys.executable, "-m", "treespec.cli", "generate", "hi", "--model", str(model_dir),
                           "-tp", "2", "--distributed-executor-backend", "external_launcher", "--threads", "1"],
                          capture_output=True, text=True, env=env, timeout=120)


def one_error_line(out: subprocess.CompletedProcess) -> str:
    """The run failed with exit status 2 and one `treespec: error:` line (beside the loading bar), no traceback."""
    errors = [line for line in out.stderr.splitlines() if line.startswith("treespec: error:")]
    assert out.returncode == 2 and len(errors) == 1 and "Traceback" not in out.stderr, out.stderr
    return errors[0]


def test_rank_that_never_joins_is_a_one_line_timeout(model_dir):
    line = one_error_line(external_rank0(model_dir, free_port(), "2"))
    assert "rank 0 could not join" in line and "(2 ranks, timeout 2 s" in line and "1/2 clients joined" in line


def test_port_in_use_is_a_one_line_error(model_dir):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        out = external_rank0(model_dir, busy.getsockname()[1], "5")
    assert "could not join" in one_error_line(out)


def test_cli_without_torchrun_is_a_one_line_error(model_dir):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    out = subprocess.run([sys.executable, "-m", "treespec.cli", "generate", "hi", "--model", str(model_dir),
                          "-tp", "2", "--distributed-executor-backend", "external_launcher"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0 and "torchrun" in out.stderr


def test_torchrun_launch_equals_one_process(model_dir):
    args = ["generate", "the cat sat on the mat", "--model", str(model_dir), "--max-tokens", "16", "--json",
            "--threads", "1", "--ngram"]
    one = subprocess.run([sys.executable, "-m", "treespec.cli", *args], capture_output=True, text=True, timeout=120)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-port", str(free_port()), "-m", "treespec.cli", *args, "-tp", "2",
                          "--distributed-executor-backend", "external_launcher"],
                         capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-2000:]
    tokens = lambda out: json.loads(out[out.index("{"):])["speculative"]["token_ids"]  # noqa: E731
    assert tokens(run.stdout) == tokens(one.stdout)


def test_ray_backend_places_the_workers_and_equals_one_process(model_dir, tmp_path_factory):
    ray = pytest.importorskip("ray", reason="needs the 'distributed' extra")

    from treespec import LLM
    # a local cluster of its own (other Ray users of this machine share /tmp/ray); the backend joins it
    ray.init(num_cpus=2, _temp_dir=str(tmp_path_factory.mktemp("ray")), include_dashboard=False)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    prompts = ["the cat sat on the mat. the cat sat on the", "hello"]
    expected = [o.token_ids for o in LLM(str(model_dir)).generate(prompts, params)]
    llm = LLM(str(model_dir), tensor_parallel_size=2, distributed_executor_backend="ray", num_threads=1)
    try:
        assert [o.token_ids for o in llm.generate(prompts, params)] == expected
    finally:
        llm.close()
        ray.shutdown()


def test_ray_backend_without_ray_is_a_one_line_error(model_dir):
    from test_lean_install import run_lean
    proc = run_lean(f"""
from treespec.cli import main
raise SystemExit(main(["generate", "hi", "--model", {str(model_dir)!r}, "-tp", "2",
                       "--distributed-executor-backend", "ray"]))
""", blocked=("ray",))
    assert proc.returncode == 2 and proc.stderr.strip().count("\\n") == 0, proc.stderr
    assert "pip install 'treespec[distributed]'" in proc.stderr


def test_blocks_weights_run_split_into_stages(tmp_path):
    """(Split into tensor-parallel shards: tests/test_distributed_blocks.py.)"""
    from gguf import GGMLQuantizationType as Q
    from tiny_gguf import write_model

    from treespec import LLM
    from treespec.kernels.q8_head import compiled as head_kernel
    if head_kernel() is None:
        pytest.skip("block kernels cannot be built here")
    path = tmp_path / "gemma3.gguf"
    write_model(path, "gemma3", qtypes=(Q.Q8_0, Q.Q5_0))
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    prompts = ["hello world hello world hello", "the the the world"]
    expected = [o.token_ids for o in LLM(str(path), weight_quantization="blocks").generate(prompts, params)]
    staged = LLM(str(path), weight_quantization="blocks", pipeline_parallel_size=2, num_threads=1)
    try:
        assert [o.token_ids for o in staged.generate(prompts, params)] == expected
    finally:
        staged.close()
