"""Fault injection: the real CLI killed (SIGKILL) or interrupted (SIGINT) half-way through
``predict --format zarr``, ``batch`` and ``finetune``, and what survives.

Each case starts ``python -m napari_medseg.cli`` in a subprocess (the user data folder and
the weights folder in ``tmp_path``), waits for an observable sign of real progress (slices
recorded in the store, a file recorded done in ``run.json``, training steps printed), signals
it, and checks what is left: finished work intact and readable, nothing half-written that
looks finished, the base checkpoint untouched, and a re-run that completes with the same
outputs as an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import napari_medseg
from napari_medseg.engine.batch.run import MANIFEST_NAME, PARTIAL_PREFIX
from napari_medseg.engine.checkpoints import resolve_weights
from napari_medseg.io import ImageMeta, read_image, write_image
from test_batch import _blobs, checkpoint  # noqa: F401 - the tiny checkpoint fixture

# Fifteen CLI starts (each imports torch): about a minute on a quiet 2-core machine. ``slow``
# only labels them; the README's test command (scripts/test.sh) runs them.
pytestmark = [pytest.mark.skipif(os.name != "posix", reason="POSIX signals"), pytest.mark.slow]

#: Settings that make every run fast and deterministic.
FAST = ("--device", "cpu", "--precision", "fp32", "--tile", "64")
#: Longest wait for a sign of progress (a loaded machine is slow to import torch).
PATIENCE = 90.0


def _env(tmp_path: Path) -> dict[str, str]:
    """The subprocess' environment: this checkout's package, a private user data folder."""
    env = dict(os.environ)
    src = str(Path(napari_medseg.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([src] + [p for p in [env.get("PYTHONPATH")] if p])
    env["NAPARI_MEDSEG_HOME"] = str(tmp_path / "home")
    env["NAPARI_MEDSEG_WEIGHTS"] = str(tmp_path / "weights")
    env["OMP_NUM_THREADS"] = "1"
    return env


def _start(tmp_path: Path, *argv) -> subprocess.Popen:
    """The CLI in a subprocess; its stderr goes to a ``stderr-<n>.txt`` file in ``tmp_path``."""
    log = tmp_path / f"stderr-{time.monotonic_ns()}.txt"
    with open(log, "wb") as fh:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen([sys.executable, "-m", "napari_medseg.cli", *map(str, argv)],
                                env=_env(tmp_path), stdout=subprocess.DEVNULL, stderr=fh)
    proc.log = log  # type: ignore[attr-defined]
    return proc


def _stderr(proc: subprocess.Popen) -> str:
    return proc.log.read_text(encoding="utf-8", errors="replace")  # type: ignore[attr-defined]


def _wait_for(proc: subprocess.Popen, ready, what: str) -> None:
    """Poll ``ready()`` until it is true; fail if the process ends or takes too long first."""
    deadline = time.monotonic() + PATIENCE
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"the process ended (rc {proc.returncode}) before {what}:\n"
                        + _stderr(proc)[-2000:])
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no {what} after {PATIENCE:.0f} s:\n" + _stderr(proc)[-2000:])
        time.sleep(0.02)


def _signal(proc: subprocess.Popen, sig: int) -> int:
    """Send ``sig`` to a process that is still running; returns its exit status."""
    assert proc.poll() is None, "the run finished before it could be interrupted"
    os.kill(proc.pid, sig)
    return proc.wait(timeout=PATIENCE)


def _run(tmp_path: Path, *argv) -> tuple[int, str]:
    proc = _start(tmp_path, *argv)
    rc = proc.wait(timeout=300)
    return rc, _stderr(proc)


def _json(path: Path) -> dict | None:
    """``path`` parsed, or None while it is absent or being replaced."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- predict into a zarr store ----------------------------------------------------------------


@pytest.fixture(scope="module")
def volume(tmp_path_factory) -> Path:
    """A 40-slice ZYX volume of blobs: a few seconds of slice-wise prediction."""
    path = tmp_path_factory.mktemp("vol") / "vol.tif"
    write_image(path, np.stack([_blobs((128, 128), 50 + i) for i in range(40)]),
                ImageMeta("ZYX", spacing=(2.0, 0.5, 0.5)))
    return path


def _store_attrs(store: Path) -> dict:
    return (_json(store / "zarr.json") or {}).get("attributes", {}).get("napari_medseg", {})


def _predict_args(volume: Path, out: Path, ckpt: Path) -> tuple:
    return ("predict", volume, "-o", out, "--weights", ckpt, "--format", "zarr",
            "--axis", "Z", "--batch-size", "1", "-q", *FAST)


