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
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import matplotlib  # noqa: E402

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from las_env.evaluation import atomic_write_text, format_eps  # noqa: E402
from las_env.files import write_json  # noqa: E402
from las_env.grids import FIXED_ITERATIONS, grid_for, threat_model_for  # noqa: E402
from las_env.strategy_space import ATTACK_COLUMNS, StrategySpace  # noqa: E402

RESULTS_FILE = "results.json"
RESULTS_FORMAT = "las-at/results/v1"  # experiments.loop.RESULTS_FORMAT (not imported: it pulls in the env)
WEIGHTS = {"final": "final (last-epoch) weights",
           "best": "best-epoch weights (best.pt: per-epoch PGD accuracy on the held-out validation images)"}
EVALUATION_FORMAT = "las-at/evaluation/v1"  # experiments.evaluate.REPORT_FORMAT
SUMMARY_FORMAT = "las-at/comparison/v1"
EXIT_MISMATCH = 2

FIXED_TARGET_SUFFIX = "FixedAgent"
NON_LEARNING_TARGETS = ("FixedAgent", "RandomAgent")
"""Agents whose training ignores the reward settings (they never learn)."""

NOT_SETTINGS = ("seed", "run_root", "logger", "progress", "threads", "resume", "stop_after_epochs",
                "log_every_steps", "hydra", "eval", "data.root", "data.threads", "agent.name", "agent.seed",
                "agent.verbose")
"""Config keys (dotted prefixes) that never split runs into different labels: how a run was
run, the seed (aggregated over), and the evaluation (checked as protocol instead)."""

FIXED_ATTACK_KEYS = ("agent.step_size", "agent.iterations", "agent.epsilon", "data.fixed_attack")


class CompareError(ValueError):
    """Bad input; its message is the one paragraph the user sees."""


# ----------------------------------------------------------------------------- loading


@dataclass(eq=False)
class Run:
    """One finished run, read from its ``results.json`` (and ``evaluation*.json`` files)."""

    path: Path
    agent: str
    seed: int
    config: dict[str, Any]
    final: dict[str, dict[str, Any]]  # attack name -> row (accuracy, n_images, epsilon, label)
    history: list[dict[str, Any]]
    seconds: dict[str, float]
    threat: str
    per_epoch_attack: str
    data_description: str
    grid: StrategySpace
    fixed_attack: tuple[float, int, float] | None = None  # (epsilon, iterations, step size) played
    posthoc: list[str] = field(default_factory=list)  # attack names read from evaluate.py reports
    notes: list[str] = field(default_factory=list)
    label: str = ""

    @property
    def dataset(self) -> str:
        return str(self.config.get("data", {}).get("name", "?"))

    @property
    def target(self) -> str:
        return str(self.config.get("agent", {}).get("_target_", ""))

    @property
    def is_fixed(self) -> bool:
        return self.target.endswith(FIXED_TARGET_SUFFIX)

    @property
    def epochs_done(self) -> int:
        return len(self.history)


def find_runs(paths: Iterable[str | Path]) -> tuple[list[Path], list[Path]]:
    """``results.json`` files under ``paths`` (each a run dir, a folder of them, or the file
    itself), and run folders holding a checkpoint but no results yet (unfinished)."""
    found: dict[Path, None] = {}
    unfinished: dict[Path, None] = {}
    for raw in paths:
        p = Path(raw).expanduser()
        if not p.exists():
            raise CompareError(f"{p} does not exist. Pass run directories or folders holding them "
                               f"(runs/<data>/<agent>/<model>-seed<seed>-<hash>).")
        if p.is_file():
            candidates = [p] if p.name == RESULTS_FILE else []
            checkpoints: list[Path] = []
        else:
            candidates = sorted(p.rglob(RESULTS_FILE))
            checkpoints = sorted(p.rglob("checkpoint.pt"))
        for c in candidates:
            found[c.resolve()] = None
        for c in checkpoints:
            if not (c.parent / RESULTS_FILE).is_file():
                unfinished[c.parent.resolve()] = None
    return list(found), list(unfinished)


