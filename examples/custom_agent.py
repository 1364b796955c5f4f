"""Your own attack-strategy agent, written outside the package, played two ways.

The agent: an epsilon-greedy *bandit* over the epsilon grid. It ignores the image (no
network), keeps a running mean of the per-image reward each epsilon earned, and gives every
image the epsilon with the best mean, except that each image explores a uniformly random
epsilon with probability ``explore``. Step size and iteration count stay fixed. It is a
deliberately small learner: about as simple as an agent that learns from LAS-AT's per-image
rewards can be, and a sanity baseline between ``agent=fixed`` and ``agent=reinforce``.

It implements the protocol of ``agents/base.py`` (nothing to inherit from)::

    act(observation, info) -> (B, C)     # grid indices, one per column of spec.grid.columns
    learn(reward, info) -> dict          # called after every step; info["rewards"] is (B,)
    state_dict() / load_state_dict()     # exact resume

(a) A plain Gymnasium loop, no training framework (this file's ``main``)::

    python examples/custom_agent.py --epochs 2 --steps-per-epoch 10

(b) Through the project's runner (checkpoints, evaluation, results, plots, W&B), run from the
repository root: ``run.py`` puts the repository root on ``sys.path``, so ``examples.`` imports
wherever you run it from; a module of your own elsewhere needs its folder as the current
directory or on ``PYTHONPATH``. Settings that ``agent=custom`` does not list take a ``+``;
``agent.k`` is the env's (every k-th step pays the full reward), read by the runner, not passed to
the class (the agent sees it as ``spec.reward_interval``)::

    python experiments/run.py agent=custom agent._target_=examples.custom_agent.EpsilonGreedyBandit \
        agent.name=bandit +agent.k=5 +agent.explore=0.2

``agent.name`` names the run's folder (``runs/<data>/bandit/...``), its W&B tag and its
label in ``experiments/compare.py``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

if __package__ in (None, ""):  # `python examples/custom_agent.py`: the repository's packages
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agents.base import AgentSpec  # noqa: E402
from las_env.datasets import lookup  # noqa: E402


class EpsilonGreedyBandit:
    """Epsilon-greedy choice of the attack radius, learned from per-image rewards on the steps that
    carry the full reward (every ``spec.reward_interval``-th, the env's k).

    Args:
        spec: the game (the runner builds the agent as ``EpsilonGreedyBandit(spec=..., **settings)``).
        explore: probability that an image gets a uniformly random epsilon instead of the best.
        decay: each update first multiplies the reward statistics by this factor, so the
            means track the target as it trains (1.0: plain averages over the whole run).
        step_size, iterations: the fixed rest of the attack; ``None`` takes the data set's
            PGD-AT setting (as ``agent=fixed`` does), snapped to the nearest grid value.
        seed: seed of the agent's own random generator; ``None`` takes ``spec.seed``.
    """

    def __init__(self, spec: AgentSpec, *, explore: float = 0.2, decay: float = 0.9,
                 step_size: float | None = None, iterations: int | None = None,
                 seed: int | None = None) -> None:
        if not 0.0 <= explore <= 1.0:
            raise ValueError(f"explore must be in [0, 1], got {explore}.")
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"decay must be in (0, 1], got {decay}.")
        self.explore = float(explore)
        self.decay = float(decay)
        self.device = torch.device(spec.device)
        grid = spec.grid
        pgd_at_step, pgd_at_iterations, _ = lookup(spec.dataset).fixed_attack  # the data set's PGD-AT attack
        want_step = pgd_at_step if step_size is None else float(step_size)
        want_iters = pgd_at_iterations if iterations is None else int(iterations)
        # Actions are grid indices, not values: the space finds the nearest ones by column name.
        fixed = dict(zip(("step_size", "iterations"), grid.index_of(step_size=want_step, iterations=want_iters)))
        # One row of indices for every column of the space; a further column (e.g. trades_beta)
        # is played at its first value. act() overwrites the epsilon column per image.
        self._row = torch.tensor([fixed.get(name, 0) for name in grid.columns], device=self.device)
        self._eps_column = grid.column("epsilon")
        self.epsilons = torch.tensor(grid.values["epsilon"], dtype=torch.float32, device=self.device)
        n = len(self.epsilons)

        # The bandit's whole knowledge: per epsilon ("arm"), decayed sums of rewards and counts.
        # Kept on the training device and updated with tensor ops only: act/learn never wait
        # for a GPU (no .item(), no Python branching on tensor values).
        self.reward_sums = torch.zeros(n, device=self.device)
        self.counts = torch.zeros(n, device=self.device)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(int(spec.seed if seed is None else seed))
        self._played: Tensor | None = None  # the epsilon indices of a reward step, for learn

    def means(self) -> Tensor:
        """Mean reward per epsilon; +inf for arms never tried, so each is tried first."""
        return torch.where(self.counts > 0, self.reward_sums / self.counts.clamp_min(1e-12),
                           torch.full_like(self.counts, float("inf")))

    def act(self, observation: Any, info: dict[str, Any]) -> Tensor:
        b = observation.shape[0]  # a torch tensor (runner) or a NumPy array (plain Gymnasium)
        greedy = self.means().argmax().expand(b)
        random_arm = torch.randint(len(self.epsilons), (b,), generator=self.generator, device=self.device)
        explore = torch.rand(b, generator=self.generator, device=self.device) < self.explore
        eps_idx = torch.where(explore, random_arm, greedy)
        # Remember what was played on the steps that will carry the full reward (the env says
        # so in advance: info["reward_next_step"]); the other steps' rewards are 0, not data.
        self._played = eps_idx if info.get("reward_next_step", False) else None
        action = self._row.expand(b, -1).clone()
        action[:, self._eps_column] = eps_idx
        return action

    def learn(self, reward: Any, info: dict[str, Any]) -> dict[str, Any]:
        played, self._played = self._played, None
        if not info.get("reward_computed", False) or played is None:
            return {}
        # Per-image rewards L1 + alpha*L2 + beta*L3 (shape (B,)); `reward` is only their mean.
        r = torch.as_tensor(info["rewards"], dtype=torch.float32, device=self.device)
        self.reward_sums.mul_(self.decay).index_add_(0, played, r)
        self.counts.mul_(self.decay).index_add_(0, played, torch.ones_like(r))
        # Returned metrics are logged by the runner as agent/<name> (0-d tensors are fine).
        return {"best_epsilon": self.epsilons[self.means().argmax()], "reward_mean": r.mean()}

    def state_dict(self) -> dict[str, Any]:
        return {"reward_sums": self.reward_sums.clone(), "counts": self.counts.clone(),
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reward_sums.copy_(state["reward_sums"])
        self.counts.copy_(state["counts"])
        self.generator.set_state(state["generator"].cpu())


# ----------------------------------------------------------------------------- (a) plain loop


def spec_for(env: Any, seed: int = 0) -> AgentSpec:
    """What the runner tells an agent, read off a LASEnv (``gymnasium.make`` wraps it)."""
    return AgentSpec.from_game(env.unwrapped, seed=seed)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train a digits target with the bandit in a plain Gymnasium loop; print what it learned."""
    import gymnasium

    import las_env  # noqa: F401  (registers "LAS-v0")
    from evaluation import robust_accuracy

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--steps-per-epoch", type=int, default=None, help="cap on steps per epoch (default: all)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--k", type=int, default=5, help="reward interval: the bandit learns every k steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--test-images", type=int, default=None, help="evaluate on the first n test images (default: all)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (8x8 digits: more threads only add synchronisation)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    # k is the env's; the agent reads it from its spec.
    env = gymnasium.make("LAS-v0", dataset="digits", batch_size=args.batch_size, epochs=args.epochs,
                         max_steps_per_epoch=args.steps_per_epoch, reward_interval=args.k)
    agent = EpsilonGreedyBandit(spec_for(env, args.seed))

    obs, info = env.reset(seed=args.seed)  # NumPy observations, as Gymnasium expects
    done, steps, learned, per_epoch = False, 0, 0, []
    while not done:
        action = agent.act(obs, info)
        obs, reward, done, truncated, info = env.step(action.cpu().numpy())
        metrics = agent.learn(reward, info)
        steps, learned = steps + 1, learned + bool(metrics)
        if steps % env.unwrapped.game.steps_per_epoch == 0:
            best = float(agent.epsilons[agent.means().argmax()])
            per_epoch.append(best)
            print(f"epoch {len(per_epoch)}: {steps} steps, {learned} bandit updates, best epsilon {best:.3g}, "
                  f"mean reward per epsilon {[round(float(m), 2) for m in agent.means()]}")
        done = done or truncated
    env.close()

    game = env.unwrapped.game
    threat = game.threat
    n = args.test_images or game.data.x_test.shape[0]
    result = robust_accuracy(game.target, game.data.x_test[:n], game.data.y_test[:n], threat.epsilon,
                             threat.step_size, 10)
    print(f"test accuracy on {min(n, game.data.x_test.shape[0])} images: clean {result.clean:.1%}, "
          f"PGD-10 at eps {threat.epsilon:g}: {result.robust:.1%}")
    return {"steps": steps, "updates": learned, "best_epsilon_per_epoch": per_epoch,
            "clean": result.clean, "robust": result.robust, "agent": agent}


if __name__ == "__main__":
    main()
