"""Tables, plots and the README section from a bench results dict (see bench.run)."""

from __future__ import annotations

import os

BEGIN, END = "<!-- bench-results:begin -->", "<!-- bench-results:end -->"
RANKFOLD = ("rankfold-float", "rankfold-joint")
LABELS = {"original": "original (float)", "ort-int8": "onnxruntime static int8", "hosvd-tucker2": "Tucker-2, HOSVD",
          "vbmf-tucker2": "Tucker-2, VBMF ranks", "aidge": "Aidge compression",
          "aidge-ptq": "Aidge PTQ (aidge-quantization)", "rankfold-float": "rankfold, float",
          "rankfold-joint": "rankfold, joint int8/int4"}


def _mb(n: float) -> str:
    return f"{n / 1e6:.2f} MB"


def verdicts(rows: list[dict]) -> list[str]:
    """For every other contender: rankfold's most accurate row at equal or fewer weight bytes."""
    lines = []
    ours = [r for r in rows if r["contender"] in RANKFOLD and r["metrics"].get("accuracy") is not None]
    for row in rows:
        m = row["metrics"]
        if row["contender"] in RANKFOLD or row["contender"] == "original" or m.get("accuracy") is None:
            continue
        fits = [r for r in ours if r["metrics"]["weight_bytes"] <= m["weight_bytes"]]
        name = f"{LABELS[row['contender']]} ({row['setting']})"
        if not fits:
            chance = " (that contender is at chance level)" if m["accuracy"] <= 0.11 else ""
            lines.append(f"- {name}: {m['accuracy']:.4f} at {_mb(m['weight_bytes'])}; no rankfold row at that size "
                         f"or less{chance}")
            continue
        best = max(fits, key=lambda r: r["metrics"]["accuracy"])
        gap = 100 * (best["metrics"]["accuracy"] - m["accuracy"])
        word = "**rankfold loses**" if gap < 0 else ("ties" if gap == 0 else "rankfold wins")
        lines.append(f"- {name}: {m['accuracy']:.4f} at {_mb(m['weight_bytes'])}; rankfold "
                     f"{best['metrics']['accuracy']:.4f} at {_mb(best['metrics']['weight_bytes'])} "
                     f"({best['setting']}): {word} ({gap:+.2f} pt)")
    return lines


def _peak(metrics: dict) -> str:
    """The tool's peak resident memory, measured where it ran in a process of its own."""
    peak = metrics.get("peak_rss_bytes")
    return "" if peak is None else f"{peak / 2**20:,.0f} MB"


def table(rows: list[dict]) -> str:
    base = next((r["metrics"] for r in rows if r["contender"] == "original"), None)
    head = ("| contender | setting | top-1 | Δ pt | params | weight bytes | file | MACs | peak act. | "
            "b1 ms | b1 | b32 ms | b32 | tool s | tool peak RSS |")
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for row in rows:
        m = row["metrics"]
        name = LABELS[row["contender"]]
        if row["error"]:
            lines.append(f"| {name} | {row['setting']} | failed: {row['error'][:160]} |" + " |" * 12)
            continue
        ratio = (lambda key: f"{m[key] / base[key]:.1%}") if base else (lambda key: "")
        lines.append(
            f"| {name} | {row['setting']} | {m['accuracy']:.4f} | {100 * (m['accuracy'] - base['accuracy']):+.2f} | "
            f"{m['params']:,} ({ratio('params')}) | {m['weight_bytes']:,} ({ratio('weight_bytes')}) | "
            f"{ratio('file_bytes')} | {ratio('macs')} | {m['peak_activation_bytes'] / 1024:,.0f} KB | "
            f"{m['latency_ms_b1']:.2f} | {ratio('latency_ms_b1')} | {m['latency_ms_b32']:.1f} | "
            f"{ratio('latency_ms_b32')} | {row['tool_seconds']:.0f} | {_peak(m)} |")
    return "\n".join(lines)