def _posthoc_rows(run_dir: Path, eps: float, final: Mapping[str, Any]) -> tuple[dict[str, dict], list[str]]:
    """Rows of ``experiments/evaluate.py`` reports in ``run_dir`` for attacks the run's own final
    evaluation lacks (typically AutoAttack), when they describe the run's final weights at its
    threat model's eps. Returns (rows, notes)."""
    reports = sorted(run_dir.glob("evaluation*.json"))
    if not reports:
        return {}, []
    weights = run_dir / "target_state_dict.pt"
    fingerprint = _weights_fingerprint(weights) if weights.is_file() else None
    rows: dict[str, dict] = {}
    notes: list[str] = []
    for path in reports:
        try:
            doc = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if doc.get("format") != EVALUATION_FORMAT:
            continue
        fp = doc.get("fingerprint") or {}
        if not math.isclose(float(fp.get("eps", -1)), eps, rel_tol=1e-6):
            continue
        if fingerprint is None or fp.get("model_sha256") != fingerprint:
            notes.append(f"{path} evaluated other weights than the run's final ones: not used")
            continue
        if doc.get("sanity_passed") is False:
            notes.append(f"{path}: its gradient-masking sanity check FAILED (see that report)")
        for row in doc.get("results", []):
            name = row.get("name")
            if name in final:
                continue
            if name not in rows or row.get("n_images", 0) > rows[name].get("n_images", 0):
                rows[name] = {**row, "source": path.name}
    return rows, notes


def _weights_fingerprint(path: Path) -> str | None:
    """The ``model_sha256`` that ``experiments/evaluate.py`` records for these weights."""
    try:
        import torch  # noqa: PLC0415
        from torch import nn  # noqa: PLC0415

        from las_env.evaluation import state_fingerprint  # noqa: PLC0415

        state = torch.load(path, map_location="cpu", weights_only=True)

        class _Weights(nn.Module):  # state_fingerprint hashes a module's state_dict items in order
            def state_dict(self, *args: Any, **kwargs: Any) -> dict:  # type: ignore[override]
                return state

        return state_fingerprint(_Weights())
    except Exception:  # noqa: BLE001 - an unreadable file just means no post-hoc rows
        return None


def _grid(config: Mapping[str, Any], dataset: str) -> StrategySpace:
    cfg = (config.get("data") or {}).get("grid")
    if cfg:
        return StrategySpace.from_config(cfg)
    return grid_for(dataset.lower().replace("_", "-"))


def played_attack(history: Sequence[Mapping[str, Any]], grid: StrategySpace) -> tuple[float, int, float] | None:
    """The one (epsilon, iterations, step size) a fixed agent played, read from the per-epoch
    counts of chosen grid indices; ``None`` when it played more than one value of any."""
    values = {name: grid.values[name] for name in ATTACK_COLUMNS}
    out: dict[str, float] = {}
    for name, grid_values in values.items():
        totals = np.zeros(len(grid_values))
        for h in history:
            counts = (h.get("choices") or {}).get(name)
            if counts is not None and len(counts) == len(grid_values):
                totals += np.asarray(counts, dtype=float)
        used = np.flatnonzero(totals)
        if len(used) != 1:
            return None
        out[name] = grid_values[int(used[0])]
    return float(out["epsilon"]), int(out["iterations"]), float(out["step_size"])


def load_run(path: Path, weights: str = "final") -> Run:
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CompareError(f"{path} cannot be read as JSON ({exc}).") from None
    if doc.get("format") != RESULTS_FORMAT:
        raise CompareError(f"{path} is not a run's results file (format {doc.get('format')!r}, "
                           f"expected {RESULTS_FORMAT!r}).")
    config = doc.get("config") or {}
    dataset = str(config.get("data", {}).get("name", "?"))
    final = {r["name"]: r for r in doc.get(weights) or []}
    if not final:
        raise CompareError(f"{path} holds no results for its {WEIGHTS[weights]} (a run without a validation split, "
                           f"or from before best.pt existed); compare with --weights final.")
    threat_eps = [r["epsilon"] for r in final.values() if r.get("epsilon")]
    grid = _grid(config, dataset)
    run = Run(
        path=path.parent,
        agent=str(doc.get("agent") or config.get("agent", {}).get("name") or "agent"),
        seed=int(config.get("seed", 0)),
        config=config,
        final=final,
        history=list(doc.get("history") or []),
        seconds={k: float(v) for k, v in (doc.get("seconds") or {}).items()},
        threat=str(doc.get("threat_model", "")),
        per_epoch_attack=str(doc.get("per_epoch_attack", "")),
        data_description=str(doc.get("data", dataset)),
        grid=grid,
    )
    if run.is_fixed:
        run.fixed_attack = played_attack(run.history, grid)
    if weights == "best" and (doc.get("selection") or {}).get("select_on") == "test":
        run.notes.append(f"{path.parent}: its best epoch was selected on the TEST images (selection.select_on=test): "
                         f"its numbers are optimistic")
    if threat_eps and weights == "final":  # evaluate.py reports are of the final weights
        extra, run.notes = _posthoc_rows(run.path, float(threat_eps[0]), final)
        run.final.update(extra)
        run.posthoc = sorted(extra)
    return run


