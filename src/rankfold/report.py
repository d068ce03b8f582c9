"""Human-readable tables for compression reports and before/after comparisons."""

from __future__ import annotations

from rankfold.apply import CompressionReport


def human(n: float) -> str:
    """1234567 -> '1.23M'."""
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def _format_rows(rows: list[tuple]) -> str:
    """Left-aligned columns; the last column (a free-text note) is not padded."""
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = []
    for row in rows:
        cells = [str(c).ljust(w) for c, w in zip(row, widths)] + [str(row[-1])]
        lines.append("  ".join(cells).rstrip())
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def _bits_text(layer) -> str | int:
    """32, 8, 4; 8/t with one scale per tensor; 4/g32 with one per group of 32 input elements."""
    if layer.bits >= 32 or layer.weight_scales == "channel":
        return layer.bits
    return f"{layer.bits}/t" if layer.weight_scales == "tensor" else f"{layer.bits}/g{layer.weight_scales[5:]}"


def plan_table(plan) -> str:
    """One row per layer of a Plan, then estimated totals before and after."""
    rows = [("layer", "shape", "method", "ranks", "bits", "params", "weight B", "MACs", "latency ms", "RAM B",
             "est.loss", "note")]
    for r in plan.layers:
        ranks = "x".join(map(str, r.ranks)) if r.ranks else "-"
        bits = _bits_text(r)
        rows.append((r.name, r.layer, r.method, ranks, bits, human(r.params), human(r.weight_bytes), human(r.macs),
                     f"{r.latency_ms:.4f}", human(r.ram_bytes), f"{r.est_loss:.2e}", r.note))
    table = _format_rows(rows)
    if any(r.bits < 32 and r.weight_scales == "tensor" for r in plan.layers):
        table += "\nbits n/t: one weight scale for the tensor (not one per output channel)"
    if any(r.bits < 32 and r.weight_scales.startswith("group") for r in plan.layers):
        table += "\nbits n/gK: one weight scale per K input elements of each output channel"
    lines = [table, "", f"{'':14}{'before':>14}{'after':>14}{'ratio':>9}   limit"]
    for key, label in (("params", "parameters"), ("weight_bytes", "weight bytes"), ("macs", "MACs"),
                       ("latency_ms", "latency ms"), ("ram_bytes", "peak RAM B")):
        a, b = plan.before.get(key), plan.after.get(key)
        limit = plan.limits.get(key)
        fmt = (lambda v: f"{v:.3f}") if key == "latency_ms" else human
        limit_text = "" if limit is None else fmt(limit)
        lines.append(f"{label:14}{fmt(a):>14}{fmt(b):>14}{b / a if a else 1:>9.1%}   {limit_text}")
    lines.append(f"target {plan.target}, latency: {plan.latency_source}; "
                 f"estimated loss {plan.est_loss:.3e} nats (KL to the original)")
    lines.extend(f"note: {m}" for m in plan.messages)
    return "\n".join(lines)


def layer_table(report: CompressionReport) -> str:
    """One row per compressible layer: method, ranks, parameters before/after, error, note."""
    rows = [("layer", "shape", "method", "ranks", "params", "kept", "rel.err", "note")]
    for r in report.layers:
        kept = r.params_after / r.params_before if r.params_before else 1.0
        err = "" if r.rel_error is None else f"{r.rel_error:.3f}"
        ranks = "x".join(map(str, r.ranks)) if r.ranks else "-"
        rows.append((r.name, r.layer, r.method, ranks, f"{human(r.params_before)}->{human(r.params_after)}",
                     f"{kept:.0%}", err, r.note))
    before = sum(r.params_before for r in report.layers)
    after = sum(r.params_after for r in report.layers)
    rows.append(("total", "", "", "", f"{human(before)}->{human(after)}", f"{after / max(before, 1):.0%}", "", ""))
    return _format_rows(rows)


def comparison_table(before: dict, after: dict) -> str:
    """Before/after rows of an EvalResult dict, with the ratio."""
    fields = [("accuracy", "top-1"), ("params", "parameters"), ("macs", "MACs"),
              ("weight_bytes", "weight bytes"), ("file_bytes", "file bytes"),
              ("latency_ms_b1", "latency b1 (ms)"), ("latency_ms_b32", "latency b32 (ms)")]
    lines = [f"{'':18}{'original':>14}{'compressed':>14}{'ratio':>9}"]
    for key, label in fields:
        a, b = before.get(key), after.get(key)
        if a is None or b is None:
            continue
        fmt = (lambda v: f"{v:.4f}") if key == "accuracy" or key.startswith("latency") else human
        ratio = f"{b / a:.1%}" if key != "accuracy" else f"{(b - a) * 100:+.2f}pt"
        lines.append(f"{label:18}{fmt(a):>14}{fmt(b):>14}{ratio:>9}")
    return "\n".join(lines)
