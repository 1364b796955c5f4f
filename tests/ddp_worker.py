"""One process of the DDP tests (``tests/test_ddp.py`` starts it as a subprocess, once per rank,
with torchrun's variables RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT; or alone, one process).

    python tests/ddp_worker.py steps OUT   # score and play 3 steps, save all; again with per-rank BatchNorm
    python tests/ddp_worker.py kill OUT    # rank 1 dies after reset; rank 0 plays on
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from experiments.training.distributed import RankLost, process_group  # noqa: E402
from las_env.global_view import global_view  # noqa: E402
from las_env.datasets import load_dataset  # noqa: E402
from las_env.env import LASEnv  # noqa: E402
from las_env.game_config import LASConfig  # noqa: E402
from las_env.reward import RewardConfig  # noqa: E402

STEPS = 3
BATCH = 32


def make_env(sync_bn: bool) -> object:
    # augment=True and reward on every step: the augmentation, attack and probe draws are all exercised.
    reward = RewardConfig(probe_iterations=3, pre_update_probe=True)
    config = LASConfig(dataset="digits", batch_size=BATCH, epochs=1, max_steps_per_epoch=STEPS, augment=True,
                       reward_interval=1, reward=reward, sync_batchnorm=sync_bn)
    return global_view(LASEnv(config=config, data=load_dataset("digits"), tensor_api=True))


def actions(env) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    nvec = env.game.space.nvec
    return [torch.stack([torch.randint(0, n, (BATCH,), generator=g) for n in nvec], 1) for _ in range(STEPS)]


def play(env) -> dict:
    """Score (the authors' flow: other actions on a look-ahead copy) and play :data:`STEPS` steps."""
    obs, _ = env.reset(seed=3)
    record = {"obs": [obs.clone()], "infos": [], "scores": []}
    for a in actions(env):
        _, info = env.score(a.flip(0))
        record["scores"].append({k: v.clone() for k, v in info.items() if isinstance(v, torch.Tensor)})
        obs, reward, _, _, info = env.step(a)
        record["infos"].append({k: v.clone() for k, v in info.items() if isinstance(v, torch.Tensor)})
        record["obs"].append(obs.clone())
        record.setdefault("target_after_one", {k: v.clone() for k, v in env.game.target.state_dict().items()})
    record["target"] = {k: v.clone() for k, v in env.game.target.state_dict().items()}
    return record


def steps(out: Path, per_rank_bn: bool = True) -> None:
    """``rank<r>.pt``: synchronised BatchNorm; ``per-rank-bn-rank<r>.pt``: the same game with
    ``sync_batchnorm=False`` (one process group for both: a start-up less per rank)."""
    with process_group("cpu") as shard:
        torch.save(play(make_env(True)), out / f"rank{shard.rank}.pt")
        if per_rank_bn:
            torch.save(play(make_env(False)), out / f"per-rank-bn-rank{shard.rank}.pt")


def kill(out: Path) -> None:
    try:
        with process_group("cpu", timeout_s=60) as shard:
            env = make_env(True)
            env.reset(seed=3)
            if shard.rank == 1:
                os._exit(9)  # dies without a word, as a killed process does
            for a in actions(env):
                env.step(a)
    except RankLost as exc:
        (out / "rank0.txt").write_text(str(exc))
        sys.exit(3)


if __name__ == "__main__":
    torch.set_num_threads(1)
    scenario, folder = sys.argv[1], Path(sys.argv[2])
    if scenario == "steps":
        steps(folder)
    else:
        kill(folder)