# ----------------------------------------------------------------------------- labels


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = json.dumps(v, sort_keys=True) if isinstance(v, (list, tuple)) else v
    return out


def _ignored(key: str, prefixes: Sequence[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def _settings(run: Run) -> dict[str, Any]:
    """The settings that make runs of one agent different experiments (not the seed)."""
    skip = list(NOT_SETTINGS)
    if run.is_fixed:
        skip += FIXED_ATTACK_KEYS  # the attack actually played stands for these
    if run.target.endswith(NON_LEARNING_TARGETS):
        skip.append("reward")  # never learns: its training does not depend on the reward
    return {k: v for k, v in _flatten(run.config).items() if not _ignored(k, skip)}


def _fmt_value(key: str, v: Any) -> str:
    if isinstance(v, float):
        return format_eps(v) if re.search(r"eps|step_size", key) else f"{v:.4g}"
    return str(v)


def fixed_label(name: str, attack: tuple[float, int, float]) -> str:
    eps, iters, step = attack
    return f"{name}(eps={format_eps(eps)},it={iters},step={format_eps(step)})"


def assign_labels(runs: Sequence[Run]) -> None:
    """Set ``run.label``: the agent name, the played attack for fixed agents, and the settings
    that differ between runs of the same agent name."""
    by_name: dict[str, list[Run]] = defaultdict(list)
    for r in runs:
        by_name[r.agent].append(r)
    for name, group in by_name.items():
        settings = [_settings(r) for r in group]
        keys = sorted(set().union(*settings))
        differing = [k for k in keys if len({json.dumps(s.get(k), default=str) for s in settings}) > 1]
        for r, s in zip(group, settings):
            base = fixed_label(name, r.fixed_attack) if r.fixed_attack else name
            if differing:
                extra = ",".join(f"{k.removeprefix('agent.')}={_fmt_value(k, s.get(k))}" for k in differing)
                base = f"{base}[{extra}]" if r.fixed_attack else f"{name}({extra})"
            r.label = base


def default_fixed_attack(run: Run) -> tuple[float, int, float] | None:
    """The data set's PGD-AT attack (``agent=fixed`` without overrides), on the run's grid."""
    try:
        dataset = run.dataset.lower().replace("_", "-")
        threat = threat_model_for(dataset)
        iters = FIXED_ITERATIONS[dataset]
    except (KeyError, ValueError):
        return None
    i_eps, i_it, i_step = run.grid.index_of(epsilon=threat.epsilon, iterations=iters, step_size=threat.step_size)
    return run.grid.value("epsilon", i_eps), run.grid.value("iterations", i_it), run.grid.value("step_size", i_step)


# ----------------------------------------------------------------------------- protocol


def protocol_of(run: Run) -> dict[str, str]:
    """What must be equal for the runs' numbers to be comparable, as readable strings."""
    data = run.config.get("data", {})
    steps = run.history[0]["steps"] if run.history else "?"
    first_eval = next((h["eval"] for h in run.history if h.get("eval")), {}) or {}
    return {
        "data set": run.data_description,
        "model": str(run.config.get("model", {}).get("name", "?")),
        "threat model": run.threat,
        "training budget": f"{data.get('epochs', '?')} epochs x {steps} steps x batch {data.get('batch_size', '?')}",
        "strategy grid": json.dumps({name: [round(v, 6) for v in values] for name, values in run.grid.values.items()}),
        "per-epoch evaluation": (f"{run.per_epoch_attack} on {first_eval.get('test_images', '?')} test / "
                                 f"{first_eval.get('train_images', '?')} train images"),
    }


def check_protocol(runs: Sequence[Run]) -> tuple[list[str], list[str]]:
    """(warnings, notes): warnings where the runs' protocols differ (numbers not comparable),
    notes for softer differences (an attack evaluated on some runs only, devices)."""
    warnings: list[str] = []
    notes: list[str] = []

    def differ(what: str, values: Mapping[Run, str]) -> None:
        by_value: dict[str, list[Run]] = defaultdict(list)
        for r, v in values.items():
            by_value[v].append(r)
        if len(by_value) > 1:
            parts = [f"{v!s} ({len(rs)} run{'s' * (len(rs) > 1)}, e.g. {rs[0].path})" for v, rs in by_value.items()]
            warnings.append(f"{what} differs between runs: " + "; ".join(parts))

    protocols = {r: protocol_of(r) for r in runs}
    for key in next(iter(protocols.values())):
        differ(key.capitalize(), {r: p[key] for r, p in protocols.items()})
    names = sorted({n for r in runs for n in r.final}, key=attack_order)
    for name in names:
        have = [r for r in runs if name in r.final]
        differ(f"Final evaluation {name!r} (eps, test images)",
               {r: f"eps {format_eps(float(r.final[name].get('epsilon', 0)))}, "
                   f"{r.final[name].get('n_images')} images" for r in have})
        if len(have) < len(runs):
            notes.append(f"{_attack_title(name, have[0])} was evaluated on {len(have)} of {len(runs)} runs; "
                         f"its column averages those only.")
    devices = {str(r.config.get("device", "?")) for r in runs}
    if len(devices) > 1:
        notes.append(f"Runs ran on different devices ({', '.join(sorted(devices))}): times are not comparable.")
    return warnings, notes


# ----------------------------------------------------------------------------- aggregation


def attack_order(name: str) -> tuple[int, int, str]:
    """clean, fgsm, pgd by steps, cw by steps, autoattack, others: weakest to strongest."""
    m = re.fullmatch(r"(pgd|cw)(\d+)", name)
    if m:
        return (2 if m.group(1) == "pgd" else 3), int(m.group(2)), name
    return {"clean": 0, "fgsm": 1, "cw": 3, "autoattack": 5}.get(name, 4), 0, name


def _attack_title(name: str, run: Run) -> str:
    label = str(run.final[name].get("label") or name)
    return label.split(" (")[0]


def headline_attack(runs: Sequence[Run]) -> str | None:
    """The robust accuracy that ranks agents: AutoAttack when every run has it, else the PGD
    (CE) with the most steps every run has, else C&W, else any non-clean attack."""
    common = set.intersection(*(set(r.final) for r in runs)) - {"clean"}
    if not common:
        return None
    if "autoattack" in common:
        return "autoattack"
    pgd = [n for n in common if re.fullmatch(r"pgd\d+", n)]
    if pgd:
        return max(pgd, key=attack_order)
    return max(common, key=attack_order)


@dataclass
class Stat:
    values: list[float]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values) if self.values else math.nan

    @property
    def std(self) -> float:
        return statistics.stdev(self.values) if len(self.values) > 1 else math.nan

    def pct(self, n_expected: int) -> str:
        if not self.values:
            return "-"
        text = f"{100 * self.mean:.2f}" + (f" ± {100 * self.std:.2f}" if self.n > 1 else "")
        return text + (f" (n={self.n})" if self.n != n_expected else "")

    def seconds(self) -> str:
        if not self.values:
            return "-"
        return f"{self.mean:.1f}" + (f" ± {self.std:.1f}" if self.n > 1 else "")

    def to_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "std": None if math.isnan(self.std) else self.std, "n": self.n,
                "values": self.values}


