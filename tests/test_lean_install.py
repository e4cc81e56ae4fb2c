"""The core install (no extras): generation and the CLI import none of the optional packages, and a command that
needs an extra says which one in one line. Each check runs in a fresh interpreter whose imports of the optional
packages fail, as they would where they are not installed."""
import subprocess
import sys

import pytest
from serving_tiny import save_tiny_model_dir

SERVE = ("fastapi", "starlette", "pydantic", "uvicorn", "prometheus_client")  # fastapi brings starlette, pydantic
OPTIONAL = SERVE + ("transformers", "matplotlib", "httpx")

BLOCKER = """
import sys
from importlib.abc import MetaPathFinder

class Blocker(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, Blocker())
"""


def run_lean(code: str, blocked: tuple[str, ...] = OPTIONAL) -> subprocess.CompletedProcess:
    """Run code in a fresh interpreter where importing any of `blocked` fails (and BLOCKED names them)."""
    script = f"BLOCKED = {blocked!r}\n{BLOCKER}\n{code}"
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)


def test_the_blocker_blocks():
    proc = run_lean("import fastapi")
    assert proc.returncode == 1 and "ModuleNotFoundError" in proc.stderr


def test_every_module_but_the_server_and_the_load_generator_imports_without_extras():
    proc = run_lean("""
import importlib, pkgutil
import treespec
for m in pkgutil.walk_packages(treespec.__path__, "treespec."):
    if not m.name.startswith(("treespec.server", "treespec.bench.serve")):
        importlib.import_module(m.name)
from treespec.cli_args import build_parser
build_parser().parse_args(["serve"])
loaded = sorted(name for name in sys.modules if name.partition(".")[0] in BLOCKED)
assert not loaded, loaded
""")
    assert proc.returncode == 0, proc.stderr


NEEDS_SERVE = "treespec serve needs the 'serve' extra: pip install 'treespec[serve]'"


@pytest.mark.parametrize("argv, blocked, message", [
    (["serve"], OPTIONAL, NEEDS_SERVE),
    (["serve", "--ngram", "--port", "0"], OPTIONAL, NEEDS_SERVE),
    (["bench", "--limit", "1"], OPTIONAL, "treespec bench needs the 'bench' extra: pip install 'treespec[bench]'"),
    (["bench", "--mode", "serve"], SERVE,  # the load generator runs the server too
     "treespec bench --mode serve needs the 'serve' extra: pip install 'treespec[serve]'"),
    (["serve", "--data-parallel-size", "2"], ("ray",),  # replicas run on Ray Serve
     "treespec serve --data-parallel-size needs the 'distributed' extra: pip install 'treespec[distributed]'"),
])
def test_a_missing_extra_is_one_line_naming_it_and_exit_2(argv, blocked, message):
    proc = run_lean(f"from treespec.cli import main\nsys.exit(main({argv!r}))", blocked)
    assert proc.returncode == 2 and proc.stderr.splitlines() == [f"treespec: error: {message}"], proc.stderr


def test_generate_runs_without_extras(tmp_path):
    model = save_tiny_model_dir(tmp_path / "tiny")
    proc = run_lean(f"""
from treespec.cli import main
code = main(["generate", "--model", {str(model)!r}, "--max-tokens", "4", "--json", "--compare", "the cat sat"])
loaded = sorted(name for name in sys.modules if name.partition(".")[0] in BLOCKED)
assert code == 0 and not loaded, (code, loaded)
""")
    assert proc.returncode == 0, proc.stderr
    assert '"speculative"' in proc.stdout
