"""The whole hostile corpus against one node process: a category x outcome table for docs/reliability.md.

    python benchmarks/intake_corpus.py

Builds tests/hostile_corpus.py's cases, sends them with the suite's own sender
(tests/test_hostile_intake.py, a good instance after each), runs the suite's
checks on the result and prints the table (statuses by category), the wrong
count, the known limitations and the log leak counts.
"""

from __future__ import annotations

import collections
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import hostile_corpus as corpus_mod
import test_hostile_intake as suite


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="intake-corpus-"))
    cases = corpus_mod.build_corpus(work / "corpus")
    (work / "run").mkdir()
    t0 = time.monotonic()
    r = suite.run_corpus(cases, work / "run")
    wall = time.monotonic() - t0
    failed = 0
    for check in suite.CHECKS:
        try:
            check(r)
            print("PASS", check.__name__)
        except AssertionError as exc:
            failed += 1
            print("FAIL", check.__name__, str(exc)[:500])
    names = {0: "0x0000", 0xA700: "0xA700", 0xA900: "0xA900", 0xC000: "0xC000"}
    table: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    wrong, known = 0, []
    for o in r["outcomes"]:
        table[o.case.category][names.get(o.status) or ("no response" if o.status is None else hex(o.status))] += 1
        if o.case.xfail:
            known.append((o.case.name, names.get(o.status)))
        elif not o.case.accepts(o.status):
            wrong += 1
    cols = ["0x0000", "0xA700", "0xA900", "0xC000", "no response"]
    good_after = sum(o.good_status == 0 for o in r["outcomes"])
    print(f"{len(r['outcomes'])} cases, {wrong} answered other than documented, node alive: {r['alive']}, "
          f"good instance stored after {good_after} of {len(r['outcomes'])}, wall {wall:.0f} s, "
          f"slowest case {max(o.seconds for o in r['outcomes']):.1f} s")
    print()
    print("| category | cases | " + " | ".join(cols) + " |")
    print("|---|---|" + "---|" * len(cols))
    for cat in sorted(table):
        c = table[cat]
        print(f"| {cat} | {sum(c.values())} | " + " | ".join(str(c.get(k, "")) for k in cols) + " |")
    total: collections.Counter = collections.Counter()
    for c in table.values():
        total.update(c)
    print(f"| **all** | {sum(total.values())} | " + " | ".join(str(total.get(k, 0)) for k in cols) + " |")
    print()
    print("known limitations (strict xfail):", known)
    print("canary lines: own loggers", len(suite._leaks(r, own=True)), "third-party loggers",
          len(suite._leaks(r, own=False)))
    return 1 if failed or wrong else 0


if __name__ == "__main__":
    raise SystemExit(main())
