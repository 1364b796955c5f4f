"""Stable-Baselines3 bridge: train the attack strategy with PPO, A2C, or any SB3 on-policy
algorithm that accepts ``MultiDiscrete`` actions.

The problem
-----------
LASEnv's observation is a whole batch ``(B, C, H, W)`` and its action a 2-D ``MultiDiscrete``
``(B, 3)``. SB3 takes neither a 2-D ``MultiDiscrete`` nor a Gymnasium vector env, and its
default ``NatureCNN`` needs images of at least 36x36 (digits are 8x8, CIFAR 32x32).

The design: each image is one sub-environment, each choice a one-step episode
---------------------------------------------------------------------------
The strategy game is a contextual bandit: the strategy sees an image (the context), picks
a (step size, iterations, epsilon) triple for it, and is paid once; its choice does not
change which image comes next. So the batch maps onto an SB3 ``VecEnv`` with
``num_envs = B``: sub-environment ``i`` sees image ``i`` (``Box(0, 1, (C, H, W), float32)``)
and plays a 1-D ``MultiDiscrete(nvec)`` action; every step ends every sub-episode
(``dones`` all True, ``terminal_observation`` = the image just played), and the next
observations are the next batch. With all ``dones`` True, SB3's GAE collapses to the
bandit's advantage ``A_i = r_i - V(x_i)`` (gamma and gae_lambda play no part): the value
head is a learned per-image baseline.

Two ways to drive it:

- :class:`LASVecEnv` (SB3 drives): ``PPO(policy, LASVecEnv(env)).learn(n)`` works as is.
  The env MUST compute the reward on every step (``reward_interval=1``): SB3 stores every
  transition it sees, and on a non-reward step LASEnv pays 0, which SB3 would learn from
  as if it were a real reward. Rather than silently feeding it zeros, the constructor
  raises a ValueError for ``reward_interval != 1``.
- :class:`SB3Agent` (our training loop drives; ``python experiments/run.py agent=ppo``):
  implements :class:`agents.base.Agent`. The SB3 algorithm is built against a spec-only
  ``VecEnv`` that is never stepped; ``act`` samples actions from SB3's policy on every step,
  and ``learn`` adds a rollout-buffer step ONLY on steps that carry the real reward
  (``info["reward_computed"]``); when the buffer holds ``n_steps`` such steps, SB3's own
  ``train()`` runs (PPO's clipped objective, A2C's update, ...). So with
  ``reward_interval=k`` the policy acts on every step but learns from every k-th one, and
  never from a zero that is not a reward.

The features extractor (:class:`SmallImageExtractor`): three 3x3 convolutions (the 2nd and
3rd strided once the image is big enough), adaptive average pooling to 4x4, then a linear
layer; it fits 8x8 (1 channel), 32x32 (3 channels) and larger images alike. Our
observations are float32 in ``[0, 1]``; SB3's ``preprocess_obs`` divides by 255 only for
spaces ``is_image_space`` accepts (uint8 in ``[0, 255]``), which ours is not, so nothing is
rescaled. The policy is built with ``normalize_images=False`` anyway, so that stays true
whatever SB3's heuristic becomes.

The reward interval's cost
--------------------------
On a reward step the env pays, on top of the attack and the training step, the L2 probe
(PGD-10 on the updated target) and a clean forward pass (L3). Measured on digits
(small_cnn target, batch 64, actions uniform on the digits grid; per k, a fresh LASEnv,
one warm-up step, then 20 timed steps; the k's interleaved, median over 5 and over 7
repeats in two sessions; CPU time of the process with one torch thread, so that the other
jobs on the shared 2-core machine distort it little; wall-clock ratios agreed)::

    per-step cost relative to no reward at all (0.057-0.063 s CPU per step)
    k = 1  (reward every step)     2.87x - 3.01x
    k = 10                         1.18x - 1.25x
    k = 20                         1.07x - 1.11x

So paying the reward on every step costs about +190% per step on digits (the probe's 10
PGD iterations outweigh the 4.5 the strategy chooses on average), and with interval k about
1.9/k of a step (k=5, the demo configs: about +40%). The trade-off with SB3: ``n_steps``
reward steps fill one rollout, so an update comes every ``n_steps * k`` env steps on
``n_steps * B`` samples; a larger k is cheaper per step but gives SB3 k times fewer samples
over the same training budget. On CIFAR the probe's 10 iterations are likewise comparable
to the chosen attack's 3..14, so the relative cost of k = 1 is of the same order.

SB3's logs: after every ``train()``, ``learn`` returns SB3's logger values
(``train/policy_gradient_loss``, ``train/value_loss``, ``train/entropy_loss``,
``train/approx_kl``, ``train/learning_rate``, ...) prefixed ``sb3/``; the training loop
logs agent metrics under ``agent/``, so they reach ``metrics.json`` and W&B as
``agent/sb3/train/value_loss`` and so on. ``log_dir`` also writes them as SB3's CSV and
text logs.

Device: the policy lives on the training device and samples there; only a reward step
copies its batch, actions and rewards to the host (SB3's rollout buffer is NumPy), so the
other steps never synchronise.

Reproducibility: the policy is initialised from ``seed`` without touching the global RNG;
actions are sampled with the agent's own ``torch.Generator`` on the training device, and
SB3's minibatch shuffling (which uses NumPy's global RNG) runs under the agent's own saved
NumPy state. ``state_dict`` holds the policy, its optimiser, the partly filled rollout
buffer, the counters and both RNG states, so a resumed run continues exactly.
"""

from agents.sb3.agent import SB3Agent
from agents.sb3.algos import ALGOS, resolve_algo
from agents.sb3.extractor import SmallImageExtractor, default_policy_kwargs, per_image_spaces
from agents.sb3.vecenv import LASVecEnv, SingleImageEnv

__all__ = ["ALGOS", "LASVecEnv", "SB3Agent", "SingleImageEnv", "SmallImageExtractor", "default_policy_kwargs",
           "per_image_spaces", "resolve_algo"]
