"""Trust what you load: no file runs code, no resume mixes data, no advice destroys data.

The fault catalogue of ``docs/failures.md``, one test (or more) per row. Every file the project
reads gets a payload that would write a marker file when unpickled; the marker must never appear
(and does appear when the same file is loaded the unsafe way: the payload is live). One tiny
finished run folder is built once (module fixture) and copied where a test needs to change it.
"""

from __future__ import annotations

import errno
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from test_faults import EVALUATE, REPO, RUN, TINY, cli, error_line, settings

from experiments.compare import main as compare_main
from experiments.comparison.ranking import compare
from experiments.config.errors import ConfigError, RunStopped
from experiments.evaluation_job.job import Settings, prepare
from experiments.training.loop import train
from experiments.runfolder.runlock import RunLock
from las_env.checkpoint import (FORMAT, CorruptCheckpointError, NotACheckpointError, load_checkpoint,
                                load_plain_state_dict)
from las_env.data import DataError
from las_env.datasets import load_dataset
from las_env.datasets.checks import check_image_size, classes_missing_from_train
from las_env.datasets.user import load_folder, load_npz
from tests.conftest import main_in_process

ONE_EPOCH = ("data.epochs=1", "data.max_steps_per_epoch=2")
DELETE_WORDS = ("delete", "remove", "rm ")


class Payload:
    """Unpickled, it runs ``touch <marker>`` (what a hostile file would do, harmlessly)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def poisoned_checkpoint(real: Path, out: Path, marker: Path) -> Path:
    """A real checkpoint with the payload tucked into its metadata."""
    ckpt = load_checkpoint(real)
    ckpt["meta"]["note"] = Payload(marker)
    torch.save(ckpt, out)
    return out


def evaluating(checkpoint: Path) -> Settings:
    """``experiments/evaluate.py checkpoint=PATH attacks=[clean]``'s settings."""
    return Settings(checkpoint=str(checkpoint), attacks=["clean"], batch_size=64, device="cpu", sanity=False,
                    fail_on_sanity=False, progress=False)