@pytest.fixture(scope="module")
def predicted(tmp_path_factory, volume, checkpoint) -> np.ndarray:  # noqa: F811
    """The mask of an uninterrupted run."""
    out = tmp_path_factory.mktemp("ref")
    rc, err = _run(out, *_predict_args(volume, out, checkpoint[0]))
    assert rc == 0, err
    mask = np.asarray(read_image(out / "vol_mask.zarr")[0])
    assert 0 < mask.mean() < 1, "a constant mask would make the comparisons below weak"
    return mask


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["kill-9", "ctrl-c"])
def test_predict_to_zarr_interrupted_keeps_finished_slices_and_resumes(
        tmp_path, volume, checkpoint, predicted, sig):  # noqa: F811
    ckpt = checkpoint[0]
    out = tmp_path / "out"
    store = out / "vol_mask.zarr"
    proc = _start(tmp_path, *_predict_args(volume, out, ckpt))
    _wait_for(proc, lambda: len(_store_attrs(store).get("finished", [])) >= 2,
              "two slices recorded in the store")
    rc = _signal(proc, sig)
    if sig == signal.SIGINT:
        assert rc == 130, _stderr(proc)
        assert "cancelled; the finished slices are kept" in _stderr(proc)
    else:
        assert rc == -signal.SIGKILL

    attrs = _store_attrs(store)  # the store's record is whole JSON and says "not complete"
    finished = sorted(attrs["finished"])
    assert attrs["complete"] is False and 2 <= len(finished) < len(predicted)
    mask = np.asarray(read_image(store)[0])  # the store opens
    assert mask.shape == predicted.shape
    assert np.array_equal(mask[finished], predicted[finished])  # finished slices intact

    rc, err = _run(tmp_path, *_predict_args(volume, out, ckpt))
    assert rc == 0, err
    assert _store_attrs(store)["complete"] is True
    assert np.array_equal(np.asarray(read_image(store)[0]), predicted)


# --- batch ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def batch_input(tmp_path_factory) -> Path:
    """Ten 192x192 images: a few seconds of batch prediction, one tile per forward pass."""
    folder = tmp_path_factory.mktemp("batch_in")
    for i in range(10):
        write_image(folder / f"img{i:02d}.tif", _blobs((192, 192), 300 + i))
    return folder


def _batch_args(src: Path, out: Path, ckpt: Path) -> tuple:
    return ("batch", src, out, "--weights", ckpt, "--batch-size", "1", "-q", *FAST)


@pytest.fixture(scope="module")
def batch_reference(tmp_path_factory, batch_input, checkpoint) -> dict[str, bytes]:  # noqa: F811
    """The masks of an uninterrupted run, by output name."""
    out = tmp_path_factory.mktemp("batch_ref")
    rc, err = _run(out, *_batch_args(batch_input, out / "out", checkpoint[0]))
    assert rc == 0, err
    out = out / "out"
    return {p.name: np.asarray(read_image(p)[0]) for p in out.glob("*_mask.tif")}


def _done(out: Path) -> list[str]:
    files = (_json(out / MANIFEST_NAME) or {}).get("files", {})
    return [name for name, entry in files.items() if entry.get("status") == "done"]


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["kill-9", "ctrl-c"])
def test_batch_interrupted_keeps_finished_files_and_a_rerun_does_the_rest(
        tmp_path, batch_input, checkpoint, batch_reference, sig):  # noqa: F811
    ckpt = checkpoint[0]
    out = tmp_path / "out"
    proc = _start(tmp_path, *_batch_args(batch_input, out, ckpt))
    _wait_for(proc, lambda: len(_done(out)) >= 1, "a file recorded done in run.json")
    rc = _signal(proc, sig)
    assert rc == (130 if sig == signal.SIGINT else -signal.SIGKILL), _stderr(proc)

    manifest = json.loads((out / MANIFEST_NAME).read_text(encoding="utf-8"))  # whole JSON
    done = _done(out)
    assert 1 <= len(done) < len(batch_reference)
    if sig == signal.SIGINT:
        assert manifest["state"] == "cancelled"
    for name, entry in manifest["files"].items():
        if entry["status"] == "done":  # recorded done: complete, readable, the right mask
            mask = np.asarray(read_image(out / entry["output"])[0])
            assert np.array_equal(mask, batch_reference[entry["output"]]), name
    for path in out.iterdir():  # any other output present is whole (written by a rename)
        if path.name.endswith("_mask.tif") and not path.name.startswith(PARTIAL_PREFIX):
            assert np.array_equal(np.asarray(read_image(path)[0]),
                                  batch_reference[path.name]), path.name
    if sig == signal.SIGINT:  # a clean stop leaves no temporary file
        assert not [p for p in out.iterdir() if p.name.startswith(PARTIAL_PREFIX)]

    rc, err = _run(tmp_path, *_batch_args(batch_input, out, ckpt))
    assert rc == 0, err
    assert not [p for p in out.iterdir() if p.name.startswith(PARTIAL_PREFIX)]
    assert sorted(p.name for p in out.glob("*_mask.tif")) == sorted(batch_reference)
    for name, expected in batch_reference.items():
        assert np.array_equal(np.asarray(read_image(out / name)[0]), expected), name
    manifest = json.loads((out / MANIFEST_NAME).read_text(encoding="utf-8"))
    assert manifest["state"] == "finished"
    assert {e["status"] for e in manifest["files"].values()} <= {"done", "skipped"}
    assert len(manifest["files"]) == len(batch_reference)


