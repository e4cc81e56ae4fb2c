"""`treespec distill` on the tiny random Llama: the dataset's labels against the model itself, training that
learns, resume == uninterrupted, collective boost-tuning against the inference DraftNet, and the CLI."""
import collections
import json

import pytest
import torch
from serving_tiny import CORPUS, save_tiny_model_dir

import treespec.distill.data as data_mod
import treespec.distill.train as train_mod
from treespec import LLM
from treespec.attention.metadata import single
from treespec.cli import main
from treespec.distill.batches import Window, gather, split
from treespec.distill.data import DataConfig, build_dataset
from treespec.distill.train import TrainConfig, batch_loss, draft_config, new_net, train_drafters
from treespec.errors import ConfigError
from treespec.models.draft_net import DraftNet, load_drafter

SMALL_NET = dict(layers=1, heads=2, head_dim=16, intermediate_size=64)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def llm(model_dir, tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TREESPEC_CACHE", str(tmp_path_factory.mktemp("cache")))  # the n-gram engine's cost model
        yield LLM(str(model_dir))


@pytest.fixture(scope="module")
def data_cfg():
    return DataConfig(num_samples=48, max_tokens=40, draft_vocab=200, top_k=4, seed=1)


@pytest.fixture(scope="module")
def data(llm, data_cfg, tmp_path_factory):
    return build_dataset(llm, data_cfg, tmp_path_factory.mktemp("data"), progress=False)


# ---- dataset ----------------------------------------------------------------------------------------------------
def test_dataset_shapes_and_draft_vocabulary(data, llm):
    t, s = data.tokens.numel(), data.num_seqs
    assert s == 48 and int(data.offsets[-1]) == t and data.stats["tokens"] == t
    assert data.features.shape == (t, llm.target.config.hidden_size) and data.features.dtype == torch.float16
    assert data.label_ids.shape == (t, 4) and data.label_ids.dtype == torch.int32
    assert data.label_probs.shape == (t, 4) and data.label_probs.dtype == torch.float16
    counts = collections.Counter(data.tokens.tolist())
    ranked = sorted(range(llm.target.config.vocab_size), key=lambda i: (-counts.get(i, 0), i))
    assert data.vocab_ids.tolist() == sorted(ranked[:200])
    probs = data.label_probs.float()
    assert bool((probs[:, :-1] >= probs[:, 1:]).all()) and float(probs.sum(-1).max()) <= 1.001


def test_labels_are_the_targets_distribution_over_the_draft_vocabulary(data, llm):
    """Oracle: a plain forward of the model over each sequence, logits restricted to the draft vocabulary."""
    model = llm.target
    for s in (0, 5, data.num_seqs - 1):
        a, b = int(data.offsets[s]), int(data.offsets[s + 1])
        tokens = data.tokens[a:b].long()
        cache = model.new_cache(b - a)
        cache.reserve(b - a)
        h = model(tokens, torch.arange(b - a), single(cache, b - a))
        sub = model.logits(h)[:, data.vocab_ids]
        assert torch.equal(data.label_ids[a:b, 0].long(), sub.argmax(-1))
        p = sub.softmax(-1).gather(-1, data.label_ids[a:b].long())
        torch.testing.assert_close(data.label_probs[a:b].float(), p, atol=1e-3, rtol=1e-2)
        torch.testing.assert_close(data.features[a:b].float(), h, atol=2e-2, rtol=2e-3)


def test_dataset_is_reused_only_with_the_same_arguments(llm, data_cfg, data, tmp_path, monkeypatch):
    data.save(tmp_path)
    monkeypatch.setattr(data_mod, "generate_sequences", lambda *a, **k: pytest.fail("regenerated"))
    again = build_dataset(llm, data_cfg, tmp_path, progress=False)
    assert torch.equal(again.tokens, data.tokens) and torch.equal(again.features, data.features)
    calls = []
    monkeypatch.setattr(data_mod, "generate_sequences", lambda *a, **k: calls.append(1) or [[1, 2, 3], [4, 5]])
    other = build_dataset(llm, DataConfig(num_samples=48, max_tokens=40, draft_vocab=200, top_k=4, seed=2),
                          tmp_path, progress=False)
    assert calls == [1] and other.tokens.tolist() == [1, 2, 3, 4, 5] and other.key["seed"] == 2


def test_text_file_is_tokenized_and_cut(llm, tmp_path):
    f = tmp_path / "corpus.txt"
    f.write_text("".join(CORPUS) * 6, encoding="utf-8")
    d = build_dataset(llm, DataConfig(max_tokens=30, draft_vocab=64, text=str(f)), tmp_path / "out", progress=False)
    ids = llm.tokenizer.encode(f.read_text(encoding="utf-8"))
    keep = len(ids) if len(ids) % 30 != 1 else len(ids) - 1
    assert d.tokens.tolist() == ids[:keep] and set(d.lengths()[:-1].tolist()) == {30}
    assert d.key["text_sha256"] and d.vocab_ids.numel() == 64
    f.write_bytes(b"\xff\xfe\x00 not utf-8")
    with pytest.raises(ConfigError, match="^--text: cannot read"):
        build_dataset(llm, DataConfig(max_tokens=30, text=str(f)), tmp_path / "out2", progress=False)


# ---- training ---------------------------------------------------------------------------------------------------
def test_loss_ignores_padding_zero_weight_rows_and_unrooted_rows(llm, data):
    """Only rows with weight > 0 and t >= j count in pass j: changing anything else leaves the loss as it is."""
    cfg = TrainConfig("head", unroll=2, seq_len=24, **SMALL_NET)
    net = new_net(llm.target, data, draft_config(llm.target, data, cfg), seed=0)
    weights = torch.ones(data.tokens.numel())
    a = int(data.offsets[2])
    weights[a + 5:a + 9] = 0.0
    b = gather(data, [Window(2, 0, 20), Window(3, 1, 24)], 24, weights)  # window 0: 4 padding rows
    assert b.num_rows == 44 and b.weights[0, 5:9].sum() == 0 and b.weights[0, 20:].sum() == 0
    loss = batch_loss(net, b, cfg)
    ignored = b.weights == 0
    gen = torch.Generator().manual_seed(0)
    b.label_ids[ignored] = torch.randint(0, 200, b.label_ids[ignored].shape, generator=gen)
    b.next_features[ignored] += 5.0
    b.tokens[0, 20:] = 7  # padding follows the real rows: causal attention never lets them see it
    torch.testing.assert_close(batch_loss(net, b, cfg), loss)
    one_pass = TrainConfig("head", unroll=1, seq_len=24, **SMALL_NET)
    second_pass = loss - batch_loss(net, b, one_pass)  # pass 0 does not depend on later passes
    b.label_ids[:, 0] = torch.randint(0, 200, b.label_ids[:, 0].shape, generator=gen)  # row 0: pass 0 only
    assert not torch.allclose(batch_loss(net, b, cfg), loss)
    torch.testing.assert_close(batch_loss(net, b, cfg) - batch_loss(net, b, one_pass), second_pass)
    b.weights.zero_()
    assert float(batch_loss(net, b, cfg).detach()) == 0.0


@pytest.mark.parametrize("kind", ["head", "ssm"])
def test_training_raises_held_out_acceptance(llm, data, tmp_path, kind):
    cfg = TrainConfig(kind, steps=300, batch_size=8, seq_len=64, lr=1e-2, eval_every=100, **SMALL_NET)
    result = train_drafters(llm.target, data, cfg, tmp_path, target_name="tiny", progress=False)
    (d,) = result.drafters
    assert len(d.acceptance) == (3 if kind == "head" else 1)
    for before, after in zip(d.acceptance_start, d.acceptance):
        assert after > max(2 * before, before + 0.04), (d.acceptance_start, d.acceptance)
    cfg_loaded, tensors, ids = load_drafter(tmp_path / "drafter-0")
    assert cfg_loaded.kind.value == kind and cfg_loaded.target == "tiny" and torch.equal(ids, data.vocab_ids)
    spec = json.loads(result.spec_path.read_text())
    assert spec == {"drafters": [{"method": "learned", "model": str((tmp_path / "drafter-0").resolve())}]}
    assert not (tmp_path / "checkpoint.json").exists() and d.rows_per_s > 0 and d.size_bytes > 0


def collective_cfg(data) -> TrainConfig:
    # windows hold whole sequences, so the DraftNet oracle below sees the same context
    return TrainConfig("head", steps=40, batch_size=4, seq_len=int(data.lengths().max()) - 1, lr=3e-3, unroll=2,
                       num_drafters=2, checkpoint_every=15, eval_every=20, seed=3, **SMALL_NET)


@pytest.fixture(scope="module")
def collective(llm, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("collective")
    return out, train_drafters(llm.target, data, collective_cfg(data), out, progress=False)


def runtime_hits(llm, data, path, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[n - 1] bool: rows of seq where the shipped drafter (inference DraftNet, full vocabulary) picks the target's
    top-1 when reading x_{t+1} and h_t at position t; and [n - 1] the gap between its top two logits there."""
    cfg, tensors, ids = load_drafter(path)
    net = DraftNet(cfg, tensors, ids, llm.target)
    a, b = int(data.offsets[seq]), int(data.offsets[seq + 1])
    n = b - a - 1
    cache = net.new_cache(n)
    cache.reserve(n)
    h = net(data.tokens[a + 1:b].long(), torch.arange(n), single(cache, n), data.features[a:b - 1].float())
    logits = net.logits(h)
    top2 = logits.topk(2, dim=-1).values
    return logits.argmax(-1) == data.vocab_ids[data.label_ids[a + 1:b, 0].long()], top2[:, 0] - top2[:, 1]


def test_boost_tuning_zeroes_rows_the_first_drafter_gets_right(llm, data, collective):
    out, result = collective
    assert [d.path for d in result.drafters] == [str(out / "drafter-0"), str(out / "drafter-1")]
    spec = json.loads(result.spec_path.read_text())
    assert [x["model"] for x in spec["drafters"]] == [str((out / f"drafter-{k}").resolve()) for k in range(2)]
    first, second = result.drafters[0].row_weights, result.drafters[1].row_weights
    assert bool((first == 1).all())
    train_seqs, _ = split(data, collective_cfg(data).seed)
    zeros = 0
    for s in train_seqs:
        a, b = int(data.offsets[s]), int(data.offsets[s + 1])
        right, gap = runtime_hits(llm, data, out / "drafter-0", s)
        # training and inference round differently (autograd's torch ops vs the C++ decode kernels): rows whose
        # top two logits are within rounding may go either way, every other row must agree
        clear = gap > 1e-4
        assert torch.equal((second[a:b - 1] == 0)[clear], right[clear]), s
        assert int(clear.sum()) >= 0.9 * len(clear), s
        zeros += int(right.sum())
    assert 0 < zeros < sum(int(data.lengths()[s]) - 1 for s in train_seqs)


@pytest.mark.parametrize("interrupt_at", [1, 3])  # checkpoints 1-2 fall in drafter 0, 3-4 in drafter 1
def test_resume_equals_uninterrupted(llm, data, collective, tmp_path, monkeypatch, interrupt_at):
    saves = []
    real_save = train_mod.save_checkpoint

    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)
        saves.append(1)
        if len(saves) == interrupt_at:
            raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "save_checkpoint", save_then_die)
    cfg = collective_cfg(data)
    with pytest.raises(KeyboardInterrupt):
        train_drafters(llm.target, data, cfg, tmp_path, progress=False)
    monkeypatch.setattr(train_mod, "save_checkpoint", real_save)
    with pytest.raises(ConfigError, match="^--resume: the checkpoint was written with other arguments: steps 40"):
        train_drafters(llm.target, data, TrainConfig(**{**vars(cfg), "steps": 41}), tmp_path, resume=True)
    resumed = train_drafters(llm.target, data, cfg, tmp_path, resume=True, progress=False)
    out, full = collective
    for k in range(2):
        _, want, _ = load_drafter(out / f"drafter-{k}")
        _, got, _ = load_drafter(tmp_path / f"drafter-{k}")
        assert want.keys() == got.keys() and all(torch.equal(want[n], got[n]) for n in want), k
        assert resumed.drafters[k].acceptance == full.drafters[k].acceptance
    assert torch.equal(resumed.drafters[1].row_weights, full.drafters[1].row_weights)


# ---- CLI --------------------------------------------------------------------------------------------------------
def run_cli(args, capsys):
    code = main(["distill", *args])
    return code, capsys.readouterr()


def test_cli_trains_resumes_and_rejects_bad_input(model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TREESPEC_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    base = ["--target", str(model_dir), "--kind", "ssm", "--out", str(out), "--num-samples", "6", "--max-tokens",
            "12", "--layers", "1", "--heads", "2", "--head-dim", "8", "--intermediate-size", "16", "--batch-size",
            "2", "--seq-len", "16", "--threads", "1", "--eval-every", "3", "--checkpoint-every", "2"]
    monkeypatch.setattr(train_mod, "remove_checkpoint", lambda out_dir: None)  # keep the step-4 checkpoint
    code, cap = run_cli([*base, "--steps", "6"], capsys)
    assert code == 0, cap.err
    assert "drafter-0: 6 steps" in cap.out and (out / "speculative.json").exists()
    counts = json.loads((out / "token_counts.json").read_text())  # the text's counts, for draft_vocab_counts
    assert sum(counts.values()) > 0 and all(int(k) >= 0 for k in counts)
    assert json.loads((out / "checkpoint.json").read_text())["step"] == 4
    code, cap = run_cli([*base, "--steps", "6", "--resume"], capsys)
    assert code == 0 and "reusing the dataset" in cap.out

    bad = {
        "no such model": [*base[:1], "no-such-model", *base[2:], "--steps", "6"],
        "negative": [*base, "--steps", "-3"],
        "bad lr": [*base, "--lr", "0"],
        "text": [*base, "--text", str(tmp_path / "missing.txt")],
        "no checkpoint": [*base[:4], "--out", str(tmp_path / "empty"), *base[6:], "--resume"],
        "other args": [*base, "--steps", "7", "--resume"],
        "other data": [*base, "--steps", "6", "--resume", "--num-samples", "7"],
        "kind": [*base[:3], "lstm", *base[4:]],
    }
    expect = {"no such model": "no-such-model", "negative": "--steps: must be a positive integer",
              "bad lr": "--lr", "text": "--text: cannot read", "no checkpoint": "--resume: no checkpoint",
              "other args": "steps 6 -> 7", "kind": "--kind",
              "other data": "dataset built with other arguments"}
    for name, args in bad.items():
        try:
            code, cap = run_cli(args, capsys)
        except SystemExit as e:  # argparse's own errors (a bad choice)
            code, cap = e.code, capsys.readouterr()
        errors = [line for line in cap.err.splitlines() if "error" in line.lower()]  # a loading bar may precede
        assert code == 2 and len(errors) == 1 and errors[0].startswith("treespec: error:"), (name, cap.err)
        assert cap.err.strip().endswith(errors[0]) and "Traceback" not in cap.err, (name, cap.err)
        assert expect[name] in errors[0], (name, errors[0])