def never_advises_deleting(text: str) -> None:
    low = text.lower()
    assert not any(w in low for w in DELETE_WORDS), text


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 1-epoch run (in-process), its overrides, and a place for markers."""
    root = tmp_path_factory.mktemp("safety")
    run_dir = root / "run"
    result = train(settings(run_dir, *ONE_EPOCH))
    assert result.completed
    return run_dir, root


def copy_run(finished, name: str) -> Path:
    run_dir, root = finished
    dest = root / name
    shutil.copytree(run_dir, dest)
    return dest


# ----------------------------------------------------------------------------- safe loading


def test_the_payload_is_live_when_loaded_the_unsafe_way(finished, tmp_path):
    marker = tmp_path / "MARK"
    evil = poisoned_checkpoint(finished[0] / "checkpoint.pt", tmp_path / "evil.pt", marker)
    torch.load(evil, weights_only=False)
    assert marker.exists()  # so "the marker never appears" below means the payload was refused


def test_no_command_line_entry_runs_a_checkpoint_payload(finished, tmp_path):
    """evaluate checkpoint= (its command line), run.py resume=true and a plain re-run of a finished
    command (run.py's entry point in-process), compare.py (its main, in-process)."""
    marker = tmp_path / "MARK"
    evil = poisoned_checkpoint(finished[0] / "checkpoint.pt", tmp_path / "evil.pt", marker)
    resumed, rerun = copy_run(finished, "resumed"), copy_run(finished, "rerun")
    for folder in (resumed, rerun):
        shutil.copy(evil, folder / "checkpoint.pt")
    compared = copy_run(finished, "compared")
    torch.save({"w": Payload(marker)}, compared / "target_state_dict.pt")  # compare reads it for post-hoc rows
    (compared / "evaluation.json").write_text('{"format": "las-at/evaluation/v1", "fingerprint": {"eps": 0.2}}')
    args = [*TINY, *ONE_EPOCH]
    with ThreadPoolExecutor(max_workers=1) as pool:  # the process runs while this one works
        evaluated = pool.submit(cli, f"checkpoint={evil}", "attacks=[clean]", cwd=tmp_path, tool=EVALUATE)
        compared_rc = compare_main([str(compared), "--out", str(tmp_path / "report")])  # the command, in-process
        done = {"resume": main_in_process("run", *args, f"hydra.run.dir={resumed}", "resume=true", cwd=tmp_path),
                "re-run": main_in_process("run", *args, f"hydra.run.dir={rerun}", cwd=tmp_path)}
        done["evaluate"] = evaluated.result()
    assert not marker.exists()
    for name in ("evaluate", "resume", "re-run"):
        proc = done[name]
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, (name, proc.stderr[-2000:])
        line = error_line(proc)
        assert "is not a LAS-AT checkpoint" in line and "posix.system" in line, line
        never_advises_deleting(line)
    assert compared_rc == 0  # the run is compared, without the post-hoc rows of the refused weights file


def test_init_from_and_selection_refuse_a_payload(finished, tmp_path):
    marker = tmp_path / "MARK"
    source = copy_run(finished, "source-of-init")
    poisoned_checkpoint(finished[0] / "checkpoint.pt", source / "checkpoint.pt", marker)
    with pytest.raises(ConfigError, match="is not a LAS-AT checkpoint") as caught:
        train(settings(tmp_path / "b", *ONE_EPOCH, init_from=source))
    never_advises_deleting(str(caught.value))
    # best.pt of a run being finished (selection): refused in one paragraph, nothing run.
    from experiments.training.finish import BestWeights
    from las_env.models import build_model

    folder = copy_run(finished, "selection")
    torch.save({"state_dict": Payload(marker)}, folder / "best.pt")
    with pytest.raises(ConfigError, match="best-epoch weights") as caught:
        BestWeights("val", epoch=1, score=0.5).load_into(build_model("small_cnn", 1, 10), folder)
    assert "move best.pt out of" in str(caught.value)
    # evaluate.py state_dict= (a plain state_dict with a payload)
    with pytest.raises(ValueError, match=r"is not a plain state_dict .tensors only; its pickle names `posix.system`"):
        load_plain_state_dict(build_model("small_cnn", 1, 10), folder / "best.pt")
    assert not marker.exists()


def cifar_folder(root: Path, poisoned: str | None, marker: Path) -> Path:
    """A tiny CIFAR-10 "python version" folder; ``poisoned`` names the file that carries the payload."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (20, 3072), dtype=np.uint8), b"labels": list(range(10)) * 2,
                 b"filenames": [f"x{i}.png".encode() for i in range(20)]}
        if name == poisoned:
            batch[b"extra"] = Payload(marker)
        raw = pickle.dumps(batch, protocol=2)
        if name == "data_batch_1":  # as the official release spells numpy's array rebuilder (numpy 1)
            raw = raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
        (folder / name).write_bytes(raw)
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [f"c{i}".encode() for i in range(10)]}))
    return root


def test_the_cifar_reader_admits_arrays_and_builtins_only(tmp_path):
    marker = tmp_path / "MARK"
    good = load_dataset("cifar10", cifar_folder(tmp_path / "good", None, marker), download=False)
    assert good.x_train.shape == (100, 3, 32, 32) and good.class_names[3] == "c3"
    bad = cifar_folder(tmp_path / "bad", "data_batch_3", marker)
    with pytest.raises(DataError, match=r"data_batch_3 is not a data-set pickle.*posix\.system.*refused unread"):
        load_dataset("cifar10", bad, download=False)
    proc = main_in_process("run", *TINY, *ONE_EPOCH, "data=cifar10", f"data.root={bad}", "model.name=small_cnn",
                           f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "refused unread" in error_line(proc)
    empty = cifar_folder(tmp_path / "empty", None, marker)
    (empty / "cifar-10-batches-py" / "test_batch").write_bytes(b"")
    with pytest.raises(DataError, match="test_batch cannot be read as a data-set pickle"):
        load_dataset("cifar10", empty, download=False)
    assert not marker.exists()
    pickle.loads(pickle.dumps(Payload(marker)))  # the payload is live: the reader refused it
    assert marker.exists()


# ----------------------------------------------------------------------------- data fingerprint


def test_resume_or_init_from_on_other_data_is_refused_naming_both_fingerprints(digits, tmp_path):
    run_dir = tmp_path / "run"
    train(settings(run_dir, "data.epochs=2", "data.max_steps_per_epoch=2", stop_after_epochs=1), data=digits)
    fingerprint = load_checkpoint(run_dir)["meta"]["data_fingerprint"]
    other = digits.__class__(**{**vars(digits), "x_train": digits.x_train.flip(-1)})  # same shape, other pixels
    with pytest.raises(ConfigError) as caught:
        train(settings(run_dir, "data.epochs=2", "data.max_steps_per_epoch=2", resume=True), data=other)
    text = str(caught.value)
    assert "trained on other data" in text and fingerprint in text and f"init_from={run_dir}" in text
    assert "init_from_other_data=true" in text
    never_advises_deleting(text)
    with pytest.raises(ConfigError, match="init_from_other_data=true"):
        train(settings(tmp_path / "b", "data.epochs=2", "data.max_steps_per_epoch=2", init_from=run_dir), data=other)
    # The override the message names works; the same data resumes as before.
    assert train(settings(tmp_path / "c", "data.epochs=2", "data.max_steps_per_epoch=2", init_from=run_dir,
                          init_from_other_data=True), data=other).completed
    assert train(settings(run_dir, "data.epochs=2", "data.max_steps_per_epoch=2", resume=True), data=digits).completed


# ----------------------------------------------------------------------------- messages that never hurt


def test_a_file_that_is_not_a_checkpoint_is_called_that_and_nothing_advises_deleting_it(finished, tmp_path):
    run_dir, _ = finished
    for path in (Path("/etc/passwd"), run_dir / "results.json", run_dir / "target_state_dict.pt"):
        with pytest.raises(NotACheckpointError) as caught:
            load_checkpoint(path)
        never_advises_deleting(str(caught.value))
        with pytest.raises(ConfigError, match="is not a LAS-AT checkpoint") as caught:
            train(settings(tmp_path / "x", *ONE_EPOCH, init_from=path))
        never_advises_deleting(str(caught.value))
    with pytest.raises(NotACheckpointError):
        prepare(evaluating(run_dir / "results.json"))
    # A damaged copy outside a run folder: "copy it again", never "delete".
    cut = tmp_path / "copy.pt"
    cut.write_bytes((run_dir / "checkpoint.pt").read_bytes()[:5000])
    with pytest.raises(CorruptCheckpointError) as caught:
        load_checkpoint(cut)
    never_advises_deleting(str(caught.value))
    # Only a checkpoint the project wrote in its run folder may be named for deletion; doing so works.
    folder = copy_run(finished, "damaged")
    (folder / "checkpoint.pt").write_bytes((run_dir / "checkpoint.pt").read_bytes()[:5000])
    (folder / "checkpoint.prev.pt").unlink(missing_ok=True)
    with pytest.raises(ConfigError, match=rf"delete {folder / 'checkpoint.pt'} \(a file this project wrote\)"):
        train(settings(folder, *ONE_EPOCH, resume=True))
    (folder / "checkpoint.pt").unlink()
    assert train(settings(folder, *ONE_EPOCH, resume=True)).completed


def test_a_checkpoint_missing_keys_is_one_paragraph(finished, tmp_path):
    folder = copy_run(finished, "missing")
    ckpt = load_checkpoint(folder)
    del ckpt["loop"]
    torch.save(ckpt, folder / "checkpoint.pt")
    with pytest.raises(ConfigError, match=r"lacks \['loop'\]"):
        train(settings(folder, *ONE_EPOCH, resume=True))
    ckpt = load_checkpoint(finished[0])
    del ckpt["loop"]["rng"]
    torch.save(ckpt, folder / "checkpoint.pt")
    with pytest.raises(ConfigError, match="does not fit this run .KeyError: 'rng'"):
        train(settings(folder, *ONE_EPOCH, resume=True))
    del ckpt["meta"]["num_classes"]
    torch.save(ckpt, tmp_path / "c.pt")
    with pytest.raises(NotACheckpointError, match=r"lacks \['meta.num_classes'\]"):
        prepare(evaluating(tmp_path / "c.pt"))


def test_compare_skips_a_malformed_results_json_with_a_note_and_compares_the_rest(finished, tmp_path):
    good = copy_run(finished, "cmp/good")
    bad = copy_run(finished, "cmp/bad")
    (bad / "results.json").write_text('{"format": "las-at/results/v1", "final": [{"no name": 1}]}')
    broken = copy_run(finished, "cmp/broken")
    (broken / "results.json").write_text('{"format": "las-at/res')
    c = compare([good.parent])
    assert [r.path for r in c.runs] == [good]
    notes = " ".join(c.notes)
    assert f"{bad / 'results.json'} is malformed" in notes and f"{broken / 'results.json'} cannot be read" in notes


# ----------------------------------------------------------------------------- run-folder hygiene


@pytest.mark.parametrize("name", ["log.txt", "run.lock", "checkpoint.pt"])
def test_a_run_folder_whose_own_files_are_symlinks_is_refused_and_targets_untouched(tmp_path, name):
    target = tmp_path / "precious.txt"
    target.write_text("keep me\n")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / name).symlink_to(target)
    with pytest.raises(ConfigError, match=f"holds symlinks where the run writes its own files .{name}") as caught:
        train(settings(run_dir, *ONE_EPOCH))
    assert target.read_text() == "keep me\n"
    never_advises_deleting(str(caught.value))
    if name == "log.txt":  # the advice: move the symlink out; the run then starts
        shutil.move(run_dir / name, run_dir / f"{name}.link")
        assert train(settings(run_dir, *ONE_EPOCH)).completed and target.read_text() == "keep me\n"


def _stop_after_first_epoch_with(monkeypatch, action):
    """Run ``action`` once, after the first epoch's training and before its checkpoint."""
    from experiments.training import loop

    real = loop.evaluate_epoch

    def evaluate_then_act(*args, **kwargs):
        out = real(*args, **kwargs)
        action()
        return out

    monkeypatch.setattr(loop, "evaluate_epoch", evaluate_then_act)


def test_a_run_whose_folder_vanishes_stops_and_writes_nothing_more(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    _stop_after_first_epoch_with(monkeypatch, lambda: shutil.rmtree(run_dir))
    with pytest.raises(RunStopped, match="no longer exists while this run was training") as caught:
        train(settings(run_dir, *ONE_EPOCH))
    assert "resume=true" in str(caught.value)
    assert not run_dir.exists()  # not recreated: no lock, log or checkpoint written after


def test_a_run_whose_lock_names_another_owner_stops_and_leaves_that_lock(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    taken = {}

    def take_over():
        (run_dir / "run.lock").unlink()
        taken["lock"] = RunLock.acquire(run_dir)  # a second process's lock, as seen from the file system

    _stop_after_first_epoch_with(monkeypatch, take_over)
    with pytest.raises(RunStopped, match=f"which now names process {os.getpid()}"):
        train(settings(run_dir, *ONE_EPOCH))
    assert (run_dir / "run.lock").exists()  # the new owner's lock is left alone
    assert not (run_dir / "checkpoint.pt").exists()
    taken["lock"].release()


def test_concurrent_multiruns_keep_one_multirun_yaml_each(tmp_path):
    """Each multirun (one process) records multirun.yaml in a folder of its own under run_root
    (tests/test_run.py runs a real multirun and finds its record there)."""
    code = ("from omegaconf import OmegaConf; from experiments.runfolder.rundir import _resolve_sweep_dir; "
            f"print(_resolve_sweep_dir(_root_=OmegaConf.create({{'run_root': '{tmp_path}'}})))")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    folders = [Path(p.communicate(timeout=60)[0].strip()) for p in procs]
    assert folders[0] != folders[1] and {f.parent for f in folders} == {tmp_path / "multiruns"}
    hydra = (REPO / "experiments" / "conf" / "config.yaml").read_text()
    assert "dir: ${las_sweep_dir:}" in hydra and "subdir: ${las_run_subdir:}" in hydra


# ----------------------------------------------------------------------------- faults in one paragraph


def test_disk_full_during_a_checkpoint_keeps_the_last_good_one(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    real_save, calls = torch.save, []

    def save(obj, f, *args, **kwargs):
        calls.append(1)
        if isinstance(obj, dict) and obj.get("format") == FORMAT and obj["meta"]["epochs_done"] == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(RunStopped) as caught:
        train(settings(run_dir, "data.epochs=2", "data.max_steps_per_epoch=2"))
    text = str(caught.value)
    assert f"The disk holding {run_dir} is full" in text and "MiB free, about" in text and "MiB needed" in text
    assert f"The last good checkpoint, {run_dir / 'checkpoint.pt'}, is kept" in text and "resume" in text
    assert load_checkpoint(run_dir)["meta"]["epochs_done"] == 1
    assert not [p for p in run_dir.iterdir() if p.name.endswith(".tmp")]
    monkeypatch.undo()
    assert train(settings(run_dir, "data.epochs=2", "data.max_steps_per_epoch=2", resume=True)).completed


def test_disk_full_during_the_final_writes_keeps_the_checkpoint(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("experiments.training.finish.write_json", full)
    with pytest.raises(RunStopped, match="while writing the final results") as caught:
        train(settings(run_dir, *ONE_EPOCH))
    assert "resume" in str(caught.value)
    assert load_checkpoint(run_dir)["meta"]["epochs_done"] == 1 and not (run_dir / "results.json").exists()
    monkeypatch.undo()
    assert train(settings(run_dir, *ONE_EPOCH, resume=True)).completed and (run_dir / "results.json").is_file()


def test_ctrl_c_in_process_says_how_to_resume(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"

    def interrupt():
        raise KeyboardInterrupt

    _stop_after_first_epoch_with(monkeypatch, interrupt)
    with pytest.raises(RunStopped, match=r"Interrupted \(Ctrl-C\): no epoch had finished.*Resume with"):
        train(settings(run_dir, *ONE_EPOCH))
    assert not (run_dir / "run.lock").exists()
    monkeypatch.undo()
    assert train(settings(run_dir, *ONE_EPOCH, resume=True)).completed  # the advice


def test_a_re_run_of_a_finished_command_says_move_the_folder_aside_and_that_works(finished):
    folder = copy_run(finished, "again")
    with pytest.raises(ConfigError, match=rf"move the folder aside \(mv {folder} {folder}.old\)") as caught:
        train(settings(folder, *ONE_EPOCH))
    never_advises_deleting(str(caught.value))
    shutil.move(folder, f"{folder}.old")
    assert train(settings(folder, *ONE_EPOCH)).completed


def test_sigterm_ends_in_one_paragraph_naming_the_resume_command(tmp_path):
    run_dir = tmp_path / "run"
    args = [*TINY, "data.epochs=40", "data.max_steps_per_epoch=2", f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([*RUN, *args], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    deadline = time.time() + 120
    while not (run_dir / "checkpoint.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "Traceback" not in stderr, stderr[-2000:]
    line = error_line(type("Ran", (), {"stderr": stderr})())
    assert "Interrupted (SIGTERM): the checkpoint of the last finished epoch" in line
    assert f"hydra.run.dir={run_dir} resume=true`" in line
    done = load_checkpoint(run_dir)["meta"]["epochs_done"]
    assert 1 <= done < 40


# ----------------------------------------------------------------------------- user data


def test_user_data_is_checked_before_training(tmp_path, digits):
    x = (np.random.default_rng(0).random((40, 5, 5)) * 255).astype(np.uint8)
    y = np.arange(40) % 4
    empty = tmp_path / "empty.npz"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match=r"is empty \(0 bytes\)"):
        load_npz(empty)
    outlier = tmp_path / "outlier.npz"
    np.savez(outlier, x_train=x, y_train=np.where(np.arange(40) == 7, 10**6, y), x_test=x, y_test=y)
    with pytest.raises(DataError, match="one outlier label .here the largest is 1000000. would build a 1000001-class"):
        load_npz(outlier)
    declared = tmp_path / "declared.npz"  # classes without images are fine once declared
    np.savez(declared, x_train=x, y_train=y * 2, x_test=x, y_test=y * 2, class_names=np.array(list("abcdefgh")))
    assert load_npz(declared).num_classes == 8
    zero = tmp_path / "zero.npz"
    np.savez(zero, x_train=x[:, :0, :0], y_train=y, x_test=x[:, :0, :0], y_test=y)
    with pytest.raises(DataError, match="hold no pixels"):
        load_npz(zero)
    one = load_npz(_save(tmp_path / "one.npz", x[:, :1, :1], y))
    with pytest.raises(DataError, match=r"smaller than small_cnn \(model.name\) needs: at least 2x2 px"):
        check_image_size(one, {"model.name": "small_cnn"})
    check_image_size(one, {"model.name": "resnet18"})
    with pytest.raises(ConfigError, match="small_cnn"):
        train(settings(tmp_path / "run", *ONE_EPOCH), data=one.__class__(**{**vars(one), "name": "digits"}))
    # A train split lacking a class of the test split: a warning naming it.
    lacking = load_npz(_save(tmp_path / "lacking.npz", x, np.where(y == 3, 0, y), y_test=y))
    assert "class(es) 3, which its test split has" in classes_missing_from_train(lacking)
    assert train(settings(tmp_path / "lacking", *ONE_EPOCH), data=lacking).completed  # a warning, not an error
    assert "WARNING: npz's training split has no image of class(es) 3" in (tmp_path / "lacking" / "log.txt").read_text()
    assert classes_missing_from_train(digits) is None


def _save(path: Path, x, y, y_test=None) -> Path:
    np.savez(path, x_train=x, y_train=y, x_test=x, y_test=y if y_test is None else y_test)
    return path


def test_an_unreadable_image_file_is_named_without_advice_to_delete_it(tmp_path):
    from PIL import Image

    for split in ("train", "test"):
        for c in ("a", "b"):
            (tmp_path / split / c).mkdir(parents=True)
            Image.new("L", (4, 4)).save(tmp_path / split / c / "0.png")
    (tmp_path / "train" / "a" / "broken.png").write_bytes(b"")
    with pytest.raises(DataError, match=r"broken.png cannot be read as an image .*0 bytes") as caught:
        load_folder(tmp_path)
    never_advises_deleting(str(caught.value))