@dataclass(eq=False)
class Group:
    label: str
    runs: list[Run]
    role: str = ""  # "", "default PGD-AT", "best fixed (search over N)"

    @property
    def seeds(self) -> list[int]:
        return [r.seed for r in self.runs]

    @property
    def is_fixed(self) -> bool:
        return all(r.fixed_attack for r in self.runs)

    def accuracy(self, attack: str) -> Stat:
        return Stat([float(r.final[attack]["accuracy"]) for r in self.runs if attack in r.final])

    def wall(self) -> Stat:
        return Stat([r.seconds["total"] for r in self.runs if "total" in r.seconds])

    def per_epoch(self) -> Stat:
        return Stat([r.seconds["train"] / r.epochs_done for r in self.runs if "train" in r.seconds and r.epochs_done])


def group_runs(runs: Sequence[Run]) -> tuple[list[Group], list[str]]:
    """Groups by label (in first-seen order); a second run with the same label and seed (e.g.
    ``agent=fixed`` and a search run spelling out the same attack) is dropped with a note."""
    groups: dict[str, Group] = {}
    notes: list[str] = []
    for r in runs:
        g = groups.setdefault(r.label, Group(r.label, []))
        same = [o for o in g.runs if o.seed == r.seed]
        if same:
            notes.append(f"{r.path} repeats {r.label} seed {r.seed} of {same[0].path}: counted once (the first).")
            continue
        g.runs.append(r)
    for g in groups.values():
        g.runs.sort(key=lambda r: r.seed)
    return list(groups.values()), notes


def rank_key(headline: str | None):
    def key(g: Group) -> float:
        m = g.accuracy(headline).mean if headline else math.nan
        return -m if not math.isnan(m) else math.inf
    return key


