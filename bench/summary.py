"""One markdown table of ratios from the raw figures of one or more ``bench/run.py --json``
runs: every row that has a target, with the machine, the date and the clock of the run it
came from. This is the table at the top of ``docs/performance.md``.

Usage::

    python bench/summary.py bench/results/A.json [B.json ...] [--commit abc1234]

Rows keep their order (runs in the order given). A row whose label appears in a later run
replaces the earlier one (a case run again). Rows without a target (shares, floors,
references made durable without one) are listed under the table only when ``--all``.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

UNITS = {"us": "µs", "ms": "ms", "s": "s", "ns": "ns"}


def _time(v: float, unit: str) -> str:
    return f"{v:.3g} {UNITS.get(unit, unit)}"


def _machine(m: dict[str, Any]) -> str:
    v = m.get("versions", {})
    libs = ", ".join(f"{k} {x}" for k, x in v.items())
    return (
        f"{m.get('date', '?')}: {m.get('cpu_model', '?')}, {m.get('cores', '?')} cores, "
        f"Python {m.get('python', '?')}, {m.get('platform', '?')}; {libs}; "
        f"{m.get('clock', '?')} clock"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+", help="JSON files written by bench/run.py --json")
    ap.add_argument("--commit", default="", help="the commit the runs measured")
    ap.add_argument("--all", action="store_true", help="also rows without a target")
    args = ap.parse_args()
    rows: dict[tuple[str, str], tuple[int, dict[str, Any]]] = {}
    machines: list[str] = []
    for i, path in enumerate(args.runs):
        with open(path) as f:
            run = json.load(f)
        machines.append(f"{i + 1}. `{path}`, {_machine(run.get('machine', {}))}")
        for r in run["rows"]:
            if "ratio" in r and (r.get("target") is not None or args.all):
                rows[(r["case"], r["label"])] = (i + 1, r)
    met = sum(1 for _, r in rows.values() if r.get("pass"))
    targeted = sum(1 for _, r in rows.values() if r.get("target") is not None)
    print(f"Runs{f' (commit {args.commit})' if args.commit else ''}:\n")
    for m in machines:
        print(m)
    print(f"\n{met} of {targeted} targets met.\n")
    print("| run | case | route | tensorbridge | reference | reference time | ratio | target |")
    print("|---|---|---|---|---|---|---|---|")
    for run_no, r in rows.values():
        mark = "" if r.get("pass") is None else (" ✓" if r["pass"] else " ✗")
        print(
            f"| {run_no} | {r['case']} | {r['label']} | {_time(r['tb'], r['unit'])} "
            f"| `{r['other']}` | {_time(r['other_time'], r['unit'])} "
            f"| **{r['ratio']:.2f}×**{mark} | {r.get('target_text') or '-'} |"
        )


if __name__ == "__main__":
    main()
