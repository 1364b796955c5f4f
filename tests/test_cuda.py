"""The CUDA path, checked on a GPU (marker ``cuda``; ``benchmarks/gpu_suite.py`` runs this subset).

Without CUDA every test here is skipped, with that reason. ``LAS_AT_CUDA_TEST_DEVICE=cpu``
runs them on the CPU instead: a dry run of the test code itself, so that it cannot rot on a
machine without a GPU (CI does this in ``tests/test_gpu_suite.py``). In a dry run the
"other device" of the cross-device checks is the CPU too, and the pinned-memory check is
skipped (pinning needs CUDA).

What is compared with what, and why the tolerances:
- CUDA against CPU on the same weights, images and random starts: cuDNN's convolutions sum
  in another order than the CPU's, so logits differ in the last bits; PGD follows the SIGN of
  the gradient, so a pixel whose gradient is within rounding of 0 may step the other way.
  After ONE step that is a handful of pixels (measured on the CPU for NCHW vs channels_last,
  ResNet-18: 0.02%); each flipped pixel then changes every later gradient a little, so after
  5 steps 6% of the pixels differ, while the loss the attack reaches agrees to 4 digits. So:
  pixels are compared after one step, the attack's loss gain after several.
  TF32 is switched off for these comparisons (cuDNN's default on Ampere and later rounds
  convolution inputs to 10 mantissa bits, which would dominate).
- bf16/fp16 against fp32: the same first training step, compared by loss and by the
  direction of the weight update.
"""

from __future__ import annotations

import copy
import os
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from agents.base import AgentSpec
from evaluation import evaluate, evaluate_attack
from agents.reinforce import ReinforceAgent
from las_env.attack import per_image_pgd, random_start
from las_env.checkpoint import FORMAT, atomic_save, load_checkpoint
from las_env.data import ImageData
from las_env.env import LASEnv
from las_env.game_config import LASConfig
from las_env.game import LASGame
from las_env.datasets.registry import lookup
from las_env.models import build_model
from las_env.optim import OptimConfig
from las_env.target import TargetTrainer

DRY_RUN = os.environ.get("LAS_AT_CUDA_TEST_DEVICE", "") == "cpu"
HAS_CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if HAS_CUDA and not DRY_RUN else "cpu")
CPU = torch.device("cpu")
BATCH = 16
# The games train small_cnn on CIFAR-shaped 32x32 images on the GPU; a CPU dry run shrinks
# them to 8x8 (same grid and threat model, small_cnn pools any size), 16x less work: fp16
# convolutions are slow on a CPU.
IMAGE = 32 if DEV.type == "cuda" else 8
# Likewise ResNet-18 (the paper's target) becomes small_cnn, and AutoAttack gets fewer images at
# the digits threat model's eps 0.2, where APGD-CE breaks every image and the later components
# have nothing left to do (at eps 0.1, on the GPU, some images survive APGD-CE, so every component runs).
RESNET = "resnet18" if DEV.type == "cuda" else "small_cnn"
AA_IMAGES, AA_EPS = (8, 0.1) if DEV.type == "cuda" else (4, 0.2)

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not (HAS_CUDA or DRY_RUN),
                       reason="no CUDA: these tests check the GPU path (LAS_AT_CUDA_TEST_DEVICE=cpu dry-runs them)"),
]


@pytest.fixture(autouse=True)
def _ieee_fp32():
    """No TF32 inside these tests (see the module docstring); the previous setting is restored."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def cifar_like(n_train: int = 96, n_test: int = 16, seed: int = 0) -> ImageData:
    """Random CIFAR-10-shaped data (the CIFAR grid and threat model apply)."""
    g = torch.Generator().manual_seed(seed)
    return ImageData(
        name="cifar10",
        x_train=torch.rand(n_train, 3, IMAGE, IMAGE, generator=g),
        y_train=torch.randint(0, 10, (n_train,), generator=g),
        x_test=torch.rand(n_test, 3, IMAGE, IMAGE, generator=g),
        y_test=torch.randint(0, 10, (n_test,), generator=g),
        num_classes=10,
        class_names=[str(i) for i in range(10)],
        description="random CIFAR-10-shaped tensors",
    )


def config(**kw) -> LASConfig:
    """Two epochs of two steps (so an epoch boundary is crossed), reward every second step."""
    settings = dict(dataset="cifar10", model="small_cnn", batch_size=BATCH, epochs=2, max_steps_per_epoch=2,
                    device=str(DEV), augment=False, reward_interval=2,
                    optim=OptimConfig(lr=0.1, schedule="constant"))
    settings.update(kw)
    return LASConfig(**settings)


def random_action(game: LASGame, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    cols = [torch.randint(0, n, (game.config.batch_size,), generator=g) for n in game.space.nvec]
    return torch.stack(cols, 1).to(game.device)


def expected_batch(game: LASGame) -> tuple[torch.Tensor, torch.Tensor]:
    """What the current batch must hold: the data at the epoch order's next indices."""
    b = game.config.batch_size
    i = game.step_index % game.steps_per_epoch
    idx = game.epoch_order[i * b:(i + 1) * b]
    return game.data.x_train[idx], game.data.y_train[idx]