@dataclass
class Comparison:
    runs: list[Run]
    groups: list[Group]  # every group, ranked
    main: list[Group]  # the main table's rows (learned agents, default PGD-AT, best fixed)
    search: list[Group]  # fixed attack settings, ranked, when two or more were run
    attacks: list[str]
    headline: str | None
    warnings: list[str]
    notes: list[str]
    unfinished: list[Path]
    sources: list[str]
    weights: str = "final"

    def margin_note(self) -> str:
        """A caveat when the winner's lead over the runner-up is within one std over seeds."""
        if not self.headline or not self.winners:
            return ""
        others = [g for g in self.main if g not in self.winners and not math.isnan(g.accuracy(self.headline).mean)]
        if not others:
            return ""
        best, second = self.winners[0].accuracy(self.headline), others[0].accuracy(self.headline)
        spread = max((s for s in (best.std, second.std) if not math.isnan(s)), default=math.nan)
        if math.isnan(spread):
            return f" (one seed for the winner or the runner-up `{others[0].label}`: no spread to judge the lead by)"
        if best.mean - second.mean < spread:
            return (f" (the lead over the runner-up `{others[0].label}`, {100 * (best.mean - second.mean):.2f} points, "
                    f"is within one standard deviation over seeds: not a clear win)")
        return ""

    @property
    def winners(self) -> list[Group]:
        if not self.headline:
            return []
        means = [(g, g.accuracy(self.headline).mean) for g in self.main]
        best = max((m for _, m in means if not math.isnan(m)), default=math.nan)
        return [g for g, m in means if not math.isnan(best) and math.isclose(m, best, abs_tol=1e-12)]


def compare(paths: Sequence[str | Path], weights: str = "final") -> Comparison:
    files, unfinished = find_runs(paths)
    if not files:
        where = ", ".join(str(p) for p in paths)
        hint = f" ({len(unfinished)} unfinished run folder(s) hold only a checkpoint)" if unfinished else ""
        raise CompareError(f"No finished runs ({RESULTS_FILE}) found under {where}{hint}. Pass the folders "
                           f"experiments/run.py printed, or their run_root.")
    runs: list[Run] = []
    skipped: list[str] = []
    for f in files:
        try:
            runs.append(load_run(f, weights))
        except CompareError as exc:  # e.g. another tool's results.json in the tree
            skipped.append(f"skipped: {exc}")
    if not runs:
        raise CompareError(f"None of the {len(files)} {RESULTS_FILE} files found could be read: {skipped[0]}")
    runs.sort(key=lambda r: (r.agent, str(r.path)))
    assign_labels(runs)
    warnings, notes = check_protocol(runs)
    groups, dup_notes = group_runs(runs)
    notes += skipped + dup_notes + [n for r in runs for n in r.notes]
    for r in runs:
        if r.is_fixed and r.fixed_attack is None:
            notes.append(f"{r.path}: a fixed agent whose recorded choices hold more than one value; "
                         f"labelled by its name only.")
    headline = headline_attack(runs)
    groups.sort(key=rank_key(headline))
    attacks = sorted({n for r in runs for n in r.final}, key=attack_order)

    fixed = [g for g in groups if g.is_fixed]
    search: list[Group] = []
    main = [g for g in groups if not g.is_fixed]
    if len(fixed) >= 2:
        search = fixed
        default = {default_fixed_attack(g.runs[0]) for g in fixed} - {None}
        chosen = []
        if headline:
            best = fixed[0]  # groups are ranked
            best.role = f"search: best of {len(fixed)} fixed settings"
            chosen.append(best)
        for g in fixed:
            if g.runs[0].fixed_attack in default:
                g.role = (g.role + ", " if g.role else "") + "default PGD-AT"
                if g not in chosen:
                    chosen.append(g)
        main = sorted(main + chosen, key=rank_key(headline))
    else:
        main = groups
    sources = [str(p) for p in paths]
    return Comparison(runs, groups, main, search, attacks, headline, warnings, notes, unfinished, sources, weights)


# ----------------------------------------------------------------------------- report


def _row_label(g: Group, winners: Sequence[Group]) -> str:
    text = f"**`{g.label}`**" if g in winners else f"`{g.label}`"
    if g.role:
        text += f" ({g.role})"
    return text + (" **← best**" if g in winners else "")


