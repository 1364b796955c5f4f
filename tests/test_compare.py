"""experiments/compare.py on tiny runs: grouping over seeds, the search baseline, the protocol
check, the figures, and the command line end to end (the issue's sweep, then the report).

The runs are made once per module by the real training loop (digits, 2 epochs x 3 steps); the
variants the tests need (another fixed attack, another protocol...) are copies of them with
their ``results.json`` edited, so they are exactly in the runner's format.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from test_run import TINY, config

from experiments.comparison.ranking import compare, method_of
from experiments.comparison.report import markdown_report, write_report
from experiments.compare import EXIT_MISMATCH
from experiments.compare import main as compare_main
from experiments.comparison.runs import _weights_fingerprint
from experiments.training.loop import train
from experiments.runfolder.rundir import run_subdir, settings_hash
from experiments.runfolder.runfiles import EVALUATION_FORMAT
from experiments.config.settings import settings_from_config
from tests.conftest import main_in_process

# The runner's tiny budget without agent.k (the fixed and random agents take no k).
BASELINE_TINY = [a for a in TINY if not a.startswith("agent.k")] + ["data.epochs=2", "data.max_steps_per_epoch=3"]
REPS = 100  # bootstrap repetitions: enough to test the numbers, fast
FAST = ["--bootstrap-reps", str(REPS)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """``<root>/digits/{fixed,random}/small_cnn-seed{0,1}-<hash>``, as experiments/run.py lays them out."""
    root = tmp_path_factory.mktemp("runs")
    threads = torch.get_num_threads()
    try:
        for agent in ("fixed", "random"):
            for seed in (0, 1):
                cfg = config(*BASELINE_TINY, f"agent={agent}", f"seed={seed}")
                train(settings_from_config(cfg, root / run_subdir(cfg), settings_hash=settings_hash(cfg)))
    finally:
        torch.set_num_threads(threads)
    return root


def clone(run_dir: Path, dest: Path, edit: Callable[[dict], None]) -> Path:
    """A copy of a run's results.json (all compare.py reads), edited."""
    dest.mkdir(parents=True)
    doc = json.loads((run_dir / "results.json").read_text())
    edit(doc)
    (dest / "results.json").write_text(json.dumps(doc))
    return dest


def run_dirs(root: Path, agent: str) -> list[Path]:
    return sorted(p.parent for p in root.glob(f"digits/{agent}/*/results.json"))


def test_report_has_every_agent_with_iqm_and_confidence_intervals_over_seeds(runs, tmp_path, capsys):
    assert compare_main([str(runs), "--out", str(tmp_path / "report"), *FAST]) == 0
    printed = capsys.readouterr()
    report = (tmp_path / "report" / "report.md").read_text()
    fixed = "fixed(eps=0.2,it=5,step=0.05)"  # the played attack, read from the recorded choices
    for label in (fixed, "random"):
        row = next(line for line in report.splitlines() if line.startswith(f"| `{label}`")
                   or line.startswith(f"| **`{label}`**"))
        assert "2 (0,1)" in row and row.count("[") == (4 if label == "random" else 2)  # IQMs (+ P(> PGD-AT))
        costs = [json.loads((d / "results.json").read_text())["cost"]["gradients_per_image"]
                 for d in run_dirs(runs, label.split("(")[0])]
        assert row.split(" | ")[-2] == f"{sum(costs) / len(costs):.1f}"  # Gradients/image: mean over seeds
        assert label in printed.out  # the table is printed too
    assert "← best" in report and "← best" in printed.out
    assert "PGD-5 *" in report  # the ranking column: the strongest attack every run has
    assert "first 64 test images" in report and "L-inf eps=0.2" in report  # the protocol is stated
    assert "WARNING" not in report and printed.err == ""
    assert "Fewer than 5 seeds" in report and "Fewer than 5 seeds" in printed.out
    for png in ("robust_curves.png", "epsilon_distribution.png", "iqm.png", "improvement.png"):
        assert (tmp_path / "report" / png).stat().st_size > 10_000
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert summary["headline_attack"] == "pgd5"
    assert {g["label"] for g in summary["groups"]} == {fixed, "random"}
    for g in summary["groups"]:
        acc = g["accuracy"]["pgd5"]  # the IQM of 2 seeds trims nothing: their mean
        assert acc["n"] == 2 and acc["iqm"]["value"] == pytest.approx(sum(acc["values"]) / 2)


