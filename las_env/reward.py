"""The strategy's reward ``L1 + alpha * L2 + beta * L3`` (the paper's J), per image.

- L1: the target's loss on the strategy's adversarial examples (before the update).
- L2: robustness of the UPDATED target ``w_hat`` under a standard probe attack.
- L3: clean performance of ``w_hat``.

Two measures: ``"loss"`` follows the slides (L1 = CE, L2 = -CE(probe), L3 = -CE(clean));
``"accuracy"`` follows the authors' code (L1 = CE clamped to [0, 10], L2 = probe
accuracy, L3 = clean accuracy), with alpha = 4 and beta = 2.

Each term is a :class:`RewardTerm` in :data:`REWARD_TERMS` (name, weight, switch, value): the
env's ``info``, the training loop's ``reward/<name>`` metrics, the divergence guard and the
several-process gather all iterate over that table, so a new term is its entry here, its
setting in :class:`RewardConfig` and its test (:func:`register_reward_term`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from las_env.attack import GradientCount, eval_mode, pgd
from las_env.optim import Precision, autocast
from las_env.sharding import Shard
from las_env.validate import SettingError, check_number, check_whole


@dataclass
class RewardConfig:
    """Settings of the reward.

    Attributes:
        alpha, beta: weights of L2 and L3 (the authors' 4 and 2).
        use_l1, use_l2, use_l3: switch each term (the Table 6 ablation). A switched-off
            L2/L3 is not computed at all.
        measure: "accuracy" (authors' code) or "loss" (slides).
        l1_clamp: upper clamp of L1 in the "accuracy" measure (the authors' 10).
        probe_iterations: PGD iterations of the L2 probe attack (PGD-10).
        probe_epsilon, probe_step_size: the probe's radius and step; ``None`` takes the data
            set's threat model (8/255 and 2/255 for CIFAR).
        w_hat: "this_step" measures L2/L3 on the target as updated by the env's own training
            step (free); "deepcopy" reproduces the authors, who train a deep copy of the
            target one extra SGD step on the same examples and measure that.
        l1_forward: which forward of the (not yet updated) target gives L1 on a reward step.
            "train" (ours): the training step's own forward, train mode, free. "eval" (the
            authors'): one extra forward in eval mode (BatchNorm running statistics), the
            mode the attack ran in. Non-reward steps always report the free one.
        l1_clamp_scope: where the "accuracy" measure's clamp to ``[0, l1_clamp]`` applies.
            "per_image" (ours): each image's CE. "batch_mean" (the authors'): the batch-mean
            CE, their R1; per image, every CE is scaled by the same factor, so the batch mean
            of L1 is exactly ``clamp(mean CE, 0, l1_clamp)`` (the scalar the paper credit
            uses) and per-image credit still sees which image was hit hardest.
        probe_restarts: random restarts of the L2 probe attack; per image the restart with
            the highest CE is kept (the worst case), as in the authors' ``attack_pgd``.
            Ours 1, the authors' 2.
        w_hat_true_class_prob: label smoothing of the look-ahead copy's step only (the authors'
            true-class probability, ``OptimConfig.true_class_prob``), whatever the target's own
            step uses; ``None`` (ours) = the target's. The authors' LAS-AWP: 0.7 on the copy,
            plain CE on the target.
        probe_early_stop: stop the probe's PGD on each image once it is misclassified (the
            authors' early-stopping PGD: ``las_env.attack``, tau = 0); False (ours) runs every
            image for ``probe_iterations`` steps.
        pre_update_probe: on reward steps, also measure ``alpha*L2 + beta*L3`` of the target
            BEFORE the step's update, on the same batch with the same probe (reported per image
            as ``batch_terms_before``): the control variate of ``credit="unbiased"``
            (``agents/credit.py``). Costs one more probe per reward step (a PGD-
            ``probe_iterations`` attack plus two forward passes on the batch). Switched on by the
            command line for an agent with ``credit=unbiased``.
        probe_fraction: the share of the batch the L2/L3 probe (and the pre-update probe)
            measures: on each reward step a fresh uniformly random subset of
            ``m = max(1, round(probe_fraction * B))`` images, the same for both probes. Each term
            of the updated target is then ``B / m`` times its value on the probed images and 0 on
            the others (inverse-probability weighting), so for every image its expectation over
            the subset equals the whole-batch value, and every batch mean stays unbiased
            (``credit="unbiased"`` included); the variance grows as the fraction falls. 1.0 (the
            default): the whole batch, no subset drawn.
    """

    alpha: float = 4.0
    beta: float = 2.0
    use_l1: bool = True
    use_l2: bool = True
    use_l3: bool = True
    measure: str = "accuracy"
    l1_clamp: float = 10.0
    probe_iterations: int = 10
    probe_epsilon: float | None = None
    probe_step_size: float | None = None
    w_hat: str = "this_step"
    l1_forward: str = "train"
    l1_clamp_scope: str = "per_image"
    probe_restarts: int = 1
    pre_update_probe: bool = False
    w_hat_true_class_prob: float | None = None
    probe_fraction: float = 1.0
    probe_early_stop: bool = False

    def __post_init__(self) -> None:
        if self.measure not in ("accuracy", "loss"):
            raise SettingError("measure", self.measure,
                               "must be 'accuracy' (the authors' code) or 'loss' (the slides).")
        if self.w_hat not in ("this_step", "deepcopy"):
            raise SettingError("w_hat", self.w_hat, "must be 'this_step' or 'deepcopy'.")
        weight = "(a weight of a reward term; NaN or inf would make every reward meaningless)"
        check_number("alpha", self.alpha, meaning=weight)
        check_number("beta", self.beta, meaning=weight)
        check_number("l1_clamp", self.l1_clamp, 0, low_open=True, meaning="(upper clamp of L1; the authors' 10)")
        check_whole("probe_iterations", self.probe_iterations, 1)
        check_number("probe_fraction", self.probe_fraction, 0, 1, low_open=True,
                     meaning="(the share of the batch the L2/L3 probe measures; 1 = the whole batch)")
        pixel = "(pixel units for images in [0, 1]; null takes the data set's threat model)"
        for key in ("probe_epsilon", "probe_step_size"):
            if getattr(self, key) is not None:
                check_number(key, getattr(self, key), 0, 1, low_open=True, meaning=pixel)
        if not (self.use_l1 or self.use_l2 or self.use_l3):
            raise ValueError("All reward terms are switched off: enable at least one of use_l1, use_l2, use_l3.")
        self._check_fidelity_switches()

    def _check_fidelity_switches(self) -> None:
        if self.l1_forward not in ("train", "eval"):
            raise ValueError(f"reward.l1_forward must be 'train' (ours) or 'eval' (the authors'), got {self.l1_forward!r}.")
        if self.l1_clamp_scope not in ("per_image", "batch_mean"):
            raise ValueError(
                f"reward.l1_clamp_scope must be 'per_image' (ours) or 'batch_mean' (the authors'), "
                f"got {self.l1_clamp_scope!r}."
            )
        if isinstance(self.probe_restarts, bool) or int(self.probe_restarts) != self.probe_restarts or self.probe_restarts < 1:
            raise ValueError(f"reward.probe_restarts must be a whole number >= 1 (ours 1, the authors' 2), got {self.probe_restarts!r}.")
        self.probe_restarts = int(self.probe_restarts)
        if self.w_hat_true_class_prob is not None:
            check_number("w_hat_true_class_prob", self.w_hat_true_class_prob, 0, 1, low_open=True,
                         meaning="(the look-ahead copy's true-class probability; the authors' LAS-AWP 0.7)")

    @property
    def needs_updated_target(self) -> bool:
        """Whether some switched-on term measures the updated target (the probe is paid for)."""
        return any(t.needs_updated_target and t.enabled(self) for t in REWARD_TERMS.values())


@dataclass
class UpdatedTargetProbe:
    """Per-image measurements of ``w_hat`` on the training batch.

    Attributes:
        clean_loss, clean_correct: CE and correctness on the clean images (None if L3 off).
        probe_loss, probe_correct: CE and correctness under the probe attack (None if L2 off).
    """

    clean_loss: Tensor | None
    clean_correct: Tensor | None
    probe_loss: Tensor | None
    probe_correct: Tensor | None


def probe_updated_target(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    cfg: RewardConfig,
    epsilon: float,
    step_size: float,
    *,
    generator: torch.Generator | None = None,
    precision: Precision = "fp32",
    shard: Shard | None = None,
    count: GradientCount | None = None,
) -> UpdatedTargetProbe:
    """Measure the updated target on the clean batch and under the probe attack (with
    ``cfg.probe_restarts`` restarts, each image keeping the one with the highest CE; ``shard``:
    this rank's rows, random starts drawn for the global batch; ``count``: the probe attacks'
    gradient computations are added to it)."""
    device = x.device
    early_stop = 0 if cfg.probe_early_stop else None
    clean_loss = clean_correct = probe_loss = probe_correct = None
    with eval_mode(model):
        if cfg.use_l2:
            with autocast(device, precision):
                x_probe = pgd(model, x, y, epsilon, step_size, cfg.probe_iterations, generator=generator,
                              shard=shard, early_stop=early_stop, count=count)
        with torch.no_grad(), autocast(device, precision):
            if cfg.use_l3:
                logits = model(x).float()
                clean_loss = F.cross_entropy(logits, y, reduction="none")
                clean_correct = logits.argmax(1) == y
            if cfg.use_l2:
                logits = model(x_probe).float()
                probe_loss = F.cross_entropy(logits, y, reduction="none")
                probe_correct = logits.argmax(1) == y
        for _ in range(1, cfg.probe_restarts if cfg.use_l2 else 1):
            with autocast(device, precision):
                x_probe = pgd(model, x, y, epsilon, step_size, cfg.probe_iterations, generator=generator,
                              shard=shard, early_stop=early_stop, count=count)
            with torch.no_grad(), autocast(device, precision):
                logits = model(x_probe).float()
            loss = F.cross_entropy(logits, y, reduction="none")
            worse = loss > probe_loss  # ties keep the earlier restart
            probe_loss = torch.where(worse, loss, probe_loss)
            probe_correct = torch.where(worse, logits.argmax(1) == y, probe_correct)
    return UpdatedTargetProbe(clean_loss, clean_correct, probe_loss, probe_correct)


@dataclass(frozen=True)
class RewardTerm:
    """One term of the reward: per image, ``weight(cfg) * value(cfg, adv_loss, probe)``.

    Attributes:
        name: the term's name: its ``info`` key, its metric ``reward/<name>``.
        weight: the term's weight in the total (L1: 1, L2: ``alpha``, L3: ``beta``).
        enabled: whether the settings switch the term on (off: zeros, not computed).
        value: the per-image value ``(B,)`` from L1's raw form ``adv_loss`` (the method's
            per-image loss before the update) and the updated target's probe.
        needs_updated_target: the value reads the probe, which only reward steps pay for;
            the term is zeros when there is none.
    """

    name: str
    weight: Callable[[RewardConfig], float]
    enabled: Callable[[RewardConfig], bool]
    value: Callable[[RewardConfig, Tensor, UpdatedTargetProbe | None], Tensor]
    needs_updated_target: bool = False


REWARD_TERMS: dict[str, RewardTerm] = {}
"""The reward's terms by name, in the order they are summed."""


