"""The authors' label smoothing (``optim.true_class_prob``), checked against its definition.

Their factor f is the probability KEPT on the true class; the other K-1 classes share 1-f
evenly (SPEC section 8). The loss is the cross-entropy against that target distribution,
``-sum_j q_j log softmax(z)_j``, computed here from a dense q built element by element.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from experiments.config.errors import ConfigError
from las_env.lookahead import lookahead_step
from las_env.optim import OptimConfig, training_loss
from las_env.target import TargetTrainer


def authors_targets(y: torch.Tensor, k: int, f: float) -> torch.Tensor:
    """The dense target distribution of the definition: f on the true class, (1-f)/(K-1) elsewhere."""
    q = torch.empty(y.shape[0], k, dtype=torch.float64)
    for i, label in enumerate(y.tolist()):
        for j in range(k):
            q[i, j] = f if j == label else (1 - f) / (k - 1)
    return q


def loss_from_definition(logits: torch.Tensor, y: torch.Tensor, f: float) -> torch.Tensor:
    q = authors_targets(y, logits.shape[1], f)
    return -(q * torch.log_softmax(logits.double(), dim=1)).sum(1).mean()


@pytest.mark.parametrize("k", [10, 100, 200])
@pytest.mark.parametrize("f", [0.6, 0.7, 0.8])
def test_loss_equals_the_authors_formula_on_random_logits(k, f):
    g = torch.Generator().manual_seed(k * 10 + int(f * 10))
    logits = torch.randn(16, k, generator=g) * 3
    y = torch.randint(0, k, (16,), generator=g)
    ours = training_loss(logits, y, OptimConfig(true_class_prob=f))
    assert q_sums_to_one(y, k, f)
    torch.testing.assert_close(ours.double(), loss_from_definition(logits, y, f), rtol=1e-5, atol=1e-6)
    # SPEC section 8: PyTorch's equivalent is e = (1-f) K/(K-1), and e = f (the old presets) is not.
    pytorch_equivalent = F.cross_entropy(logits, y, label_smoothing=(1 - f) * k / (k - 1))
    torch.testing.assert_close(ours, pytorch_equivalent, rtol=1e-5, atol=1e-6)
    confused = F.cross_entropy(logits, y, label_smoothing=f)
    assert abs(float(confused) - float(ours)) > 1e-3


def q_sums_to_one(y: torch.Tensor, k: int, f: float) -> bool:
    return torch.allclose(authors_targets(y, k, f).sum(1), torch.ones(y.shape[0], dtype=torch.float64))


def test_factor_one_is_plain_cross_entropy_and_off_is_pytorchs_setting():
    logits, y = torch.randn(8, 10), torch.randint(0, 10, (8,))
    torch.testing.assert_close(training_loss(logits, y, OptimConfig(true_class_prob=1.0)), F.cross_entropy(logits, y))
    torch.testing.assert_close(training_loss(logits, y, OptimConfig(label_smoothing=0.2)),
                               F.cross_entropy(logits, y, label_smoothing=0.2))


def _sgd_step_on_definition(model: nn.Module, x, y, f: float, lr: float, momentum: float, wd: float) -> nn.Module:
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(ref.parameters(), lr=lr, momentum=momentum, weight_decay=wd)
    loss_from_definition(ref(x), y, f).float().backward()
    opt.step()
    return ref


def test_target_step_and_the_deepcopy_w_hat_step_both_train_on_the_authors_loss():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 10))
    x, y = torch.randn(6, 3, 2, 2), torch.randint(0, 10, (6,))
    optim = OptimConfig(lr=0.5, momentum=0.9, weight_decay=5e-4, schedule="constant", true_class_prob=0.7)
    expected = _sgd_step_on_definition(model, x, y, 0.7, 0.5, 0.9, 5e-4)

    w_hat, _ = lookahead_step(model, x, y, optim, lr=0.5)  # the authors' w_hat
    trainer = TargetTrainer(copy.deepcopy(model), optim, total_steps=10)
    trainer.train_step(x, y)  # the target's own step
    for trained in (w_hat, trainer.model):
        for p, q in zip(trained.parameters(), expected.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_both_spellings_at_once_are_rejected_naming_the_fix():
    with pytest.raises(ValueError, match=re.escape("label_smoothing=0.7 and optim.true_class_prob=0.7 are both set")):
        OptimConfig(label_smoothing=0.7, true_class_prob=0.7)
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="probability kept on the true class"):
            OptimConfig(true_class_prob=bad)


def test_contradiction_is_one_config_error_before_anything_loads(tmp_path):
    from hydra import compose, initialize_config_dir  # noqa: PLC0415

    from experiments.config.settings import settings_from_config  # noqa: PLC0415

    conf = Path(__file__).resolve().parents[1] / "experiments" / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose("config", overrides=["data.optim.label_smoothing=0.1", "data.optim.true_class_prob=0.7",
                                              "logger=none"])
    with pytest.raises(ConfigError, match="true_class_prob=0.7 label_smoothing=0"):
        settings_from_config(cfg, tmp_path)