def test_fixed_attack_search_is_one_table_with_the_learned_agents(runs, tmp_path):
    # Two more fixed attacks (the search), as `sweep=fixed_search_digits` would make them:
    # the recorded choices say which attack was played.
    for eps_index, accuracy in ((1, 0.9), (4, 0.05)):
        for src in run_dirs(runs, "fixed"):
            def edit(doc, eps_index=eps_index, accuracy=accuracy):
                doc["config"]["agent"]["epsilon"] = doc["config"]["data"]["grid"]["epsilons"][eps_index]
                for h in doc["history"]:
                    n = sum(h["choices"]["epsilon"])
                    h["choices"]["epsilon"] = [n if i == eps_index else 0 for i in range(len(h["choices"]["epsilon"]))]
                for row in doc["final"]:
                    if row["name"] == "pgd5":
                        row["accuracy"] = accuracy
            clone(src, tmp_path / "search" / f"eps{eps_index}" / src.name, edit)

    c = compare([runs, tmp_path / "search"], reps=REPS)
    assert sorted(g.label for g in c.search) == ["fixed(eps=0.1,it=5,step=0.05)", "fixed(eps=0.2,it=5,step=0.05)",
                                                 "fixed(eps=0.25,it=5,step=0.05)"]
    best, default = c.search[0], next(g for g in c.search if g.label == "fixed(eps=0.2,it=5,step=0.05)")
    assert best.label == "fixed(eps=0.1,it=5,step=0.05)" and best.role.startswith("search: best of 3")
    assert "default PGD-AT" in default.role
    # The main table: the learned/random agents, the default PGD-AT and the best of the search;
    # the worst fixed setting only in the search table.
    assert {g.label for g in c.main} == {"random", best.label, default.label}
    assert c.winners == [best]
    files = write_report(c, tmp_path / "report")
    report = files["report"].read_text()
    assert "## Search baseline: fixed attack settings" in report
    assert "(search: best of 3 fixed settings) **← best**" in report



def test_fixed_runs_of_different_methods_are_not_one_search(runs, tmp_path):
    # The same fixed attack trained with TRADES is another baseline, not another PGD-AT setting.
    for src in run_dirs(runs, "fixed"):
        def edit(doc):
            doc["config"]["method"] = {"name": "trades", "trades_beta": 6.0}
            doc["agent"] = doc["config"]["agent"]["name"] = "trades"
        clone(src, tmp_path / "trades" / src.name, edit)
    c = compare([runs, tmp_path / "trades"], reps=REPS)
    assert c.search == []  # one fixed setting per method: nothing was searched
    assert {g.label for g in c.main} == {"fixed(eps=0.2,it=5,step=0.05)", "trades(eps=0.2,it=5,step=0.05)", "random"}
    assert all("search" not in g.role for g in c.main)
    assert method_of(c.runs[0]) in ("pgd_at", "trades")

def test_protocol_mismatch_is_a_loud_warning(runs, tmp_path, capsys):
    src = run_dirs(runs, "random")[0]

    def other_protocol(doc):
        doc["config"]["seed"] = 5
        for row in doc["final"]:
            row["n_images"] = 100  # evaluated on other images
        doc["config"]["data"]["epochs"] = 9  # and trained longer

    clone(src, tmp_path / "odd" / "digits" / "random" / "small_cnn-seed5-00000000", other_protocol)
    code = compare_main([str(runs), str(tmp_path / "odd"), "--out", str(tmp_path / "report"), "--strict", *FAST])
    assert code == EXIT_MISMATCH
    err = capsys.readouterr().err
    assert "compare: WARNING: Final evaluation 'pgd5' (eps, test images) differs" in err
    assert "100 images" in err and "64 images" in err and "Training budget differs" in err
    report = (tmp_path / "report" / "report.md").read_text()
    assert "## ⚠ WARNING: the runs do not share one protocol" in report.split("## Protocol")[0]
    # Without --strict the report is written and the exit status is 0.
    assert compare_main([str(runs), str(tmp_path / "odd"), "--out", str(tmp_path / "report2"), *FAST]) == 0


