"""Evaluate a saved target network: clean, FGSM, PGD-10/20/50, C&W-inf, official AutoAttack.

    python experiments/evaluate.py checkpoint=runs/demo attacks=[clean,pgd20] n=1000
    python experiments/evaluate.py state_dict=weights.pt model=resnet18 data=cifar10

More examples (AutoAttack on fewer images, export), options and report names: ``experiments/conf/evaluate.yaml``;
the work: :mod:`experiments.evaluation_job.job`.
Exit status: 0 done; 1 bad input (one paragraph, nothing evaluated); 3 a sanity check failed (results
written all the same; ``fail_on_sanity=false`` turns this off).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hydra
from omegaconf import DictConfig, OmegaConf

from experiments.config.errors import fail
from experiments.evaluation_job.job import execute, prepare


@hydra.main(config_path="conf", config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    # Bad input ends here, before any evaluation; errors during the evaluation keep their traceback.
    try:
        job = prepare(OmegaConf.to_object(cfg))  # the checked Settings (evaluate_schema): a bad value raises ValueError
    except (ValueError, FileNotFoundError, ImportError) as exc:
        fail(str(exc))
    if job is None:
        return
    try:
        status = execute(job)
    except KeyboardInterrupt:
        print("\ninterrupted: finished AutoAttack chunks are saved next to the checkpoint "
              "(*.autoattack_state.json); rerun the same command to resume.", file=sys.stderr)
        sys.exit(130)
    if status:
        sys.exit(status)


if __name__ == "__main__":
    from experiments.config.cli import hydra_entry  # noqa: PLC0415 - Hydra's own failures as one paragraph

    hydra_entry(main, conf_dir=Path(__file__).resolve().parent / "conf")