def results_table(c: Comparison, groups: Sequence[Group], *, winners: Sequence[Group] = ()) -> str:
    titles = []
    for a in c.attacks:
        have = next(r for r in c.runs if a in r.final)
        star = " *" if a == c.headline else ""
        titles.append(f"{_attack_title(a, have)}{star} (%)")
    head = ["Agent", "Seeds", *titles, "Wall time (s)", "Train s/epoch"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" + "---:|" * (len(head) - 1)]
    for g in groups:
        n = len(g.runs)
        cells = [_row_label(g, winners), f"{n} ({','.join(map(str, g.seeds))})"]
        cells += [g.accuracy(a).pct(n) for a in c.attacks]
        cells += [g.wall().seconds(), g.per_epoch().seconds()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _protocol_lines(c: Comparison) -> list[str]:
    ref = c.runs[0]
    p = protocol_of(ref)
    lines = [f"- Weights: {WEIGHTS[c.weights]} of each run",
             f"- Data: {p['data set']}; model {p['model']}; {p['training budget']}",
             f"- Threat model: {ref.threat}",
             f"- Strategy space (column: values): {p['strategy grid']}"]
    for a in c.attacks:
        have = [r for r in c.runs if a in r.final]
        row = have[0].final[a]
        n_images = sorted({int(r.final[a].get("n_images", 0)) for r in have})
        where = " (from experiments/evaluate.py)" if any(a in r.posthoc for r in have) else ""
        lines.append(f"- `{a}`: {row.get('label', a)}, eps {format_eps(float(row.get('epsilon', 0)))}, "
                     f"first {'/'.join(map(str, n_images))} test images{where}")
    if c.headline:
        lines.append(f"- Ranking (* column): {_attack_title(c.headline, c.runs[0])} robust accuracy, mean over seeds "
                     f"(AutoAttack when every run has it, else the strongest PGD every run has)")
    lines.append(f"- Per-epoch curves: {p['per-epoch evaluation']}")
    lines.append("- ± is the sample standard deviation over seeds; (n=k) marks a cell with fewer seeds than its row")
    return lines


def markdown_report(c: Comparison, figures: Mapping[str, Path | None]) -> str:
    out = ["# LAS-AT comparison", "",
           f"{len(c.runs)} runs, {len(c.groups)} agents/settings, from {', '.join(c.sources)}.", ""]
    if c.warnings:
        out += ["## ⚠ WARNING: the runs do not share one protocol", "",
                "The numbers below are NOT directly comparable:", ""]
        out += [f"- **{w}**" for w in c.warnings] + [""]
    out += ["## Protocol", ""] + _protocol_lines(c) + [""]
    out += ["## Results (test accuracy, mean ± std over seeds)", "", results_table(c, c.main, winners=c.winners), ""]
    if c.winners:
        names = ", ".join(f"`{g.label}`" for g in c.winners)
        out.append(f"Best mean {_attack_title(c.headline, c.runs[0])} robust accuracy: {names}{c.margin_note()}.")
        out.append("")
    if c.search:
        if c.headline:
            text = (f"Every fixed (PGD-AT) attack that was run, ranked by mean {_attack_title(c.headline, c.runs[0])} "
                    "robust accuracy. The best is picked on the same test images it is reported on, so its row "
                    "above is an optimistic estimate of hand-tuning the fixed attack.")
        else:
            text = "Every fixed (PGD-AT) attack that was run (unranked: no robust attack was evaluated on every run)."
        out += ["## Search baseline: fixed attack settings (paper Fig. 3)", "", text, "",
                results_table(c, c.search), ""]
    if c.notes or c.unfinished:
        out += ["## Notes", ""] + [f"- {n}" for n in c.notes]
        if c.unfinished:
            out.append(f"- {len(c.unfinished)} unfinished run folder(s) (a checkpoint, no results yet) were "
                       f"skipped, e.g. {c.unfinished[0]}")
        out.append("")
    out += ["## Figures", ""]
    captions = {
        "robust_curves": "Per-epoch accuracy (mean ± std over seeds): test and train-subset robust, test clean "
                         "(paper Fig. 1; a gap between the robust curves is robust overfitting).",
        "epsilon_distribution": "Share of training images given each epsilon, per epoch, all seeds pooled; "
                                "the white line is the mean index (paper Fig. 4).",
        "fixed_images_strength": "Epsilon chosen for a few fixed training images (the same images in every "
                                 "run) when they were trained on, per epoch, first seed of each agent that "
                                 "chooses (paper Fig. 5); lines are offset slightly to keep equal choices apart.",
    }
    for key, caption in captions.items():
        path = figures.get(key)
        if path is not None:
            out += [f"![{key}]({path.name})", "", caption, ""]
        elif key == "fixed_images_strength":
            out += ["(No fixed-images figure (Fig. 5): no run of an agent that chooses records `fixed_images` "
                    "in its per-epoch history.)", ""]
    out += ["## Runs", "", "| Agent | Seed | " + " | ".join(c.attacks) + " | Wall time (s) | Run directory |",
            "|---|---:|" + "---:|" * len(c.attacks) + "---:|---|"]
    for g in c.groups:
        for r in g.runs:
            accs = [f"{100 * float(r.final[a]['accuracy']):.2f}" if a in r.final else "-" for a in c.attacks]
            wall = f"{r.seconds['total']:.1f}" if "total" in r.seconds else "-"
            out.append(f"| `{r.label}` | {r.seed} | " + " | ".join(accs) + f" | {wall} | {r.path} |")
    return "\n".join(out) + "\n"


def summary_json(c: Comparison, figures: Mapping[str, Path | None]) -> dict[str, Any]:
    def group(g: Group) -> dict[str, Any]:
        return {"label": g.label, "role": g.role, "seeds": g.seeds, "runs": [str(r.path) for r in g.runs],
                "accuracy": {a: g.accuracy(a).to_dict() for a in c.attacks},
                "wall_seconds": g.wall().to_dict(), "train_seconds_per_epoch": g.per_epoch().to_dict()}

    return {"format": SUMMARY_FORMAT, "weights": c.weights, "headline_attack": c.headline, "attacks": c.attacks,
            "winners": [g.label for g in c.winners], "main": [g.label for g in c.main],
            "search": [g.label for g in c.search], "groups": [group(g) for g in c.groups],
            "warnings": c.warnings, "notes": c.notes,
            "figures": {k: str(v) for k, v in figures.items() if v is not None}}


# ----------------------------------------------------------------------------- figures


def _colors(groups: Sequence[Group]) -> dict[str, Any]:
    cmap = plt.get_cmap("tab10")
    return {g.label: cmap(i % 10) for i, g in enumerate(groups)}


def _short(g: Group) -> str:
    return g.label + (f" ({g.role})" if g.role else "")


def plot_curves(groups: Sequence[Group], path: Path) -> Path | None:
    panels = [("test_robust", "test, robust"), ("train_robust", "train subset, robust"), ("test_clean", "test, clean")]
    if any("val_robust" in (h.get("eval") or {}) for g in groups for r in g.runs for h in r.history):
        panels.insert(0, ("val_robust", "validation (held out; selects best.pt), robust"))
    if not any(h.get("eval") for g in groups for r in g.runs for h in r.history):
        return None
    ref = next(r for g in groups for r in g.runs)
    colors = _colors(groups)
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.0), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels):
        for g in groups:
            per_epoch: dict[int, list[float]] = defaultdict(list)
            for r in g.runs:
                for h in r.history:
                    if h.get("eval") and key in h["eval"]:
                        per_epoch[int(h["epoch"])].append(100 * float(h["eval"][key]))
            if not per_epoch:
                continue
            epochs = sorted(per_epoch)
            mean = np.array([np.mean(per_epoch[e]) for e in epochs])
            std = np.array([np.std(per_epoch[e], ddof=1) if len(per_epoch[e]) > 1 else 0.0 for e in epochs])
            ax.plot(epochs, mean, marker="o", ms=3, color=colors[g.label], label=_short(g))
            ax.fill_between(epochs, mean - std, mean + std, color=colors[g.label], alpha=0.2, lw=0)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="best")
    fig.suptitle(f"Per-epoch accuracy, mean ± std over seeds; robust = {ref.per_epoch_attack}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _grid_panels(n: int) -> tuple[plt.Figure, list[Any]]:
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.4 * rows), squeeze=False, layout="constrained")
    flat = [ax for row in axes for ax in row]
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def plot_epsilon_distribution(groups: Sequence[Group], path: Path) -> Path | None:
    groups = [g for g in groups if any(h.get("choices", {}).get("epsilon") for r in g.runs for h in r.history)]
    if not groups:
        return None
    fig, axes = _grid_panels(len(groups))
    im = None
    for ax, g in zip(axes, groups):
        values = list(g.runs[0].grid.values["epsilon"])
        per_epoch: dict[int, np.ndarray] = {}
        for r in g.runs:
            for h in r.history:
                counts = np.asarray(h.get("choices", {}).get("epsilon") or [], dtype=float)
                if len(counts) == len(values):
                    e = int(h["epoch"])
                    per_epoch[e] = per_epoch.get(e, np.zeros(len(values))) + counts
        epochs = sorted(per_epoch)
        if not epochs:
            ax.set_visible(False)
            continue
        counts = np.stack([per_epoch[e] for e in epochs], axis=1)  # (values, epochs)
        share = counts / np.maximum(counts.sum(0, keepdims=True), 1)
        im = ax.imshow(share, aspect="auto", origin="lower", cmap="viridis", vmin=0, vmax=1,
                       extent=(epochs[0] - 0.5, epochs[-1] + 0.5, -0.5, len(values) - 0.5))
        ax.plot(epochs, (share * np.arange(len(values))[:, None]).sum(0), color="white", lw=1.2)
        ax.set_yticks(range(len(values)))
        ax.set_yticklabels([format_eps(v) for v in values], fontsize=7)
        ax.set_xlabel("epoch")
        ax.set_ylabel("epsilon")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"{_short(g)}, {len(g.runs)} seed(s)", fontsize=8)
    if im is not None:
        fig.colorbar(im, ax=axes, fraction=0.025, label="share of training images")
    fig.suptitle("Chosen epsilon per epoch (paper Fig. 4)", fontsize=10)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def _fixed_images(run: Run) -> list[tuple[int, dict[str, Any]]]:
    return [(int(h["epoch"]), h["fixed_images"]) for h in run.history if h.get("fixed_images")]