def test_runs_of_one_agent_with_other_settings_get_their_own_labels_and_duplicates_count_once(runs, tmp_path):
    for src in run_dirs(runs, "random"):
        def edit(doc):
            doc["config"]["data"]["optim"]["lr"] = 0.2
        clone(src, tmp_path / "lr" / src.name, edit)
    dup = run_dirs(runs, "fixed")[0]
    shutil.copytree(dup, tmp_path / "dup" / dup.name)  # the same run twice (e.g. copied folders)
    c = compare([runs, tmp_path / "lr", tmp_path / "dup"], reps=REPS)
    labels = {g.label: len(g.runs) for g in c.groups}
    assert labels == {"fixed(eps=0.2,it=5,step=0.05)": 2, "random(data.optim.lr=0.05)": 2,
                      "random(data.optim.lr=0.2)": 2}
    assert any("counted once" in n for n in c.notes)


def test_fixed_images_figure_when_the_runs_record_them(runs, tmp_path):
    # The per-epoch `fixed_images` record the loop keeps (Fig. 5); made here for the random runs.
    for src in run_dirs(runs, "random") + run_dirs(runs, "fixed"):
        def edit(doc):
            for h in doc["history"]:
                h["fixed_images"] = {"index": [3, 14, 15], "epsilon": [0.1, None, 0.3],
                                     "iterations": [2, None, 8], "step_size": [0.05, None, 0.1]}
        clone(src, tmp_path / "fig5" / src.parent.name / src.name, edit)
    files = write_report(compare([tmp_path / "fig5"], reps=REPS), tmp_path / "report")
    assert files["fixed_images_strength"].stat().st_size > 10_000
    assert "![fixed_images_strength](fixed_images_strength.png)" in files["report"].read_text()


def test_autoattack_from_evaluate_py_joins_the_table_when_it_scored_the_final_weights(runs, tmp_path):
    # experiments/evaluate.py writes evaluation*.json next to the checkpoint, with a fingerprint
    # of the weights it scored; a report of other weights (an earlier epoch) must not be used.
    dirs = run_dirs(runs, "random")
    for i, src in enumerate(dirs):
        dest = tmp_path / "aa" / src.name
        shutil.copytree(src, dest)
        sha = _weights_fingerprint(dest / "target_state_dict.pt") if i == 0 else "0123456789abcdef"
        (dest / "evaluation_n64.json").write_text(json.dumps({
            "format": EVALUATION_FORMAT, "fingerprint": {"model_sha256": sha, "eps": 0.2, "n_images": 64},
            "sanity_passed": True,
            "results": [{"name": "autoattack", "label": "AutoAttack (standard, official)", "accuracy": 0.1,
                         "n_images": 64, "epsilon": 0.2}]}))
    c = compare([tmp_path / "aa"], reps=REPS)
    assert "autoattack" in c.attacks and c.headline == "pgd5"  # not on every run: PGD still ranks
    (group,) = c.groups
    assert group.scores("autoattack") == [0.1]
    assert any("other weights" in n for n in c.notes)
    report = markdown_report(c, {})
    assert "AutoAttack IQM" in report and "10.00 [10.00, 10.00] (n=1)" in report and "(from experiments/evaluate.py)" in report


PGD5 = {"fixed": [0.70, 0.69, 0.71, 0.62, 0.70], "random": [0.72, 0.66, 0.74, 0.73, 0.71]}  # per seed


