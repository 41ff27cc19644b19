"""How well do the zero-cost scores of the hard replay table predict the trained accuracy? (issue 21)

Reads the table's rows (any number of JSON-lines files, e.g. the shards under
``benchmarks/search_table/hard-shards/``; a row recorded twice counts once, by ``id``) and prints
the Spearman rank correlation with the final val accuracy (all of val, after the full box) of

* each zero-cost score of :mod:`zero_cost` (``zc_*``: computed from the untrained student and
  the cached teacher logits, before any training),
* the **1/27 rung**: the val accuracy at the first evaluation of the curve (at 1/27 of the box,
  or the first step after it for a student too slow to have stepped by then), i.e. what the
  cheapest rung of an early-stopped search sees after paying 1/27 of a box,
* ``params`` and ``macs``, the free baselines any proxy has to beat,

over all rows and within each resolution (and each family when the rows have more than one).
A score that is missing in a row (``None``, e.g. SynFlow overflow) leaves that row out of that
score's correlation; ``n`` is per score.

    python benchmarks/zero_cost_report.py benchmarks/search_table/hard-shards/*.jsonl [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from scipy.stats import spearmanr

SCORES: tuple[str, ...] = (
    "zc_sample_relation", "zc_class_relation", "zc_synflow_log10", "rung_1_27", "params", "macs",
)


def load_rows(paths: list[Path]) -> list[dict[str, Any]]:
    """The rows of every file, the first copy of each ``id`` only, with ``rung_1_27`` added."""
    rows: dict[str, dict[str, Any]] = {}
    for path in paths:
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            row = json.loads(line)
            if row["id"] in rows:
                continue
            curve = row.get("curve") or []
            row["rung_1_27"] = curve[0][1] if curve else None
            rows[row["id"]] = row
    return list(rows.values())


def spearman(rows: list[dict[str, Any]], key: str, target: str = "val_accuracy") -> tuple[float | None, int]:
    """Spearman rho of ``key`` with ``target`` over the rows where both are numbers, and that n.
    None when it is undefined (fewer than 3 rows, or a constant column)."""
    pairs = [(r[key], r[target]) for r in rows
             if isinstance(r.get(key), int | float) and isinstance(r.get(target), int | float)]
    n = len(pairs)
    if n < 3:
        return None, n
    xs, ys = zip(*pairs, strict=True)
    if len(set(xs)) < 2 or len(set(ys)) < 2:
        return None, n
    rho = float(spearmanr(xs, ys).statistic)
    return (None if math.isnan(rho) else rho), n


def report(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per group (``all``, ``r<res>``, ``<family>`` when mixed): n and rho per score."""
    groups: list[tuple[str, list[dict[str, Any]]]] = [("all", rows)]
    for res in sorted({r["resolution"] for r in rows}):
        groups.append((f"r{res}", [r for r in rows if r["resolution"] == res]))
    families = sorted({r.get("family", "vgg") for r in rows})
    if len(families) > 1:
        for fam in families:
            groups.append((fam, [r for r in rows if r.get("family", "vgg") == fam]))
    out = []
    for name, sel in groups:
        entry: dict[str, Any] = {"group": name, "rows": len(sel)}
        for key in SCORES:
            rho, n = spearman(sel, key)
            entry[key] = {"rho": None if rho is None else round(rho, 4), "n": n}
        out.append(entry)
    return out


def markdown(entries: list[dict[str, Any]]) -> str:
    """The report as a markdown table: rho (n) per score and group."""
    head = "| group | rows | " + " | ".join(SCORES) + " |"
    lines = [head, "|" + "---|" * (len(SCORES) + 2)]
    for e in entries:
        cells = []
        for key in SCORES:
            rho, n = e[key]["rho"], e[key]["n"]
            cells.append("n/a" if rho is None else f"{rho:+.3f}" + ("" if n == e["rows"] else f" (n {n})"))
        lines.append(f"| {e['group']} | {e['rows']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("tables", type=Path, nargs="+", help="JSON-lines table files (shards)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args(argv)
    missing = [str(p) for p in args.tables if not p.is_file()]
    if missing:
        print(f"tables: no such file: {', '.join(missing)}", file=sys.stderr)
        return 2
    rows = load_rows(args.tables)
    if not rows:
        print("tables: no rows yet", file=sys.stderr)
        return 2
    entries = report(rows)
    print(f"{len(rows)} rows; Spearman rho with the final val accuracy (all of val)\n")
    print(markdown(entries))
    if args.json is not None:
        args.json.write_text(json.dumps({"rows": len(rows), "groups": entries}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