def register_reward_term(term: RewardTerm) -> None:
    """Add ``term`` to the reward (``info[term.name]``, ``reward/<name>``, its share of the total)."""
    REWARD_TERMS[term.name] = term


def spread_over_batch(values: Tensor, rows: Tensor | None, zeros: Tensor) -> Tensor:
    """A probed subset's per-image values ``(m,)`` as the whole batch's ``(B,)``: ``B / m`` times
    the value on the probed ``rows``, 0 elsewhere (inverse-probability weighting: for a uniform
    random subset each image's expectation is its own value). ``rows=None``: ``values`` as they are."""
    if rows is None:
        return values
    return zeros.index_copy(0, rows, values * (zeros.shape[0] / rows.shape[0]))


def reward_terms(cfg: RewardConfig, adv_loss: Tensor, probe: UpdatedTargetProbe | None,
                 rows: Tensor | None = None) -> tuple[dict[str, Tensor], Tensor]:
    """``(terms, total)``: every term's per-image value (zeros when switched off or, for a term of
    the updated target, when ``probe`` is None) and the per-image reward, the weighted sum.

    ``adv_loss`` is the method's per-image loss of the target on the strategy's examples (L1's
    raw form). With ``probe=None`` (a step that does not pay for the full reward) only L1 is set.
    ``rows``: the images the probe measured (``reward.probe_fraction`` < 1), spread over the
    batch by :func:`spread_over_batch`; None: the whole batch.
    """
    zeros = torch.zeros_like(adv_loss)
    terms: dict[str, Tensor] = {}
    total = zeros
    for name, term in REWARD_TERMS.items():
        if not term.enabled(cfg) or (term.needs_updated_target and probe is None):
            terms[name] = zeros
        elif term.needs_updated_target:
            probed_loss = adv_loss if rows is None else adv_loss[rows]
            terms[name] = spread_over_batch(term.value(cfg, probed_loss, probe), rows, zeros)
        else:
            terms[name] = term.value(cfg, adv_loss, probe)
        total = total + term.weight(cfg) * terms[name]
    return terms, total


