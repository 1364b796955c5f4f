"""Checkpoint selection without test leakage (experiments/training/finish.py): the stratified,
seeded validation split, the best-epoch bookkeeping, and a tiny run that keeps and reports both
the final and the best-on-validation weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from experiments.comparison.ranking import compare
from experiments.comparison.report import markdown_report
from experiments.comparison.runs import WEIGHTS
from experiments.training.loop import train
from experiments.runfolder.rundir import settings_hash
from experiments.training.finish import BEST, BestWeights, split_validation
from experiments.config.schema import SelectionSettings
from las_env.validate import SettingError
from experiments.config.settings import settings_from_config

CONF = Path(__file__).resolve().parents[1] / "experiments" / "conf"
TINY = [
    "data.epochs=3", "data.max_steps_per_epoch=3", "data.batch_size=32", "eval.test_subset=32",
    "eval.train_subset=32", "eval.final_n=48", "eval.final_attacks=[clean,pgd3]", "eval.pgd_iterations=2",
    "eval.every=1", "agent=fixed", "logger=none", "progress=false", "threads=1",
]


def test_split_is_stratified_disjoint_and_seeded(digits):
    train_part, (x_val, y_val) = split_validation(digits, 0.1, seed=0)
    n_train = digits.y_train.numel()
    assert train_part.y_train.numel() + y_val.numel() == n_train
    for c in range(10):
        n_c = int((digits.y_train == c).sum())
        assert int((y_val == c).sum()) == round(0.1 * n_c)  # stratified
    # Disjoint and complete: the two parts together are the training set, image for image.
    original = sorted(tuple(x.flatten().tolist()) + (int(y),) for x, y in zip(digits.x_train, digits.y_train))
    parts = sorted(tuple(x.flatten().tolist()) + (int(y),) for x, y in
                   zip(torch.cat([train_part.x_train, x_val]), torch.cat([train_part.y_train, y_val])))
    assert parts == original
    again = split_validation(digits, 0.1, seed=0)[1]
    other = split_validation(digits, 0.1, seed=1)[1]
    assert torch.equal(again[0], x_val) and not torch.equal(other[0], x_val)
    assert "held out for validation" in train_part.description
    assert split_validation(digits, 0.0, seed=0) == (digits, None)


@pytest.mark.parametrize("cfg, expected", [
    ({"val_fraction": 0.7}, "val_fraction"),
    ({"select_on": "best"}, "valid choices"),
    ({"val_fraction": 0, "select_on": "val"}, "select_on=last"),
])
def test_bad_selection_settings_say_how_to_fix_them(cfg, expected):
    with pytest.raises(SettingError, match=expected):
        SelectionSettings(**cfg)
    assert SelectionSettings(val_fraction=0, select_on="last").val_fraction == 0


def test_best_weights_keep_the_first_best_epoch(tmp_path):
    model = torch.nn.Linear(2, 2)
    best = BestWeights("val")
    assert best.update(1, {"val_robust": 0.3, "test_robust": 0.9}, model, tmp_path)
    kept = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    assert not best.update(2, {"val_robust": 0.3}, model, tmp_path)  # a tie keeps the earlier epoch
    assert not best.update(3, None, model, tmp_path)  # not evaluated this epoch
    assert best.epoch == 1 and best.score == 0.3
    loaded = best.load_into(model, tmp_path)
    assert torch.equal(loaded.weight, kept) and not torch.equal(model.weight, kept)
    assert BestWeights.from_dict("val", best.as_dict()) == best
    assert BestWeights.from_dict("test", best.as_dict()) == BestWeights("test")  # another criterion: start over
    last = BestWeights("last")
    assert not last.update(1, {"val_robust": 1.0}, model, tmp_path / "x") and last.load_into(model, tmp_path) is None


def _settings(run_dir: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[*TINY, *overrides])
    return settings_from_config(cfg, run_dir, settings_hash=settings_hash(cfg))


def test_run_keeps_and_reports_final_and_best_on_validation_weights(tmp_path, digits):
    result = train(_settings(tmp_path / "val"), data=digits)
    doc = json.loads((result.run_dir / "results.json").read_text())
    history = doc["history"]
    val_n = history[0]["eval"]["val_images"]
    assert val_n == split_validation(digits, 0.1, 0)[1][1].numel()
    scores = [h["eval"]["val_robust"] for h in history]
    sel = doc["selection"]
    assert sel["select_on"] == "val" and sel["epoch"] == 1 + scores.index(max(scores)) and sel["score"] == max(scores)
    assert {r["name"] for r in doc["final"]} == {r["name"] for r in doc["best"]} == {"clean", "pgd3"}
    assert (result.run_dir / BEST).is_file() and (result.run_dir / "checkpoint.pt").is_file()
    md = (result.run_dir / "results.md").read_text()
    assert "final weights (epoch 3)" in md and f"best-epoch weights (epoch {sel['epoch']}" in md
    assert "held-out validation images" in md
    # The best weights' test accuracy is what best.pt gives, evaluated independently of the run.
    best = torch.load(result.run_dir / BEST, weights_only=True)
    assert best["epoch"] == sel["epoch"]
    # compare.py reports the final weights by default and says so; --weights best reads the other rows.
    for weights in ("final", "best"):
        c = compare([result.run_dir], weights)
        assert c.runs[0].final["pgd3"]["accuracy"] == {r["name"]: r for r in doc[weights]}["pgd3"]["accuracy"]
        assert WEIGHTS[weights] in markdown_report(c, {})


def test_test_set_selection_is_named_and_warned(tmp_path, digits, capsys):
    result = train(_settings(tmp_path / "test", "selection.select_on=test"), data=digits)
    doc = json.loads((result.run_dir / "results.json").read_text())
    assert doc["selection"]["select_on"] == "test"
    log = (result.run_dir / "log.txt").read_text()
    assert "WARNING: selection.select_on=test" in log and "optimistic" in log
    assert "TEST images (authors' selection; optimistic)" in (result.run_dir / "results.md").read_text()