def plot_fixed_images(groups: Sequence[Group], path: Path, *, images: int = 8) -> Path | None:
    """One panel per agent that chooses (fixed attacks are constant by construction): the epsilon
    chosen for each of the first ``images`` tracked training images, per epoch, in the first
    seed's run. An epoch where an image was not trained on (the dropped last partial batch,
    ``max_steps_per_epoch``) has no point; the line joins the epochs that have one."""
    shown = [(g, g.runs[0]) for g in groups if not g.is_fixed and _fixed_images(g.runs[0])]
    if not shown:
        return None
    fig, axes = _grid_panels(len(shown))
    for ax, (g, run) in zip(axes, shown):
        records = _fixed_images(run)
        epochs = [e for e, _ in records]
        values = list(run.grid.values["epsilon"])
        spacing = (values[-1] - values[0]) / max(len(values) - 1, 1) or 1.0
        indices = list(records[0][1].get("index") or range(len(records[0][1]["epsilon"])))[:images]
        for k, image in enumerate(indices):
            # A small vertical offset per image keeps images with equal choices apart.
            offset = (k - (len(indices) - 1) / 2) * 0.3 * spacing / max(len(indices), 1)
            points = [(e, float(rec["epsilon"][k]) + offset) for e, rec in records
                      if k < len(rec["epsilon"]) and rec["epsilon"][k] is not None]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o", ms=3, lw=1, color=plt.get_cmap("tab10")(k % 10), label=f"image {image}")
        ax.set_yticks(values)
        ax.set_yticklabels([format_eps(v) for v in values], fontsize=7)
        ax.set_ylim(values[0] - 0.5 * spacing, values[-1] + 0.5 * spacing)
        ax.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
        ax.set_xlabel("epoch")
        ax.set_ylabel("chosen epsilon")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.set_title(f"{_short(g)}, seed {run.seed}", fontsize=8)
        ax.legend(fontsize=6, ncol=2, loc="best")
    fig.suptitle("Epsilon chosen for fixed training images over epochs (paper Fig. 5)", fontsize=10)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- command line