def flat_params(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).float().cpu() for p in model.parameters()])


# ----------------------------------------------------------------------------- the attack


def attack_gain(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, start: torch.Tensor,
                adv: torch.Tensor) -> float:
    """Mean rise of the cross-entropy from the random start to ``adv`` (model in eval mode)."""
    with torch.no_grad():
        model.eval()
        return float((F.cross_entropy(model(adv), y) - F.cross_entropy(model((x + start).clamp(0, 1)), y)).cpu())


def assert_same_attack(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, start: torch.Tensor,
                       adv: torch.Tensor, ref: torch.Tensor, one_step: bool) -> None:
    """``adv`` is ``ref`` up to rounding-level sign flips (module docstring)."""
    if one_step:
        differ = ((adv - ref).abs() > 1e-5).float().mean()
        assert differ < 0.005, f"{differ:.3%} of the pixels differ after one step"
    else:
        gain, gain_ref = attack_gain(model, x, y, start, adv), attack_gain(model, x, y, start, ref)
        assert gain_ref > 0 and abs(gain - gain_ref) <= 0.02 * gain_ref, (gain, gain_ref)


@pytest.mark.parametrize("model_name,n", [("small_cnn", 32), (RESNET, 8)])
@pytest.mark.parametrize("max_iterations", [1, 5])
def test_per_image_pgd_on_cuda_equals_cpu(model_name, n, max_iterations):
    torch.manual_seed(0)
    model = build_model(model_name, 3, 10).eval()
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)
    steps, _, eps_table = lookup("cifar10").grid.tables(CPU)
    step_size = steps[torch.randint(0, len(steps), (n,), generator=g)]
    epsilon = eps_table[torch.randint(0, len(eps_table), (n,), generator=g)]
    iterations = torch.randint(1, max_iterations + 1, (n,), generator=g)
    iterations[0] = 0  # the projected start, untouched
    start = random_start(x, epsilon, g)

    on_cpu = per_image_pgd(model, x, y, epsilon, step_size, iterations, start=start)
    model_dev = copy.deepcopy(model).to(DEV)
    on_dev = per_image_pgd(model_dev, x.to(DEV), y.to(DEV), epsilon.to(DEV), step_size.to(DEV),
                           iterations.to(DEV), start=start.to(DEV))
    assert on_dev.device.type == DEV.type
    on_dev = on_dev.cpu()

    # The threat model holds exactly on the device: each image's own ball, the pixel box.
    assert ((on_dev - x).abs().amax(dim=(1, 2, 3)) <= epsilon + 1e-6).all()
    assert on_dev.min() >= 0 and on_dev.max() <= 1
    # Zero iterations: the clipped start, identical on both devices.
    torch.testing.assert_close(on_dev[iterations == 0], on_cpu[iterations == 0], rtol=0, atol=1e-6)
    assert_same_attack(model, x, y, start, on_dev, on_cpu, one_step=max_iterations == 1)


def test_random_start_on_cuda_is_uniform_in_each_ball_and_seeded():
    x = torch.full((64, 3, 32, 32), 0.5, device=DEV)
    eps = torch.linspace(1 / 255, 16 / 255, 64, device=DEV)
    start = random_start(x, eps, torch.Generator(device=DEV).manual_seed(0))
    assert start.device.type == DEV.type
    u = (start / eps.view(-1, 1, 1, 1)).double().flatten().cpu()  # uniform on [-1, 1]: mean 0, variance 1/3
    assert u.abs().max() <= 1 + 1e-6
    se = (1 / 3 / u.numel()) ** 0.5  # standard error of the mean
    assert abs(u.mean()) < 6 * se and abs(u.var() - 1 / 3) < 0.01
    again = random_start(x, eps, torch.Generator(device=DEV).manual_seed(0))
    assert torch.equal(start, again)


# ----------------------------------------------------------------------------- data residency


