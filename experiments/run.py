"""Train a target network with LAS-AT, evaluate it, checkpoint it, log it (options: ``experiments/conf/``).

    python experiments/run.py                                   # offline digits demo, REINFORCE agent
    python experiments/run.py agent=fixed                       # PGD-AT baseline (agent=random too)
    python experiments/run.py -m agent=reinforce,fixed seed=0,1 # four runs, four folders
    python experiments/run.py experiment=cifar10_resnet18_lasat_k20 data.root=/data device=auto
    python experiments/run.py agent=custom agent._target_=my_module.MyAgent
    python experiments/run.py agent=fixed resume=true           # continue the run of this command
    python experiments/run.py resume=runs/digits/fixed/small_cnn-seed0-1a2b3c4d

``torchrun --nproc_per_node=N experiments/run.py ...`` trains ONE run. Exit status: 0 done (or stopped by
``stop_after_epochs``); 1 bad input (one paragraph, before any training); 2 training diverged (the last
finite checkpoint kept); 3 under torchrun, a rank lost contact.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# A user's own agent (agent._target_=my_module.MyAgent) may live in the directory they run from.
if os.getcwd() not in sys.path:
    sys.path.append(os.getcwd())

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.types import RunMode  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from experiments.config.cli import hydra_entry  # noqa: E402
from experiments.training.distributed import EXIT_RANK_LOST, RankLost  # noqa: E402
from experiments.config.errors import ConfigError, fail  # noqa: E402
from experiments.training.guard import TrainingDiverged  # noqa: E402
from experiments.training.loop import train  # noqa: E402
from experiments.runfolder.rundir import resume_target, settings_hash  # noqa: E402
from experiments.config.settings import settings_from_config  # noqa: E402

CONF_DIR = Path(__file__).resolve().parent / "conf"
GROUP_HINTS = {
    "agent": " A class of your own: agent=custom agent._target_=my_module.MyAgent.",
    "model": " Any other architecture name: model.name=NAME (e.g. wrn-28-10).",
}
EXIT_DIVERGED = 2
RESUME_KEEPS = ("resume", "stop_after_epochs", "progress", "threads", "ddp_timeout_s")
"""Overrides that may accompany ``resume=<run_dir>`` (they do not change the run's settings)."""


def recorded_config(run_dir: Path, cfg: DictConfig) -> DictConfig:
    """``resume=<run_dir>``: the run's own recorded config, with this command's run controls."""
    path = run_dir / ".hydra" / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"resume={run_dir}: {path} is missing, so the run's settings are unknown. Resume it "
                          f"by re-running its original command with resume=true.")
    given = {o.split("=", 1)[0].lstrip("+~"): o for o in HydraConfig.get().overrides.task}
    others = [o for key, o in given.items() if key not in RESUME_KEEPS]
    if others:
        raise ConfigError(
            f"resume={run_dir} continues that run with its own recorded settings, so it cannot be combined "
            f"with {others}. Drop them, or run the changed command (it gets a folder of its own)."
        )
    saved = OmegaConf.load(path)
    for key in given.keys() & set(RESUME_KEEPS):  # only what this command sets explicitly
        saved[key] = cfg[key]
    saved.resume = True
    return saved


def _discard_if_empty(run_dir: Path) -> None:
    """Bad input: remove the folder Hydra made for this run if nothing but Hydra's record is in it."""
    if run_dir.is_dir() and {p.name for p in run_dir.iterdir()} <= {".hydra"}:
        shutil.rmtree(run_dir, ignore_errors=True)
        for parent in list(run_dir.parents)[:3]:  # <run_root>/<data>/<agent>, when left empty
            try:
                parent.rmdir()
            except OSError:
                break


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    """Validate ``cfg``, then train in the folder Hydra made for this run; a failure is one paragraph."""
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    try:
        target = resume_target(cfg.get("resume"))
        if target is not None:
            if hydra_cfg.mode == RunMode.MULTIRUN:
                raise ConfigError("resume=<run_dir> names one run; in a multirun use resume=true (each job finds "
                                  "its own).")
            cfg = recorded_config(target, cfg)
        train(settings_from_config(cfg, run_dir, settings_hash=settings_hash(cfg)))
    except ConfigError as exc:
        _discard_if_empty(run_dir)
        fail(str(exc))
    except TrainingDiverged as exc:
        fail(str(exc), code=EXIT_DIVERGED)
    except RankLost as exc:
        fail(str(exc), code=EXIT_RANK_LOST)


if __name__ == "__main__":
    if int(os.environ.get("RANK", "0")) > 0:  # torchrun: rank 0 alone writes the run's .hydra record
        sys.argv.append("hydra.output_subdir=null")
    hydra_entry(main, conf_dir=CONF_DIR, hints=GROUP_HINTS)