def arena(runs: Path, root: Path, seeds: int) -> Path:
    """Clones of one fixed (PGD-AT) and one random run, one per seed, with the PGD-5 accuracies of
    ``PGD5`` and the ``cost`` record of results.json."""
    for agent, scores in PGD5.items():
        for seed, accuracy in zip(range(seeds), scores):
            def edit(doc, seed=seed, accuracy=accuracy):
                doc["config"]["seed"] = seed
                next(r for r in doc["final"] if r["name"] == "pgd5")["accuracy"] = accuracy
                doc["cost"] = {"attack_gradients_per_image": 100.0 + seed, "probe_gradients_per_image": 10.0,
                               "gradients_per_image": 110.0 + seed, "images": 1000}
            clone(run_dirs(runs, agent)[0], root / "digits" / agent / f"small_cnn-seed{seed}-00000000", edit)
    return root


def test_iqm_interval_improvement_worst_seed_and_cost_are_rliables_numbers_on_the_per_seed_scores(runs, tmp_path,
                                                                                                  capsys):
    from rliable import library, metrics

    root = arena(runs, tmp_path / "runs", seeds=5)
    assert compare_main([str(root), "--out", str(tmp_path / "report"), *FAST]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    groups = {g["label"]: g for g in summary["groups"]}
    fixed, random = groups[summary["pgd_at"]], groups["random"]
    assert summary["pgd_at"].startswith("fixed(") and summary["bootstrap"]["reps"] == REPS
    x, y = (np.array(PGD5[a])[:, None] for a in ("random", "fixed"))
    np.random.seed(summary["bootstrap"]["seed"])  # rliable resamples with NumPy's global generator
    point, ci = library.get_interval_estimates({"r": x}, lambda s: np.array([metrics.aggregate_iqm(s)]), reps=REPS)
    assert random["accuracy"]["pgd5"]["iqm"] == pytest.approx({"value": point["r"][0], "low": ci["r"][0, 0],
                                                               "high": ci["r"][1, 0]})
    np.random.seed(summary["bootstrap"]["seed"])
    point, ci = library.get_interval_estimates(
        {"r,f": [x, y]}, lambda a, b: np.array([metrics.probability_of_improvement(a, b)]), reps=REPS)
    gain = random["accuracy"]["pgd5"]["improvement_over_pgd_at"]
    assert gain == pytest.approx({"value": point["r,f"][0], "low": ci["r,f"][0, 0], "high": ci["r,f"][1, 0]})
    # ... and rliable's numbers against their definitions: the IQM of 5 seeds is the mean of the middle 3, the
    # probability of improvement the share of (agent seed, PGD-AT seed) pairs it wins, ties counting half.
    assert random["accuracy"]["pgd5"]["iqm"]["value"] == pytest.approx(np.mean(sorted(PGD5["random"])[1:4]))
    pairs = [(a > b) + 0.5 * (a == b) for a in PGD5["random"] for b in PGD5["fixed"]]
    assert gain["value"] == pytest.approx(np.mean(pairs))
    assert fixed["accuracy"]["pgd5"]["improvement_over_pgd_at"] is None  # the reference itself
    assert fixed["accuracy"]["pgd5"]["worst"] == min(PGD5["fixed"]) and random["gradients_per_image"] == 112.0
    report = (tmp_path / "report" / "report.md").read_text()
    row = next(line for line in report.splitlines() if "`random`" in line and "5 (0,1,2,3,4)" in line)
    cells = row.split(" | ")
    assert f"{point['r,f'][0]:.2f} [{ci['r,f'][0, 0]:.2f}, {ci['r,f'][1, 0]:.2f}]" in cells
    assert "66.00" in cells and "112.0" in cells  # the worst seed, the gradients per image
    assert "Gradients/image: gradient computations per training image" in report
    assert "Fewer than 5 seeds" not in report + printed
    assert (tmp_path / "report" / "iqm.png").stat().st_size > 10_000
    assert (tmp_path / "report" / "improvement.png").stat().st_size > 10_000


def test_fewer_than_five_seeds_is_said_and_wandb_logs_the_table_and_figures_as_one_offline_run(runs, tmp_path,
                                                                                                monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    root = arena(runs, tmp_path / "runs", seeds=3)
    assert compare_main([str(root), "--out", str(tmp_path / "report"), "--wandb", *FAST]) == 0
    printed = capsys.readouterr().out
    note = next(line for line in printed.splitlines() if line.startswith("Fewer than 5 seeds"))
    assert "`random` (3)" in note and "rliable" in note
    assert note in (tmp_path / "report" / "report.md").read_text()
    assert json.loads((tmp_path / "report" / "summary.json").read_text())["few_seeds"] == note
    (offline,) = (tmp_path / "report" / "wandb").glob("offline-run-*")
    assert f"wandb sync {offline}" in printed
    (table,) = offline.rglob("results_*.table.json")
    doc = json.loads(table.read_text())
    assert "PGD-5 P(> PGD-AT) [95% CI]" in doc["columns"] and any("`random`" in row[0] for row in doc["data"])
    assert len(list(offline.rglob("*.png"))) >= 2  # iqm.png, improvement.png (and the curves)


def test_only_clean_accuracy_means_no_ranking(runs, tmp_path):
    for src in run_dirs(runs, "random"):
        def edit(doc):
            doc["final"] = [r for r in doc["final"] if r["name"] == "clean"]
        clone(src, tmp_path / "clean" / src.name, edit)
    c = compare([tmp_path / "clean"], reps=REPS)
    assert c.headline is None and c.winners == []
    assert "← best" not in markdown_report(c, {})


def test_no_runs_is_one_line_and_exit_1(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert compare_main([str(tmp_path / "empty")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("las-at: error: No finished runs") and err.count("\n") == 1


@pytest.mark.slow
def test_sweep_then_compare_from_the_command_line(tmp_path):
    # The issue's workflow: one multirun over agents and seeds, then the local report; both scripts run as
    # __main__ in this process (tests/conftest.py); test_safety runs multiruns in real processes.
    sweep = main_in_process("run", "-m", "agent=fixed,random", "seed=0,1", *BASELINE_TINY, cwd=tmp_path)
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    proc = main_in_process("compare", "runs/digits", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "runs" / "digits" / "comparison"  # default: <common folder>/comparison
    report = (out / "report.md").read_text()
    assert "`random`" in report and "`fixed(eps=0.2,it=5,step=0.05)`" in report and "4 runs" in report
    assert (out / "robust_curves.png").is_file() and (out / "epsilon_distribution.png").is_file()
    assert "Report:" in proc.stdout and "| Agent |" in proc.stdout
    # With the loop recording fixed images, the random agent's Fig. 5 is drawn.
    history = json.loads(next((tmp_path / "runs").glob("digits/random/*/results.json")).read_text())["history"]
    assert (out / "fixed_images_strength.png").is_file() == ("fixed_images" in history[0])


def test_drift_below_the_threat_model_is_named_only_when_the_run_also_falls_behind_pgd_at(runs, tmp_path):
    """The arena's learner-stability check: a run is named when its last epoch's mean chosen epsilon is
    below the threat model's AND its headline accuracy is below PGD-AT's IQM; either alone is not enough."""
    fixed = run_dirs(runs, "fixed")
    low = min(row["accuracy"] for d in fixed for row in json.loads((d / "results.json").read_text())["final"])

    def played(epsilon: float, accuracy: float) -> Callable[[dict], None]:
        def edit(doc: dict) -> None:
            doc["history"][-1]["train"]["attack/epsilon"] = epsilon
            for row in doc["final"]:
                row["accuracy"] = accuracy if row["name"] != "clean" else row["accuracy"]
        return edit

    for seed, (eps, acc) in enumerate([(0.1, low / 2), (0.1, 1.0), (0.3, low / 2)]):  # only the first drifts AND lags
        clone(run_dirs(runs, "random")[0], tmp_path / "drift" / "digits" / "random" / f"small_cnn-seed{seed}-0000000{seed}",
              played(eps, acc))
    for d in fixed:
        shutil.copytree(d, tmp_path / "drift" / "digits" / "fixed" / d.name)
    c = compare([str(tmp_path / "drift")], "final", REPS)
    notes = c.drift_notes()
    assert len(notes) == 1 and "seed 0:" in notes[0] and "0.1 < the threat model's 0.2" in notes[0], notes
