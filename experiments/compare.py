"""Compare finished runs: a local report (Markdown table + PNG figures), no W&B needed.

    python experiments/compare.py runs/digits                        # every run found below it
    python experiments/compare.py runs/digits/reinforce runs/digits/fixed --out reports/digits
    python experiments/compare.py runs --strict                      # exit 2 if protocols differ

Each DIR is a run directory or any folder holding run directories (searched recursively for the
runner's ``results.json``). Runs are grouped by agent label and aggregated over seeds:

- the label is the agent's name (``agent.name``); a fixed attack (``agents.baselines.FixedAgent``)
  is labelled with the attack it actually played, ``fixed(eps=0.2,it=5,step=0.05)``; runs of one
  agent whose other settings differ get the differing settings in their label,
  ``reinforce(k=20)`` vs ``reinforce(k=5)``;
- ``report.md``: the protocol (data, model, budget, attacks, eps, images), loud warnings where
  the runs' protocols differ, then mean +- std over seeds of every final attack's test accuracy
  (clean, PGD, C&W, and AutoAttack where evaluated, including by ``experiments/evaluate.py``
  afterwards on the run's final weights), wall time and training time per epoch; the winner
  (highest mean headline robust accuracy) is marked;
- the search baseline (paper Fig. 3): when the runs hold two or more fixed attack settings, all
  of them are ranked in a table of their own, and the main table gets a "best fixed (search)" row
  next to the learned agents (plus the data set's default PGD-AT attack when it was run);
- ``robust_curves.png`` (per-epoch test/train robust and test clean accuracy, mean +- std over
  seeds: Fig. 1), ``epsilon_distribution.png`` (share of training images given each epsilon per
  epoch: Fig. 4), ``fixed_images_strength.png`` (the epsilon chosen for a few fixed training
  images per epoch: Fig. 5; only for runs whose history records ``fixed_images``);
- ``summary.json``: the same numbers, for scripts.

Which weights: ``--weights final`` (default) reports each run's final (last-epoch) weights;
``--weights best`` its best-epoch weights (``best.pt``, chosen on the held-out validation images,
or on the test images where the run was told ``selection.select_on=test``, which the report then
flags as optimistic). The report's header says which.

The main table is also printed. Exit status: 0 done; 1 bad input (no runs found...); 2 with
``--strict`` when the runs' protocols differ (the report is written all the same).

This file is the command line; the work is done by :mod:`experiments.comparison`, one module a job.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.comparison import WEIGHTS, CompareError, attack_title, compare, results_table, write_report  # noqa: E402
from experiments.config.errors import fail  # noqa: E402

EXIT_MISMATCH = 2


def default_out(paths: Sequence[str | Path]) -> Path:
    """``<deepest common folder of the inputs>/comparison``."""
    resolved = [Path(p).expanduser().resolve() for p in paths]
    folders = [p.parent if p.is_file() else p for p in resolved]
    common = Path(*Path(folders[0]).parts)
    for f in folders[1:]:
        while common not in (f, *f.parents):
            common = common.parent
    return common / "comparison"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="compare.py", description="Compare finished LAS-AT runs: report.md + PNG figures, no W&B needed.")
    parser.add_argument("dirs", nargs="+", metavar="DIR", help="run directories or folders holding them")
    parser.add_argument("--out", type=Path, default=None,
                        help="report folder (default: <common folder of DIRs>/comparison)")
    parser.add_argument("--images", type=int, default=8, help="fixed training images shown in Fig. 5 (default 8)")
    parser.add_argument("--weights", choices=sorted(WEIGHTS), default="final",
                        help="which weights of each run to report: final (default, the last epoch's) or best "
                             "(best.pt, selected on the held-out validation images)")
    parser.add_argument("--strict", action="store_true",
                        help=f"exit with status {EXIT_MISMATCH} when the runs' protocols differ")
    args = parser.parse_args(argv)
    try:
        c = compare(args.dirs, args.weights)
    except CompareError as exc:
        # The one error format of every command (experiments.config.errors); main() returns its status
        # instead of exiting so that callers (and tests) can run it in-process.
        with contextlib.suppress(SystemExit):
            fail(str(exc))
        return 1
    out = args.out if args.out is not None else default_out(args.dirs)
    files = write_report(c, out, images=args.images)

    for w in c.warnings:
        sys.stderr.write(f"compare: WARNING: {w}\n")
    if c.warnings:
        sys.stderr.write("compare: WARNING: the runs do not share one protocol; their numbers are not directly "
                         "comparable (details at the top of the report).\n")
    print(f"{len(c.runs)} runs in {len(c.groups)} groups; {WEIGHTS[c.weights]}.")
    print(results_table(c, c.main, winners=c.winners))
    if c.winners:
        print(f"Best mean {attack_title(c.headline, c.runs[0])} robust accuracy: "
              + ", ".join(g.label for g in c.winners) + c.margin_note())
    if c.search:
        print(f"\nSearch baseline ({len(c.search)} fixed attack settings):")
        print(results_table(c, c.search))
    print(f"\nReport: {files['report']}")
    print("Figures: " + (", ".join(str(v) for k, v in files.items() if k not in ("report", "summary")) or "none"))
    return EXIT_MISMATCH if (args.strict and c.warnings) else 0


if __name__ == "__main__":
    raise SystemExit(main())