def test_game_keeps_data_resident_on_the_device():
    game = LASGame(config(), cifar_like())
    game.reset(0)
    assert game.resident and game.data.x_train.device.type == DEV.type
    for step in range(game.total_steps):
        x, y = game.batch
        want_x, want_y = expected_batch(game)
        assert x.device.type == DEV.type and torch.equal(x, want_x) and torch.equal(y, want_y)
        out = game.play(random_action(game, step))
        assert out.strategy["iterations"].device.type == DEV.type and out.reward.device.type == DEV.type
        assert torch.isfinite(out.train_loss) and torch.isfinite(out.rewards).all()


def test_host_resident_data_is_pinned_and_copied_without_blocking():
    game = LASGame(config(data_on_device=False), cifar_like())
    game.reset(0)
    assert not game.resident and game.data.x_train.device.type == "cpu"
    if DEV.type == "cuda":
        assert game.data.x_train.is_pinned() and game.data.y_train.is_pinned()
    for step in range(game.total_steps):  # crosses an epoch boundary (a new host-drawn order)
        x, y = game.batch
        want_x, want_y = expected_batch(game)
        # Reading the copy back synchronises with the non-blocking transfer: the batch is complete.
        assert x.device.type == DEV.type and torch.equal(x.cpu(), want_x) and torch.equal(y.cpu(), want_y)
        out = game.play(random_action(game, step))
        assert torch.isfinite(out.train_loss)


# ----------------------------------------------------------------------------- precision


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_training_step_tracks_fp32(precision):
    torch.manual_seed(0)
    base = build_model("small_cnn", 3, 10)
    g = torch.Generator().manual_seed(2)
    x, y = torch.rand(64, 3, IMAGE, IMAGE, generator=g).to(DEV), torch.randint(0, 10, (64,), generator=g).to(DEV)
    optim = OptimConfig(lr=0.1, weight_decay=0.0, schedule="constant")  # no decay: the update is the gradient

    def one_step(p: str) -> tuple[torch.Tensor, torch.Tensor, TargetTrainer]:
        model = copy.deepcopy(base).to(DEV)
        trainer = TargetTrainer(model, optim, total_steps=4, precision=p)
        before = flat_params(model)
        result = trainer.train_step(x, y)
        return result.loss, flat_params(model) - before, trainer

    loss_ref, update_ref, _ = one_step("fp32")
    loss, update, trainer = one_step(precision)
    assert torch.isfinite(loss).all() and torch.isfinite(update).all()
    torch.testing.assert_close(loss.mean(), loss_ref.mean(), rtol=0.03, atol=0)
    assert F.cosine_similarity(update, update_ref, dim=0) > 0.95
    if precision == "fp16":
        assert trainer.scaler is not None and trainer.scaler.get_scale() > 0

    # The whole game step (attack, training, probe and reward) in this precision.
    game = LASGame(config(precision=precision), cifar_like())
    game.reset(0)
    for step in range(game.total_steps):
        out = game.play(random_action(game, step))
        assert torch.isfinite(out.train_loss) and torch.isfinite(out.rewards).all()
    assert torch.isfinite(flat_params(game.target)).all()