# --- finetune ---------------------------------------------------------------------------------


def _make_pairs(root: Path, seed: int) -> tuple[Path, Path]:
    """Six image/mask pairs of blobs in ``root/images`` and ``root/masks``."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(6):
        image = _blobs((128, 128), seed + i)
        write_image(root / "images" / f"s{seed + i}.tif", image)
        write_image(root / "masks" / f"s{seed + i}.tif", (image > 100).astype(np.uint8))
    return root / "images", root / "masks"


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> tuple[Path, Path]:
    """Six image/mask pairs of blobs."""
    return _make_pairs(tmp_path_factory.mktemp("pairs"), 100)


def _finetune_args(pairs, base: Path, out: Path, steps: int) -> tuple:
    return ("finetune", "--weights", base, "--images", pairs[0], "--masks", pairs[1],
            "-o", out, "--steps", steps, "--patch", "64", "--batch-size", "2",
            "--device", "cpu", "--precision", "fp32")


def _steps_printed(proc) -> bool:
    return "step/s" in _stderr(proc) and " 5/" in _stderr(proc)


def _check_user_data(tmp_path: Path) -> None:
    """The user data folder's index is whole JSON, and every checkpoint it lists loads."""
    from napari_medseg.engine.training.lineage import REGISTRY_FILE, list_lineage

    home = tmp_path / "home"
    registry = home / REGISTRY_FILE
    if registry.exists():
        json.loads(registry.read_text(encoding="utf-8"))
    for entry in list_lineage(home):
        resolve_weights(str(entry.path.with_suffix(".safetensors")))


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["kill-9", "ctrl-c"])
def test_finetune_interrupted_leaves_the_base_and_no_half_written_checkpoint(
        tmp_path, pairs, checkpoint, sig):  # noqa: F811
    base = tmp_path / "base.safetensors"
    base.write_bytes(Path(checkpoint[0]).read_bytes())
    base.with_suffix(".json").write_bytes(Path(checkpoint[0]).with_suffix(".json").read_bytes())
    before = (_sha(base), _sha(base.with_suffix(".json")))
    out = tmp_path / "ft" / "tuned.safetensors"
    proc = _start(tmp_path, *_finetune_args(pairs, base, out, 5000))
    _wait_for(proc, lambda: _steps_printed(proc), "five training steps")
    rc = _signal(proc, sig)

    assert (_sha(base), _sha(base.with_suffix(".json"))) == before  # the base is untouched
    resolve_weights(str(base))
    _check_user_data(tmp_path)
    leftovers = sorted(p.name for p in out.parent.iterdir()) if out.parent.exists() else []
    if sig == signal.SIGINT:
        # Ctrl-C keeps the best weights so far and exits 130, like predict and batch.
        assert rc == 130, _stderr(proc)
        assert leftovers == ["tuned.json", "tuned.safetensors"]
        _, info = resolve_weights(str(out))  # whole and verified against its sha256
        assert info.parent == before[0]
    else:
        assert rc == -signal.SIGKILL
        # Killed while training: nothing was written that looks like a checkpoint.
        assert not [n for n in leftovers if not n.startswith(".")], leftovers

    # The re-run replaces what Ctrl-C kept only when asked to (an output is never replaced
    # silently), and the base still is never touched.
    rc, err = _run(tmp_path, *_finetune_args(pairs, base, out, 4), "--overwrite")
    assert rc == 0, err
    resolve_weights(str(out))
    assert (_sha(base), _sha(base.with_suffix(".json"))) == before
    _check_user_data(tmp_path)


def test_finetune_after_a_kill_while_keeping_samples_for_replay(tmp_path, pairs,
                                                                 checkpoint):  # noqa: F811
    """A kill inside the replay store's write leaves a hidden, empty or truncated ``.npz``
    beside the kept samples (the moment is too short to hit with a signal, so the files it
    leaves are made here); the next fine-tuning of that line still runs and replays."""
    rc, err = _run(tmp_path, *_finetune_args(pairs, checkpoint[0], tmp_path / "a.safetensors", 2))
    assert rc == 0, err
    lines = list((tmp_path / "home" / "replay").iterdir())
    assert len(lines) == 1
    kept = sorted(lines[0].glob("*.npz"))
    assert kept
    whole = kept[0].read_bytes()
    (lines[0] / ".tmpkilled1.npz").write_bytes(b"")  # killed just after mkstemp
    (lines[0] / ".tmpkilled2.npz").write_bytes(whole[: len(whole) // 2])  # during savez
    (lines[0] / "damaged.npz").write_bytes(whole[: len(whole) // 3])  # a damaged sample

    others = _make_pairs(tmp_path / "others", 200)  # new images: the kept ones are replayed
    rc, err = _run(tmp_path, *_finetune_args(others, checkpoint[0], tmp_path / "b.safetensors", 2))
    assert rc == 0, err
    assert "Traceback" not in err
    assert "Mixing in" in err  # the whole kept samples are still replayed
    resolve_weights(str(tmp_path / "b.safetensors"))
