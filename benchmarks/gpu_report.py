"""The GPU suite's report: the machine it ran on, the JSON saved after every part, the printed table.

Used by ``benchmarks/gpu_suite.py`` (docs/benchmarks.md, "GPU readiness suite", shows the layout).
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any, Callable, Protocol

import torch

from evaluation import format_eps


class PartLike(Protocol):
    name: str
    status: str
    reason: str
    result: dict[str, Any]

    def record(self) -> dict[str, Any]: ...


class Report:
    """The JSON report, saved after every part: a suite killed later still leaves every
    finished part on disk."""

    def __init__(self, path: Path, data: dict[str, Any]) -> None:
        self.path, self.data, self.t0 = path, data, time.monotonic()
        path.parent.mkdir(parents=True, exist_ok=True)

    def add(self, part: PartLike, where: list[str], reader: Callable[[], None]) -> None:
        """Read ``part``'s output (``reader()``) into ``data[where]``, record its status, save."""
        try:
            reader()
        except Exception as exc:  # noqa: BLE001 - a malformed output must not lose the other parts
            part.status, part.reason = "failed", f"could not read its output: {exc!r}"
        self.data["parts"][part.name] = part.record()
        section = self.data
        for key in where[:-1]:
            section = section[key]
        section[where[-1]] = part.result
        self.save()

    def save(self) -> None:
        self.data["total_seconds"] = round(time.monotonic() - self.t0, 1)
        self.path.write_text(json.dumps(self.data, indent=1) + "\n")


def machine(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {"platform": platform.platform(), "cpu": platform.processor() or platform.machine(),
                            "cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                            "device": device, "cuda_available": torch.cuda.is_available()}
    if torch.device(device).type == "cuda":
        props = torch.cuda.get_device_properties(torch.device(device))
        info.update(device_name=props.name, device_memory_gib=round(props.total_memory / 2**30, 1),
                    cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                    capability=f"{props.major}.{props.minor}", bf16_supported=torch.cuda.is_bf16_supported(),
                    # PyTorch's defaults, which the speed part keeps: "fp32" convolutions run in TF32.
                    cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
                    matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32,
                    cudnn_benchmark=torch.backends.cudnn.benchmark)
    else:
        info["device_name"] = f"CPU ({info['cpu']}, {info['cpus']} cores)"
    return info


def table(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [f"GPU suite ({report['mode']}) on {m['device_name']}, torch {m['torch']}, {report['total_seconds']}s",
             f"{'part':<14}{'status':<9}{'seconds':>8}{'budget':>8}  note"]
    for name, p in report["parts"].items():
        lines.append(f"{name:<14}{p['status']:<9}{p['seconds']:>8.1f}{p['budget_s']:>8.0f}  {p.get('reason', '')}")
    counts = report["cuda_tests"].get("counts")
    if counts:
        lines.append("cuda tests: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
        lines += [f"  {t['outcome']}: {t['test']}: {t['message'][:150]}" for t in report["cuda_tests"]["tests"]
                  if t["outcome"] in ("failed", "xfailed")]
    for key, sec in report["speed"].items():
        if "rows" not in sec:
            continue
        lines.append(f"speed/{key}: {sec['model']} target, {sec['strategy_backbone']} strategy, batch {sec['batch_size']}, "
                     f"{sec['data']}, {sec['device']}; medians of {sec['rounds']} rounds of {sec['steps_timed']} steps")
        lines.append(f"  {'setting':<20}{'variant':<9}{'s/step':>8}{'img/s':>9}{'50k epoch s':>13}  vs PGD-AT")
        for r in sec["rows"]:
            ratio = sec["ratios"].get(f"{r['setting']}/{r['variant']}_vs_pgdat")
            lines.append(f"  {r['setting']:<20}{r['variant']:<9}{r['step_s']:>8.3f}{r['images_per_s']:>9.0f}"
                         f"{r['epoch_50k_s']:>13.0f}  {'' if ratio is None else ratio}")
        by_setting: dict[str, list[str]] = {}
        for k, v in sec["setting_speedup"].items():  # "bf16_vs_fp32/las_k20": fp32 time / bf16 time
            setting, variant = k.split("_vs_", 1)[0], k.split("/", 1)[1]
            by_setting.setdefault(setting, []).append(f"{variant} {v}")
        base = sec["rows"][0]["setting"]
        lines += [f"  speed-up of {s} over {base}: " + ", ".join(v) for s, v in by_setting.items()]
    att = report["speed"].get("attack", {})
    if "ratio_vs_uniform_mean" in att:
        lines.append(f"speed/attack: per-image PGD, {att['model']}, batch {att['batch_size']}, {att['device']}: "
                     f"ours / uniform PGD at the mean count {att['ratio_vs_uniform_mean']}, "
                     f"authors' masked loop / ours {att['speedup_vs_masked_max']}")
    smoke = report["smoke"]
    if "final" in smoke:
        lines.append(f"smoke: {smoke['preset']} ({smoke['model']}, {smoke['agent']} agent), {smoke['data']}; "
                     f"threat model {smoke['threat_model']}")
        for h in smoke["history"]:
            lines.append(f"  epoch {h['epoch']}: {h['steps']} steps, {h['train_images_per_s']} img/s; "
                         f"first {h.get('test_images', '?')} test images: clean {h.get('test_clean', 0):.2%}, "
                         f"{smoke['per_epoch_attack']} {h.get('test_robust', 0):.2%}")
        lines += [f"  final, first {r['n_images']} test images: {r['label']}, eps {format_eps(r['epsilon'])}: "
                  f"{r['accuracy']:.2%} ({r['correct']}/{r['n_images']})" for r in smoke["final"]]
    return "\n".join(lines)
