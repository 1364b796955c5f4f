"""Compare finished runs: ``report.md``, ``summary.json`` and PNG figures (paper Figs. 1, 4, 5; rliable's).

    python experiments/compare.py runs/digits                        # every run found below it
    python experiments/compare.py runs/digits/reinforce runs/digits/fixed --out reports/digits
    python experiments/compare.py runs --strict --wandb              # exit 2 if protocols differ; + offline W&B run

Each DIR is a run directory or a folder holding some (searched for ``results.json``). Runs are labelled by
agent (a fixed attack by the attack it played, plus the settings that differ), aggregated over seeds with
rliable per final attack and ranked by the headline robust accuracy's IQM; docs/evaluation.md says what each
column and figure is. The work is done by :mod:`experiments.comparison`.

Exit status: 0 done; 1 bad input (no runs found...); 2 with ``--strict`` when the runs' protocols
differ (the report is written all the same).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.comparison.ranking import BOOTSTRAP_REPS, Comparison, compare  # noqa: E402
from experiments.comparison.report import markdown_table, table_rows, write_report  # noqa: E402
from experiments.comparison.runs import WEIGHTS  # noqa: E402
from experiments.config.errors import ConfigError, fail  # noqa: E402
from experiments.config.schema import LoggerSettings  # noqa: E402
from experiments.tracking.loggers import WandbTracker  # noqa: E402

EXIT_MISMATCH = 2


def log_to_wandb(c: Comparison, files: Mapping[str, Path], out: Path) -> Path | None:
    """One offline W&B run (job type "compare", under ``out``) holding the results table and the PNGs;
    returns the folder for ``wandb sync``. Offline always: a report needs no account or network."""
    import wandb  # noqa: PLC0415 - only with --wandb

    settings = LoggerSettings(name="wandb", mode="offline", run_name=f"compare-{out.name}", tags=["compare"])
    tracker = WandbTracker(settings, out, {"sources": c.sources, "weights": c.weights, "bootstrap_reps": c.reps},
                           job_type="compare")
    head, *rows = table_rows(c, c.main, winners=c.winners)
    tracker.run.log({"results": wandb.Table(columns=head, data=rows),
                     **{k: wandb.Image(str(v)) for k, v in files.items() if v.suffix == ".png"}})
    tracker.finish()
    return tracker.offline_dir


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="compare.py", description="Compare finished LAS-AT runs: report.md + PNG figures, no W&B needed.")
    parser.add_argument("dirs", nargs="+", metavar="DIR", help="run directories or folders holding them")
    parser.add_argument("--out", type=Path, help="report folder (default: <common folder of DIRs>/comparison)")
    parser.add_argument("--images", type=int, default=8, help="fixed training images shown in Fig. 5 (default 8)")
    parser.add_argument("--weights", choices=sorted(WEIGHTS), default="final",
                        help="which weights of each run to report: final (default, the last epoch's) or best "
                             "(best.pt, selected on the held-out validation images)")
    parser.add_argument("--strict", action="store_true", help=f"exit {EXIT_MISMATCH} when the runs' protocols differ")
    parser.add_argument("--bootstrap-reps", type=int, default=BOOTSTRAP_REPS,
                        help=f"bootstrap repetitions per confidence interval (default {BOOTSTRAP_REPS})")
    parser.add_argument("--wandb", action="store_true",
                        help="also log the table and figures as one offline W&B run (upload later with wandb sync)")
    args = parser.parse_args(argv)
    try:
        c = compare(args.dirs, args.weights, args.bootstrap_reps)
    except ConfigError as exc:
        # The one error format of every command (experiments.config.errors); main() returns its status
        # instead of exiting so that callers (and tests) can run it in-process.
        with contextlib.suppress(SystemExit):
            fail(str(exc))
        return 1
    folders = [p.parent if p.is_file() else p for p in (Path(q).expanduser().resolve() for q in args.dirs)]
    out = args.out or Path(os.path.commonpath(folders)) / "comparison"  # default: the inputs' deepest common folder
    files = write_report(c, out, images=args.images)

    for w in c.warnings:
        sys.stderr.write(f"compare: WARNING: {w}\n")
    if c.warnings:
        sys.stderr.write("compare: WARNING: the runs do not share one protocol; their numbers are not directly "
                         "comparable (details at the top of the report).\n")
    print(f"{len(c.runs)} runs in {len(c.groups)} groups; {WEIGHTS[c.weights]}.")
    print(markdown_table(table_rows(c, c.main, winners=c.winners)))
    for line in (c.few_seeds_note(), c.verdict(), *c.drift_notes()):
        if line:
            print(line)
    if c.search:
        print(f"\nSearch baseline ({len(c.search)} fixed attack settings):")
        print(markdown_table(table_rows(c, c.search)))
    print(f"\nReport: {files['report']}")
    print("Figures: " + (", ".join(str(v) for k, v in files.items() if k not in ("report", "summary")) or "none"))
    if args.wandb:
        print(f"W&B (offline): upload with  wandb sync {log_to_wandb(c, files, out)}")
    return EXIT_MISMATCH if (args.strict and c.warnings) else 0


if __name__ == "__main__":
    raise SystemExit(main())