def default_out(paths: Sequence[str | Path]) -> Path:
    """``<deepest common folder of the inputs>/comparison``."""
    resolved = [Path(p).expanduser().resolve() for p in paths]
    folders = [p.parent if p.is_file() else p for p in resolved]
    common = Path(*Path(folders[0]).parts)
    for f in folders[1:]:
        while common not in (f, *f.parents):
            common = common.parent
    return common / "comparison"


def write_report(c: Comparison, out: Path, *, images: int = 8) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    plotted = c.main
    figures = {
        "robust_curves": plot_curves(plotted, out / "robust_curves.png"),
        "epsilon_distribution": plot_epsilon_distribution(plotted, out / "epsilon_distribution.png"),
        "fixed_images_strength": plot_fixed_images(plotted, out / "fixed_images_strength.png", images=images),
    }
    report = out / "report.md"
    atomic_write_text(report, markdown_report(c, figures))
    write_json(out / "summary.json", summary_json(c, figures), default=str)
    return {"report": report, "summary": out / "summary.json", **{k: v for k, v in figures.items() if v is not None}}


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
        sys.stderr.write(f"compare: error: {' '.join(str(exc).split())}\n")
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
        print(f"Best mean {_attack_title(c.headline, c.runs[0])} robust accuracy: "
              + ", ".join(g.label for g in c.winners) + c.margin_note())
    if c.search:
        print(f"\nSearch baseline ({len(c.search)} fixed attack settings):")
        print(results_table(c, c.search))
    print(f"\nReport: {files['report']}")
    print("Figures: " + (", ".join(str(v) for k, v in files.items() if k not in ("report", "summary")) or "none"))
    return EXIT_MISMATCH if (args.strict and c.warnings) else 0


if __name__ == "__main__":
    raise SystemExit(main())
