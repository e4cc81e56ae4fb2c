"""Bench output: raw JSON, a Markdown table and a PNG chart."""
from __future__ import annotations

import json
from pathlib import Path

from treespec.bench.dataset import category_order


def markdown_table(summary: dict[str, dict[str, dict]]) -> str:
    cats = category_order({c for per in summary.values() for c in per if c != "overall"}) + ["overall"]
    lines = ["| method | category | prompts | tok/s | speedup | tokens/step | equal to plain |",
             "|---|---|---|---|---|---|---|"]
    for method, per in summary.items():
        for cat in cats:
            if cat not in per:
                continue
            s = per[cat]
            speed = f"{s['speedup']:.2f}x" if s["speedup"] is not None else "-"
            tps = f"{s['tokens_per_step']:.2f}" if s["tokens_per_step"] is not None else "-"
            equal = "-" if s["equal"] is None else f"{s['equal']}/{s['prompts']}"
            name = f"**{cat}**" if cat == "overall" else cat
            lines.append(f"| {method} | {name} | {s['prompts']} | {s['tokens_per_s']:.1f} | {speed} | {tps} | {equal} |")
    return "\n".join(lines) + "\n"


def write_outputs(out_dir: Path, raw: dict, summary: dict[str, dict[str, dict]], title: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "results.json", out_dir / "results.md", out_dir / "speedup.png"]
    paths[0].write_text(json.dumps({"summary": summary, **raw}, indent=1))
    paths[1].write_text(f"# {title}\n\n" + markdown_table(summary))
    _plot(paths[2], summary, title)
    return paths


def _plot(path: Path, summary: dict[str, dict[str, dict]], title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    methods = [m for m in summary if m != "plain"]
    if not methods:
        return
    cats = category_order({c for per in summary.values() for c in per if c != "overall"}) + ["overall"]
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(1.3 * len(cats) + 2, 4))
    for k, m in enumerate(methods):
        vals = [summary[m].get(c, {}).get("speedup") or 0.0 for c in cats]
        ax.bar([i + k * width for i in range(len(cats))], vals, width, label=m)
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cats))], cats, rotation=20)
    ax.set_ylabel("speedup over plain decoding")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