def updated_target_total(cfg: RewardConfig, probe: UpdatedTargetProbe, batch: int, device: torch.device,
                         rows: Tensor | None = None) -> Tensor:
    """The weighted sum of the terms that measure the updated target (``alpha*L2 + beta*L3``)
    per image ``(batch,)``: what ``credit="unbiased"`` compares before and after the update
    (``rows``: the probed images, spread as :func:`reward_terms` spreads them)."""
    zeros = torch.zeros(batch, device=device)
    probed = zeros if rows is None else zeros[rows]
    total = zeros
    for term in REWARD_TERMS.values():
        if term.needs_updated_target and term.enabled(cfg):
            total = total + term.weight(cfg) * spread_over_batch(term.value(cfg, probed, probe), rows, zeros)
    return total


def clamp_l1(adv_loss: Tensor, cfg: RewardConfig) -> Tensor:
    """The "accuracy" measure's L1: per-image CE clamped to ``[0, l1_clamp]`` ("per_image"),
    or scaled so its batch mean is ``clamp(mean CE, 0, l1_clamp)`` ("batch_mean", the
    authors' R1; CE >= 0, so the scale is ``min(1, l1_clamp / mean)``)."""
    if cfg.l1_clamp_scope == "per_image":
        return adv_loss.clamp(0, cfg.l1_clamp)
    mean = adv_loss.mean()
    return adv_loss * (mean.clamp(0, cfg.l1_clamp) / mean.clamp_min(torch.finfo(adv_loss.dtype).tiny))


def _l2(cfg: RewardConfig, adv_loss: Tensor, probe: UpdatedTargetProbe | None) -> Tensor:
    return probe.probe_correct.float() if cfg.measure == "accuracy" else -probe.probe_loss


def _l3(cfg: RewardConfig, adv_loss: Tensor, probe: UpdatedTargetProbe | None) -> Tensor:
    return probe.clean_correct.float() if cfg.measure == "accuracy" else -probe.clean_loss


register_reward_term(RewardTerm("l1", lambda cfg: 1.0, lambda cfg: cfg.use_l1,
                                lambda cfg, adv_loss, probe: clamp_l1(adv_loss, cfg) if cfg.measure == "accuracy" else adv_loss))
register_reward_term(RewardTerm("l2", lambda cfg: cfg.alpha, lambda cfg: cfg.use_l2, _l2, needs_updated_target=True))
register_reward_term(RewardTerm("l3", lambda cfg: cfg.beta, lambda cfg: cfg.use_l3, _l3, needs_updated_target=True))