def plots(rows: list[dict], network: str, mode: str, out: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = next(r["metrics"] for r in rows if r["contender"] == "original")
    measured = [r for r in rows if not r["error"]]
    files = []
    for key, xlabel, name in (("weight_bytes", "weight bytes (log scale)", "acc-bytes"),
                              ("latency_ms_b1", "onnxruntime latency, batch 1, ratio to the original", "acc-latency")):
        # top: every point; bottom: the band within 3 points of the original, where the winners differ
        fig, axes = plt.subplots(2, 1, figsize=(7, 7.5), sharex=True)
        low = max(0.0, min(r["metrics"]["accuracy"] for r in measured) - 0.02)
        top = base["accuracy"]
        for ax, ylim in zip(axes, ((low, top + 0.01), (top - 0.03, top + 0.005))):
            for contender in LABELS:
                pts = [r["metrics"] for r in measured if r["contender"] == contender]
                if not pts:
                    continue
                xs = [p[key] / (base[key] if key.startswith("latency") else 1) for p in pts]
                marker = "*" if contender in RANKFOLD else "o"
                ax.scatter(xs, [p["accuracy"] for p in pts], label=LABELS[contender], marker=marker,
                           s=110 if marker == "*" else 45)
            if key == "weight_bytes":
                ax.set_xscale("log")
            ax.set_ylim(*ylim)
            ax.set_ylabel(f"top-1 ({base['test_samples']:,} test images)")
            ax.grid(alpha=0.3)
        axes[0].set_title(f"{network}: accuracy vs {'size' if name == 'acc-bytes' else 'latency'} "
                          "(bottom: within 3 points of the original)")
        axes[1].set_xlabel(xlabel)
        axes[1].legend(fontsize=8, loc="lower right")
        fig.tight_layout()
        path = os.path.join(out, f"{network}-{mode}-{name}.png")
        fig.savefig(path + ".tmp.png", dpi=110)
        plt.close(fig)
        os.replace(path + ".tmp.png", path)
        files.append(path)
    return files


def markdown(results: dict, out: str, image_prefix: str) -> str:
    m = results["machine"]
    per_network = ", ".join(f"{n} {s / 60:.0f} min" for n, s in results.get("network_seconds", {}).items())
    parts = [f"Measured by `python -m bench.run --{results['mode']}` on {m['date']}: {m['cores']} CPU cores "
             f"({m['cpu']}), Python {m['python']}, onnxruntime {m['onnxruntime']}, torch {m['torch']}; "
             f"{results['seconds'] / 60:.0f} min in all ({per_network}). Latency: onnxruntime CPU, 1 thread, median of "
             f"{results['mode_settings']['rounds']} runs after warm-up, contenders interleaved; ratios are to the "
             f"original. Peak activation: bytes alive at once for one sample (graph liveness; QDQ groups "
             f"counted as the fused int8 kernels run them). Tool s: wall time of the compression tool."]
    for network in dict.fromkeys(r["network"] for r in results["rows"]):
        rows = [r for r in results["rows"] if r["network"] == network]
        samples = rows[0]["metrics"].get("test_samples", 0)
        parts.append(f"### {network} ({samples:,} test images)\n\n{table(rows)}")
        parts.append("rankfold against each contender, at equal or fewer weight bytes:\n\n" + "\n".join(verdicts(rows)))
        pngs = [f for f in sorted(os.listdir(out)) if f.startswith(f"{network}-{results['mode']}-")
                and f.endswith(".png")]
        parts.append(" ".join(f"![{f}]({image_prefix}{f})" for f in pngs))
    return "\n\n".join(parts) + "\n"


def write_all(results: dict, out: str) -> str:
    for network in dict.fromkeys(r["network"] for r in results["rows"]):
        plots([r for r in results["rows"] if r["network"] == network], network, results["mode"], out)
    text = markdown(results, out, "")
    path = os.path.join(out, f"{results['mode']}.md")
    with open(path + ".tmp", "w") as handle:
        handle.write(text)
    os.replace(path + ".tmp", path)
    return text


def update_readme(readme: str, results: dict, out: str) -> None:
    """Replace the README's generated Results block (between the markers) with this run's."""
    with open(readme) as handle:
        text = handle.read()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{readme} has no {BEGIN} ... {END} block to replace")
    prefix = os.path.relpath(out, os.path.dirname(os.path.abspath(readme))) + "/"
    block = f"{BEGIN}\n{markdown(results, out, prefix)}{END}"
    head, rest = text.split(BEGIN, 1)
    text = head + block + rest.split(END, 1)[1]
    with open(readme + ".tmp", "w") as handle:
        handle.write(text)
    os.replace(readme + ".tmp", readme)


def main(argv: list[str] | None = None) -> int:
    """Redraw the tables and plots of a results file (and the README block) without measuring."""
    import argparse
    import json

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("results", help="bench/results/<mode>.json")
    parser.add_argument("--update-readme", action="store_true")
    args = parser.parse_args(argv)
    try:
        with open(args.results) as handle:
            results = json.load(handle)
        missing = {"rows", "mode", "machine"} - set(results)
        if missing:
            raise KeyError(", ".join(sorted(missing)))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        parser.error(f"{args.results}: not a bench results file ({type(exc).__name__}: {exc})")
    out = os.path.dirname(os.path.abspath(args.results))
    print(write_all(results, out))
    if args.update_readme:
        update_readme(os.path.join(os.path.dirname(os.path.dirname(out)), "README.md"), results, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


def line_plot(rows: list[dict], x: str, y: str, path: str, *, xlabel: str, ylabel: str, title: str,
              log_y: bool = False) -> None:
    """One line per contender of `rows` (each a dict with "contender", "cut", x and y; the cut-0
    original left out), x as a percentage, written to `path` (.png)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for contender in dict.fromkeys(r["contender"] for r in rows if r["cut"] > 0):
        points = sorted((r[x], r[y]) for r in rows if r["contender"] == contender)
        ax.plot([100 * a for a, _b in points], [b for _a, b in points], marker="o", label=contender)
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

