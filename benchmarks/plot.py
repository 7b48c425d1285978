"""TFLOP/s against sequence length from a `benchmarks.attention` JSON file.

    python -m benchmarks.plot benchmarks/results/attention_<device>_<date>.json

regenerates the PNG and the markdown table next to the JSON (useful when a run was cut short: the
JSON is written after every case). One panel per head dim x causal, one row per pass, one line per
implementation.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# Fixed colours so an implementation looks the same in every plot.
COLORS = {"pallas_flash": "tab:red", "xla": "tab:blue", "cudnn": "tab:green", "tokamax": "tab:purple"}
PASS_TITLES = {"fwd": "forward", "fwdbwd": "forward + backward"}


def _series(cases):
    """``{(pass, H, causal): {impl: [(S, TFLOP/s), ...]}}`` of the cases that ran."""
    swept = [c for c in cases if "sweep" in c.get("tags", ())]
    # Without a sweep (a custom --shapes run) every shape is a point, so the plot still says something.
    chosen = swept or cases
    panels: dict = {}
    for c in chosen:
        if c["status"] != "ok":
            continue
        points = panels.setdefault((c["pass"], c["H"], c["causal"]), {}).setdefault(c["impl"], {})
        points.setdefault(c["S"], c["tflops"])  # the first of several shapes at one S wins
    return {k: {impl: sorted(p.items()) for impl, p in v.items()} for k, v in panels.items()}


def plot_results(results: dict, path: Path, log=print) -> bool:
    """Writes the PNG; returns False (with a message) when matplotlib is missing or nothing ran."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display on the benchmark machines
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: skipping the PNG (pip install matplotlib, then "
            f"python -m benchmarks.plot {Path(path).with_suffix('.json')})")
        return False
    series = _series(results["cases"])
    if not series:
        log("no successful case to plot: skipping the PNG")
        return False
    meta = results["metadata"]
    passes = [p for p in PASS_TITLES if any(k[0] == p for k in series)]
    columns = sorted({k[1:] for k in series})
    fig, axes = plt.subplots(len(passes), len(columns), squeeze=False,
                             figsize=(3.6 * len(columns) + 0.8, 3.2 * len(passes) + 0.8))
    impls = [i for i in meta["impls"] if any(i in v for v in series.values())]
    for r, pass_ in enumerate(passes):
        for c, (head_dim, causal) in enumerate(columns):
            ax = axes[r][c]
            for impl in impls:
                points = series.get((pass_, head_dim, causal), {}).get(impl)
                if points:
                    xs, ys = zip(*points)
                    ax.plot(xs, ys, marker="o", label=impl, color=COLORS.get(impl))
            ax.set_xscale("log", base=2)
            ticks = sorted({x for pts in series.get((pass_, head_dim, causal), {}).values() for x, _ in pts})
            ax.set_xticks(ticks, [f"{t // 1024}k" if t >= 1024 and t % 1024 == 0 else str(t) for t in ticks])
            ax.minorticks_off()
            ax.set_title(f"{PASS_TITLES[pass_]}, H={head_dim}, {'causal' if causal else 'non-causal'}",
                         fontsize=9)
            ax.set_xlabel("sequence length S")
            ax.grid(True, alpha=0.3)
            ax.set_ylim(bottom=0)
            if c == 0:
                ax.set_ylabel("TFLOP/s")
    handles, labels = axes[0][0].get_legend_handles_labels()
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), frameon=False)
    fig.suptitle(f"{meta['device_kind']} | jax {meta['jax_version']} | {meta['dtype']} | {meta['date'][:10]}\n"
                 "TFLOP/s = matmul FLOPs (fwd 4BNS²H, causal halved; fwd+bwd 3.5x) / median time",
                 fontsize=9)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv=None):
    from benchmarks.attention import markdown_report

    p = argparse.ArgumentParser(prog="python -m benchmarks.plot", description=__doc__.split("\n\n")[0])
    p.add_argument("json", type=Path, help="a results JSON written by benchmarks.attention")
    args = p.parse_args(argv)
    results = json.loads(args.json.read_text())
    png = args.json.with_suffix(".png")
    made = plot_results(results, png)
    args.json.with_suffix(".md").write_text(markdown_report(results, png.name if made else None))
    print(f"wrote {args.json.with_suffix('.md')}" + (f" and {png}" if made else ""))


if __name__ == "__main__":
    main()
