"""Issue 6's goal against measured runs: the Mosaic kernels' speed over the best baseline of the same process.

    python -m benchmarks.goal benchmarks/results/mosaic/v17_end_*.json --out goal.png

Reads `benchmarks.tune` JSON files of the default config timed beside its baselines (``--baselines
--baseline-impls cudnn,tokamax``; ``--configs '[{}, {}]'`` times it twice), and for every shape,
causal setting and pass divides each Mosaic timing by the fastest baseline of that file: the goal is
1.05x on the forward and 1.0x on forward + backward. Prints a markdown table (the lowest and highest
ratio of the repeated timings, met only when the lowest clears the goal) and, with matplotlib, draws
one bar per row spanning those ratios against the goal lines.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.plot import PASS_TITLES

GOALS = {"fwd": 1.05, "fwdbwd": 1.0}


def ratios(run: dict) -> list[dict]:
    """One row per (causal, pass) of a `benchmarks.tune` result: ``low``/``high`` ratio of the Mosaic
    timings to the fastest baseline of the same pass."""
    groups: dict = {}
    for r in run["results"]:
        if r["status"] == "ok" and r["passes"] in GOALS:
            groups.setdefault((r["causal"], r["passes"]), []).append(r)
    shape = "×".join(str(d) for d in run["shape"])
    rows = []
    for (causal, pass_), results in sorted(groups.items(), key=lambda kv: (kv[0][1] != "fwd", kv[0][0])):
        ours = [r for r in results if r["impl"] == "mosaic"]
        baselines = {r["impl"]: r["tflops"] for r in results if r["impl"] != "mosaic"}
        if not ours or not baselines:
            continue
        if len({json.dumps(r["config"], sort_keys=True) for r in ours}) > 1:
            # A ratio of the best of several configs would not be the library's speed.
            raise ValueError(f"{shape}: Mosaic timings of more than one config (causal={causal}, {pass_}); "
                             "time the default only, e.g. --configs '[{}, {}]'")
        best = max(baselines, key=baselines.get)
        values = [r["tflops"] / baselines[best] for r in ours]
        rows.append(dict(shape=shape, causal=causal, pass_=pass_, baseline=best, low=min(values),
                         high=max(values), goal=GOALS[pass_], met=min(values) >= GOALS[pass_],
                         device=run["device"]))
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| shape | causal | pass | best baseline | ratio | goal | met |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {'yes' if r['causal'] else 'no'} | {PASS_TITLES[r['pass_']]} | "
                     f"{r['baseline']} | {r['low']:.3f}–{r['high']:.3f} | {r['goal']:.2f} | "
                     f"{'yes' if r['met'] else 'no'} |")
    return "\n".join(lines)


def _label(row: dict) -> str:
    return f"{row['shape']} {'causal' if row['causal'] else 'non-causal'}"


def plot(rows: list[dict], path: Path) -> bool:
    """Writes the PNG; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    passes = [p for p in GOALS if any(r["pass_"] == p for r in rows)]
    labels = list(dict.fromkeys(_label(r) for r in rows))
    fig, axes = plt.subplots(1, len(passes), squeeze=False, sharey=True,
                             figsize=(3.2 + 4.2 * len(passes), 0.42 * len(labels) + 1.6))
    for ax, pass_ in zip(axes[0], passes):
        mine = [r for r in rows if r["pass_"] == pass_]
        for r in mine:
            y = labels.index(_label(r))
            # A bar from the lowest to the highest repeat; a visible sliver when they agree.
            ax.barh(y, max(r["high"] - r["low"], 0.002), left=r["low"], height=0.5,
                    color="tab:green" if r["met"] else "tab:red")
            ax.annotate(f"vs {r['baseline']}", (r["high"], y), xytext=(4, 0), textcoords="offset points",
                        va="center", fontsize=7)
        ax.axvline(GOALS[pass_], color="black", linestyle="--", linewidth=1, label=f"goal {GOALS[pass_]:.2f}x")
        ax.axvline(1.0, color="gray", linewidth=0.8)
        low = min([GOALS[pass_]] + [r["low"] for r in mine])
        high = max([GOALS[pass_]] + [r["high"] for r in mine])
        ax.set_xlim(low - 0.02, high + 0.06)
        ax.set_xlabel("speed / fastest baseline (same process)", fontsize=9)
        ax.set_title(PASS_TITLES[pass_], fontsize=10)
        ax.grid(True, axis="x", alpha=0.3)
        ax.legend(fontsize=8, loc="upper right")
    axes[0][0].set_yticks(range(len(labels)), labels, fontsize=8)
    axes[0][0].invert_yaxis()
    devices = sorted({r["device"] for r in rows})
    fig.suptitle(f"{', '.join(devices)}: green meets the goal in every repeat, red does not", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.goal", description=__doc__.split("\n\n")[0])
    p.add_argument("json", type=Path, nargs="+", help="benchmarks.tune results of the default config")
    p.add_argument("--out", type=Path, default=None, help="PNG to draw (needs matplotlib)")
    args = p.parse_args(argv)
    rows = [row for path in args.json for row in ratios(json.loads(path.read_text()))]
    if not rows:
        raise SystemExit("no Mosaic timing beside a baseline in these files")
    print(markdown(rows))
    met = sum(r["met"] for r in rows)
    print(f"\n{met} of {len(rows)} rows meet the goal in every repeat")
    if args.out is not None:
        print(f"wrote {args.out}" if plot(rows, args.out) else "matplotlib is not installed: no PNG")
    return rows


if __name__ == "__main__":
    main()
