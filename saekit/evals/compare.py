"""`saekit compare DIR`: the SAEs evaluated under DIR side by side — the L0 frontier plots (L0 vs FVU, CE
recovered, probing accuracy at k = 1, absorption; one point per SAE with its 95% intervals, architectures as
colours) and a sortable table with the best SAE per metric marked, and every SAE whose interval overlaps the
best one's marked as not significantly different."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from ..errors import SaekitError
from ..files import atomic_write, read_json

# (column, label, where in eval.json, higher is better)
METRICS = [
    ("l0", "L0", ("l0",), None),
    ("fvu_normal", "FVU without massive tokens", ("fvu_excl_massive",), False),
    ("fvu", "FVU", ("fvu",), False),
    ("dead", "dead fraction", ("dead_fraction",), False),
    ("ce_recovered", "CE recovered (zero-abl.)", ("ce_recovered_zero",), True),
    ("kl", "KL", ("kl",), False),
    ("probing_k1", "probing acc. k=1", ("probing", "sae_k1"), True),
    ("probing_k5", "probing acc. k=5", ("probing", "sae_k5"), True),
    ("absorption", "mean absorption fraction", ("absorption", "mean_absorption_fraction"), False),
    ("absorption_rate", "full-absorption rate", ("absorption", "absorption_rate"), False),
    ("tpp", "TPP", ("tpp", "tpp"), True),
]
# FVU without the few massive-norm tokens: with them one context's outlier carries much of the variance and the
# FVU neither falls with L0 nor has a narrow interval (both columns are in the table)
FRONTIER = [("fvu_normal", "FVU without massive tokens (lower is better)"), ("ce_recovered", "CE loss recovered"),
            ("probing_k1", "sparse probing accuracy, k = 1"), ("absorption", "mean absorption fraction")]


def evaluated(directory: str | Path) -> list[Path]:
    """eval.json files at DIR, one or two levels below it (a sweep: DIR/<hook>/<sae>/eval.json)."""
    d = Path(directory)
    found = sorted({p for pattern in ("eval.json", "*/eval.json", "*/*/eval.json") for p in d.glob(pattern)})
    if not found:
        raise SaekitError(f"{d} holds no eval.json; evaluate its SAEs first (saekit eval {d} --suite all).")
    return found


def _value(m: dict[str, Any], where: tuple[str, ...]) -> tuple[float | None, list[float] | None]:
    if len(where) == 1:
        return m.get(where[0]), m.get("intervals", {}).get(where[0])
    part = m.get(where[0]) or {}
    return part.get(where[1]), part.get("intervals", {}).get(where[1])


def rows_of(paths: list[Path], root: Path) -> list[dict[str, Any]]:
    rows = []
    for p in paths:
        m = read_json(p)
        row: dict[str, Any] = {"sae": str(p.parent.relative_to(root)) if p.parent != root else p.parent.name,
                               "architecture": m.get("architecture", "?"), "k": m.get("k"), "d_sae": m.get("d_sae"),
                               "contexts": m.get("contexts"), "tokens": m.get("tokens")}
        for col, _, where, _ in METRICS:
            row[col], row[f"{col}_ci"] = _value(m, where)
        rows.append(row)
    return rows


def marks(rows: list[dict[str, Any]]) -> dict[tuple[int, str], str]:
    """(row, column) → '★' for the best SAE of a metric, '≈' for one whose interval overlaps the best one's (not
    significantly different), '' otherwise."""
    out = {}
    for col, _, _, higher in METRICS:
        have = [(i, r) for i, r in enumerate(rows) if r[col] is not None]
        if higher is None or len(have) < 2:
            continue
        best_i, best = (max if higher else min)(have, key=lambda ir: ir[1][col])
        out[(best_i, col)] = "★"
        lo, hi = best[f"{col}_ci"] or (best[col], best[col])
        for i, r in have:
            if i != best_i:
                rlo, rhi = r[f"{col}_ci"] or (r[col], r[col])
                out[(i, col)] = "≈" if rlo <= hi and lo <= rhi else ""
    return out


def _cell(r: dict[str, Any], col: str) -> str:
    v, ci = r[col], r[f"{col}_ci"]
    if v is None:
        return "–"
    return f"{v:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else f"{v:.3f}"


def markdown(rows: list[dict[str, Any]]) -> str:
    m = marks(rows)
    head = ["SAE", "arch", "k", "d_sae"] + [label for _, label, _, _ in METRICS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, r in enumerate(rows):
        cells = [r["sae"], r["architecture"], str(r["k"]), str(r["d_sae"])]
        cells += [(_cell(r, col) + (" " + m.get((i, col), "") if m.get((i, col)) else "")) for col, *_ in METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "★ best of the column; ≈ its 95% interval overlaps the best one's (not significantly different). "
              "Intervals: bootstrap over held-out contexts (core), documents (probing, TPP) or words (absorption)."]
    return "\n".join(lines)


def frontier(rows: list[dict[str, Any]]):
    """A plotly figure: L0 against each FRONTIER metric, one point per SAE with x and y error bars."""
    from plotly.colors import qualitative
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=2, cols=2, subplot_titles=[t for _, t in FRONTIER])
    archs = sorted({r["architecture"] for r in rows})
    for a_i, arch in enumerate(archs):
        mine = sorted((r for r in rows if r["architecture"] == arch), key=lambda r: r["l0"] or 0)
        for n, (col, title) in enumerate(FRONTIER):
            pts = [r for r in mine if r[col] is not None and r["l0"] is not None]
            if not pts:
                continue

            def bars(key, pts=pts):
                return {"type": "data", "symmetric": False,
                        "array": [(r[f"{key}_ci"] or [0, r[key]])[1] - r[key] for r in pts],
                        "arrayminus": [r[key] - (r[f"{key}_ci"] or [r[key], 0])[0] for r in pts]}

            fig.add_scatter(x=[r["l0"] for r in pts], y=[r[col] for r in pts], mode="markers+lines", name=arch,
                            legendgroup=arch, showlegend=n == 0, marker={"color": qualitative.Plotly[a_i % 10], "size": 9},
                            error_x=bars("l0"), error_y=bars(col), text=[r["sae"] for r in pts],
                            hovertemplate="%{text}<br>L0 %{x:.1f}<br>" + title + " %{y:.4f}<extra></extra>",
                            row=n // 2 + 1, col=n % 2 + 1)
    fig.update_xaxes(title_text="L0 (active latents per token)")
    fig.update_layout(height=800, title="The L0 frontier: one point per SAE, 95% intervals as error bars")
    return fig


def compare(directory: str | Path) -> dict[str, Any]:
    """Writes DIR/compare.html (frontier plots + sortable table) and DIR/compare.md; returns the rows."""
    root = Path(directory)
    rows = rows_of(evaluated(root), root)
    table = markdown(rows)
    atomic_write(root / "compare.md", lambda p: p.write_text("# SAEs compared\n\n" + table + "\n"))
    m = marks(rows)
    head = "".join(f"<th onclick='sortBy({j})'>{html.escape(h)}</th>" for j, h in
                   enumerate(["SAE", "arch", "k", "d_sae"] + [label for _, label, _, _ in METRICS]))
    body = ""
    for i, r in enumerate(rows):
        cells = [r["sae"], r["architecture"], r["k"], r["d_sae"]]
        tds = "".join(f"<td>{html.escape(str(c))}</td>" for c in cells)
        tds += "".join(f"<td data-v='{r[col] if r[col] is not None else ''}'>{html.escape(_cell(r, col))} "
                       f"{m.get((i, col), '')}</td>" for col, *_ in METRICS)
        body += f"<tr>{tds}</tr>"
    script = """<script>function sortBy(j){const t=document.getElementById('cmp'),rs=[...t.rows].slice(1);
const key=r=>{const c=r.cells[j];const v=c.dataset.v;return v===undefined||v===''?c.textContent:parseFloat(v)};
const dir=t.dataset.col==j&&t.dataset.dir=='1'?-1:1;t.dataset.col=j;t.dataset.dir=dir;
rs.sort((a,b)=>{const x=key(a),y=key(b);return (x>y?1:x<y?-1:0)*dir});rs.forEach(r=>t.appendChild(r))}</script>"""
    page = ("<html><head><meta charset='utf-8'><title>saekit compare</title><style>td,th{padding:2px 8px;"
            "font:13px sans-serif}th{cursor:pointer;background:#eee}</style></head><body>"
            + frontier(rows).to_html(full_html=False, include_plotlyjs="cdn")
            + f"<table id='cmp'><tr>{head}</tr>{body}</table><p>★ best of the column; ≈ its 95% interval overlaps "
              "the best one's (not significantly different). Click a header to sort.</p>" + script + "</body></html>")
    atomic_write(root / "compare.html", lambda p: p.write_text(page))
    print(table)
    print(f"\nwrote {root / 'compare.html'} (frontier plots, sortable table) and {root / 'compare.md'}")
    return {"rows": rows, "marks": {f"{i}:{c}": v for (i, c), v in m.items()}}