def test_channels_last_gives_the_same_logits_and_attack():
    torch.manual_seed(0)
    model = build_model(RESNET, 3, 10).to(DEV).eval()
    g = torch.Generator().manual_seed(3)
    x, y = torch.rand(8, 3, 32, 32, generator=g).to(DEV), torch.randint(0, 10, (8,), generator=g).to(DEV)
    model_cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(model_cl(x_cl), model(x), rtol=1e-4, atol=1e-4)
    eps, step = torch.full((8,), 8 / 255, device=DEV), torch.full((8,), 2 / 255, device=DEV)
    start = random_start(x, eps, torch.Generator(device=DEV).manual_seed(0))
    for iterations in (1, 5):
        iters = torch.full((8,), iterations, device=DEV)
        adv = per_image_pgd(model, x, y, eps, step, iters, start=start)
        adv_cl = per_image_pgd(model_cl, x_cl, y, eps, step, iters, start=start)
        assert_same_attack(model, x, y, start, adv_cl, adv, one_step=iterations == 1)

    game = LASGame(config(channels_last=True), cifar_like())
    game.reset(0)
    assert game.batch[0].is_contiguous(memory_format=torch.channels_last)
    convs = [p for p in game.target.parameters() if p.dim() == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    out = game.play(random_action(game, 0))
    assert torch.isfinite(out.train_loss)


# ----------------------------------------------------------------------------- AutoAttack


def test_autoattack_on_a_handful_of_images(digits):
    pytest.importorskip("pyautoattack", reason="pyautoattack (the official AutoAttack) is not installed")
    torch.manual_seed(0)
    model = build_model("small_cnn", digits.channels, digits.num_classes).to(DEV)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    xs, ys = digits.x_train.to(DEV), digits.y_train.to(DEV)
    g = torch.Generator(device=DEV).manual_seed(0)
    model.train()
    for _ in range(150):  # clean training: ~95% test accuracy, so the attack has images to break
        idx = torch.randint(0, xs.shape[0], (64,), generator=g, device=DEV)
        loss = F.cross_entropy(model(xs[idx]), ys[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    n = AA_IMAGES
    x, y, eps = digits.x_test[:n], digits.y_test[:n], AA_EPS
    aa = evaluate_attack(model, x, y, "autoattack", eps, batch_size=n, progress=False)
    clean, pgd20 = evaluate(model, x, y, ["clean", "pgd20"], eps, progress=False)
    assert clean.correct >= n // 2, f"the quickly trained model should classify most of its {n} images"
    assert aa.n_images == n and "pyautoattack" in aa.details["implementation"]
    assert aa.details["max_linf"] <= eps + 1e-6
    assert not (aa.robust & ~clean.robust).any()
    assert aa.correct <= pgd20.correct + 1


# ----------------------------------------------------------------------------- checkpoints


def test_checkpoint_saved_on_cuda_continues_on_cpu_and_back(tmp_path):
    game = LASGame(config(), cifar_like())
    game.reset(0)
    for step in range(2):
        game.play(random_action(game, step))
    path = atomic_save({"format": FORMAT, "target": game.target.state_dict(), "trainer": game.trainer.state_dict()},
                       tmp_path / "on_device.pt")

    ckpt = load_checkpoint(path, map_location="cpu")
    assert all(t.device.type == "cpu" for t in ckpt["target"].values())
    model = build_model("small_cnn", 3, 10)
    model.load_state_dict(ckpt["target"])
    trainer = TargetTrainer(model, game.config.optim, game.total_steps)
    trainer.load_state_dict(ckpt["trainer"])
    assert trainer.step_count == game.trainer.step_count == 2
    momentum = [s["momentum_buffer"] for s in trainer.optimizer.state.values()]
    assert momentum and all(m.device.type == "cpu" for m in momentum)

    # One more training step from that state, on each device: the same weights.
    x, y = game.batch
    game.trainer.train_step(x, y)
    trainer.train_step(x.cpu(), y.cpu())
    torch.testing.assert_close(flat_params(model), flat_params(game.target), rtol=1e-4, atol=1e-5)

    # And back: written on the CPU, read onto the device.
    back_path = atomic_save({"format": FORMAT, "target": model.state_dict(), "trainer": trainer.state_dict()},
                            tmp_path / "on_cpu.pt")
    back = load_checkpoint(back_path, map_location=DEV)
    model_dev = build_model("small_cnn", 3, 10).to(DEV)
    model_dev.load_state_dict(back["target"])
    trainer_dev = TargetTrainer(model_dev, game.config.optim, game.total_steps)
    trainer_dev.load_state_dict(back["trainer"])
    assert torch.equal(flat_params(model_dev), flat_params(model)) and trainer_dev.step_count == 3


def test_env_and_agent_state_resume_on_the_other_device(tmp_path):
    data = cifar_like()
    cfg = config(reward_interval=2)

    def env_and_agent(device: torch.device) -> tuple[LASEnv, ReinforceAgent]:
        c = replace(cfg, device=str(device))
        env = LASEnv(config=c, data=data, tensor_api=True)
        spec = AgentSpec(grid=c.grid, observation_shape=(BATCH, 3, IMAGE, IMAGE), num_classes=10, dataset="cifar10",
                         device=device, total_steps=env.game.total_steps, steps_per_epoch=env.game.steps_per_epoch,
                         reward_interval=2)
        return env, ReinforceAgent(spec, credit="per_image", backbone="small_cnn", seed=0)

    env, agent = env_and_agent(DEV)
    obs, info = env.reset(seed=0)
    for _ in range(2):
        obs, reward, _, _, info = env.step(agent.act(obs, info))
        agent.learn(reward, info)
    path = atomic_save({"format": FORMAT, "env": env.state_dict(), "agent": agent.state_dict()}, tmp_path / "c.pt")

    ckpt = load_checkpoint(path, map_location="cpu")
    env_cpu, agent_cpu = env_and_agent(CPU)
    env_cpu.reset(seed=1)
    env_cpu.load_state_dict(ckpt["env"])
    agent_cpu.load_state_dict(ckpt["agent"])
    assert env_cpu.game.step_index == 2
    assert torch.equal(flat_params(env_cpu.game.target), flat_params(env.game.target))
    obs, info = env_cpu.game.batch[0], {"reward_next_step": env_cpu.game.is_reward_step()}
    obs, reward, _, _, info = env_cpu.step(agent_cpu.act(obs, info))
    assert torch.isfinite(reward)
