"""The step record and the seams around it: a new reward term and a new training method are each
one registration (no other file edited), ``info`` carries the batch's training-set indices and
per-image ``adv_correct``, and one ``env.step`` walks through a known, short list of modules."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from agents.sb3.vecenv import LASVecEnv
from experiments.training.guard import DivergenceGuard
from experiments.training.trainer import StepMeter, _record_step
from las_env import LASEnv
from las_env.methods import METHODS, MethodLoss, TrainingMethod, register_method
from las_env.optim import training_loss
from las_env.reward import REWARD_TERMS, RewardTerm, register_reward_term


@pytest.fixture
def toy_term():
    """A reward term paying the negative of the target's loss (half weight), registered for one test."""
    term = RewardTerm("toy", weight=lambda cfg: 0.5, enabled=lambda cfg: True,
                      value=lambda cfg, adv_loss, probe: -adv_loss)
    register_reward_term(term)
    yield term
    del REWARD_TERMS["toy"]


def test_a_new_reward_term_reaches_info_reward_metrics_guard_and_sb3(digits, toy_term):
    env = LASEnv(data=digits, batch_size=8, epochs=1, max_steps_per_epoch=3, tensor_api=True)
    env.reset(seed=0)
    action = torch.zeros(env.action_space.shape, dtype=torch.long)
    _, reward, _, _, info = env.step(action)
    r = env.config.reward
    # L1 is the clamped CE of the target before the update (accuracy measure); toy = -CE.
    assert torch.all(info["toy"] <= 0)
    torch.testing.assert_close(info["toy"], -info["l1"])  # CE < 10 here: the clamp is the identity
    want = info["l1"] + r.alpha * info["l2"] + r.beta * info["l3"] + 0.5 * info["toy"]
    torch.testing.assert_close(info["rewards"], want)
    torch.testing.assert_close(reward, want.mean())

    meter = StepMeter()
    _record_step(meter, env, reward, info, {})
    logged = meter.flush()
    assert logged["reward/toy"][0] == pytest.approx(float(info["toy"].mean()), rel=1e-6)

    guard = DivergenceGuard(env.game)
    meter.add("reward/toy", torch.tensor(float("nan")))
    with pytest.raises(Exception, match=r"the reward term toy \(reward/toy\)"):
        guard.flush(meter)

    venv = LASVecEnv(LASEnv(data=digits, batch_size=4, epochs=1, max_steps_per_epoch=2))
    venv.reset()
    venv.step_async(np.zeros((4, 3), dtype=np.int64))
    _, _, _, infos = venv.step_wait()
    assert all("toy" in i and i["toy"] <= 0 for i in infos)


class _ToyMethod(TrainingMethod):
    """PGD-AT with the loss doubled: the optimiser's step is twice PGD-AT's (SGD is linear in the loss)."""

    name = "toy_double"

    def loss(self, model, batch, optim, precision) -> MethodLoss:
        logits = model(batch.x_adv).float()
        per_image = F.cross_entropy(logits, batch.y, reduction="none").detach()
        return MethodLoss(2 * training_loss(logits, batch.y, optim), per_image, logits.argmax(1) == batch.y)


def test_a_new_training_method_is_found_by_name(digits):
    register_method("toy_double", lambda cfg: _ToyMethod())
    try:
        settings = dict(data=digits, batch_size=8, epochs=1, max_steps_per_epoch=2, tensor_api=True,
                        optim={"lr": 0.05, "momentum": 0.0, "weight_decay": 0.0, "schedule": "constant"})
        envs = {name: LASEnv(method=name, **settings) for name in ("pgd_at", "toy_double")}
        moved = {}
        for name, env in envs.items():
            env.reset(seed=3)
            before = [p.detach().clone() for p in env.game.target.parameters()]
            env.step(torch.zeros(env.action_space.shape, dtype=torch.long))
            moved[name] = [p.detach() - b for p, b in zip(env.game.target.parameters(), before)]
        assert isinstance(envs["toy_double"].game.method, _ToyMethod)
        for toy, pgd in zip(moved["toy_double"], moved["pgd_at"]):
            torch.testing.assert_close(toy, 2 * pgd, rtol=1e-4, atol=1e-6)
    finally:
        del METHODS["toy_double"]


def test_info_names_each_images_training_index_and_whether_its_example_fooled_the_target(digits):
    env = LASEnv(data=digits, batch_size=16, epochs=1, max_steps_per_epoch=3, augment=False)
    obs, _ = env.reset(seed=1)
    for _ in range(2):
        idx_now = env.game._indices.cpu().numpy()
        np.testing.assert_array_equal(obs, digits.x_train[idx_now].numpy())  # no augmentation: the images themselves
        obs, _, _, _, info = env.step(np.zeros(env.action_space.shape, dtype=np.int64))
        np.testing.assert_array_equal(info["indices"], idx_now)  # the images this step trained on
        assert info["adv_correct"].dtype == bool and info["adv_correct"].shape == (16,)
        assert info["adv_accuracy"] == pytest.approx(info["adv_correct"].mean())
    _, info = env.score(np.zeros(env.action_space.shape, dtype=np.int64))
    np.testing.assert_array_equal(info["indices"], env.game._indices.cpu().numpy())


STEP_WALK = {"las_env/env.py", "las_env/game.py", "las_env/strategy_space.py", "las_env/attack.py",
             "las_env/sharding.py", "las_env/methods/base.py", "las_env/methods/pgd_at.py", "las_env/optim.py",
             "las_env/target.py", "las_env/reward.py", "las_env/step_record.py"}
"""The modules whose code one ``env.step`` runs (besides the network, ``las_env/models.py``), in the
order docs/architecture.md's "walk of one step" reads them."""


def test_one_env_step_runs_code_of_the_documented_modules_only(digits):
    env = LASEnv(data=digits, batch_size=8, epochs=1, max_steps_per_epoch=3, tensor_api=True)
    env.reset(seed=0)
    action = torch.zeros(env.action_space.shape, dtype=torch.long)
    seen: set[str] = set()

    def profile(frame, event, arg):
        name = frame.f_code.co_filename.replace("\\", "/")
        if event == "call" and "/las_env/" in name:
            seen.add("las_env/" + name.rsplit("/las_env/", 1)[1])

    sys.setprofile(profile)
    try:
        env.step(action)
    finally:
        sys.setprofile(None)
    assert seen - {"las_env/models.py"} == STEP_WALK
