"""predict.py at scale as a user runs it: a run interrupted and resumed loses no file and repeats none (also
after a real kill, in the slow tier), shards cover the inputs exactly once, and decoding on threads changes
nothing in the rows."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from tasks import predict
from tests.conftest import REPO, copy_test_crops, said

runner = CliRunner()


@pytest.fixture(scope="module")
def crops(prepared, tmp_path_factory):
    """Twelve real UTKFace test crops in a folder of their own."""
    folder = tmp_path_factory.mktemp("crops")
    copy_test_crops(prepared, folder, 12)
    return folder


@pytest.fixture(scope="module")
def reference(trained_models, crops, tmp_path_factory):
    """The rows of one uninterrupted run over the crops (gender model, no detection, decoding in turn)."""
    out = tmp_path_factory.mktemp("reference") / "all.csv"
    result = runner.invoke(predict.app, [str(trained_models["gender"]), str(crops), "--no-detect", "--out", str(out),
                                         "--workers", "0"])
    assert result.exit_code == 0, result.output
    return pd.read_csv(out).set_index("file")


def check_every_file_once(frame: pd.DataFrame, reference: pd.DataFrame) -> None:
    assert frame["file"].is_unique and set(frame["file"]) == set(reference.index)
    np.testing.assert_allclose(frame.set_index("file").loc[reference.index, "p_female"], reference["p_female"],
                               atol=1e-4)


class Killed(Exception):
    pass


def test_an_interrupted_run_resumes_without_losing_or_repeating_a_file(trained_models, crops, reference, tmp_path,
                                                                         monkeypatch):
    model, out = str(trained_models["gender"]), tmp_path / "p.csv"
    command = [model, str(crops), "--no-detect", "--out", str(out), "--chunk", "3", "--batch-size", "2"]
    real_append, calls = predict.append_rows, []

    def append_then_die(handle, frame):  # the job is killed while the third chunk is being written
        calls.append(len(frame))
        if len(calls) == 3:
            handle.write(frame.to_csv(header=False, index=False)[:40])  # half a line reaches the disk
            handle.flush()
            raise Killed
        real_append(handle, frame)

    monkeypatch.setattr(predict, "append_rows", append_then_die)
    result = runner.invoke(predict.app, command)
    assert isinstance(result.exception, Killed)
    partial = tmp_path / "p.csv.partial"
    assert not out.exists() and partial.exists()  # only a finished run is renamed to --out
    assert not partial.read_text().endswith("\n")
    monkeypatch.setattr(predict, "append_rows", real_append)

    result = runner.invoke(predict.app, command)  # forgetting --resume must not throw the rows away
    assert result.exit_code == 1 and "--resume" in said(result) and partial.exists()

    result = runner.invoke(predict.app, [*command, "--resume"])
    assert result.exit_code == 0, result.output
    # six files were written whole; the last of them is predicted again in case some of its rows were missing
    assert "Resuming: 5 file(s) already" in said(result) and "7 to go" in said(result)
    assert not partial.exists()
    check_every_file_once(pd.read_csv(out), reference)

    # more photos arrive: --resume on the finished CSV predicts only them
    extra = tmp_path / "more"
    extra.mkdir()
    for path in sorted(crops.iterdir())[:2]:
        (extra / f"copy-{path.name}").write_bytes(path.read_bytes())
    result = runner.invoke(predict.app, [model, str(crops), str(extra), "--no-detect", "--out", str(out), "--resume"])
    assert result.exit_code == 0, result.output
    assert "Wrote 2 row(s)" in said(result)
    frame = pd.read_csv(out)
    assert len(frame) == 14 and frame["file"].is_unique


def test_done_files_cuts_a_partial_line_and_the_last_photo_s_faces(tmp_path):
    columns = ["file", "age", "face"]
    partial = tmp_path / "p.csv.partial"
    partial.write_text("file,age,face\na.jpg,30.0,1\n\"b,1.jpg\",20.0,1\n\"b,1.jpg\",41.0,2\nc.jpg,5")
    assert predict.done_files(partial, columns) == {"a.jpg"}  # b's second face may have been cut off with c
    assert partial.read_text() == "file,age,face\na.jpg,30.0,1\n"

    partial.write_text("file,age,fa")  # killed while writing the header
    assert predict.done_files(partial, columns) == set() and partial.read_text() == "file,age,face\n"

    partial.write_text("file,gender\nx.jpg,male\n")
    with pytest.raises(predict.UserError, match="other columns"):
        predict.done_files(partial, columns)


def test_bad_shard_and_resume_options_end_in_one_sentence(tmp_path):
    for spec in ("0/2", "3/2", "half"):
        result = runner.invoke(predict.app, [str(tmp_path), str(tmp_path), "--shard", spec])
        assert result.exit_code == 1 and "--shard takes I/N" in said(result) and "Traceback" not in result.output
    result = runner.invoke(predict.app, [str(tmp_path), str(tmp_path), "--resume"])
    assert result.exit_code == 1 and "give --out too" in said(result)


@pytest.mark.slow  # five predict runs
def test_shards_cover_the_inputs_exactly_once(trained_models, crops, reference, tmp_path):
    model, parts = str(trained_models["gender"]), []
    for index, workers in ((1, "3"), (2, "0")):
        out = tmp_path / f"part-{index}.csv"
        result = runner.invoke(predict.app, [model, str(crops), "--no-detect", "--out", str(out), "--shard",
                                             f"{index}/2", "--workers", workers])
        assert result.exit_code == 0, result.output
        parts.append(pd.read_csv(out))
    assert all(len(part) > 0 for part in parts)
    check_every_file_once(pd.concat(parts, ignore_index=True), reference)
    # the same split again: deterministic
    again = tmp_path / "again.csv"
    assert runner.invoke(predict.app, [model, str(crops), "--no-detect", "--out", str(again),
                                       "--shard", "1/2"]).exit_code == 0
    assert pd.read_csv(again)["file"].tolist() == parts[0]["file"].tolist()

    listed = tmp_path / "files.txt"
    listed.write_text("\n".join(str(path) for path in sorted(crops.iterdir())) + "\n")
    out = tmp_path / "listed.csv"
    result = runner.invoke(predict.app, [model, "--files-from", str(listed), "--no-detect", "--out", str(out)])
    assert result.exit_code == 0, result.output
    check_every_file_once(pd.read_csv(out), reference)



@pytest.mark.slow
def test_a_killed_process_resumes_to_every_file_once(trained_models, crops, tmp_path):
    """A real job killed with SIGKILL (no clean-up at all) after some rows are on disk, then resumed."""
    folder = tmp_path / "photos"
    for copy in range(8):  # 96 photos, with face detection: several seconds of work
        (folder / f"batch{copy}").mkdir(parents=True)
        for path in crops.iterdir():
            (folder / f"batch{copy}" / path.name).write_bytes(path.read_bytes())
    out = tmp_path / "p.csv"
    command = [sys.executable, str(REPO / "tasks/predict.py"), str(trained_models["multitask"]), str(folder),
               "--out", str(out), "--chunk", "2"]
    partial = tmp_path / "p.csv.partial"
    job = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and job.poll() is None:
        if partial.exists() and partial.read_text().count("\n") > 10:
            break
        time.sleep(0.05)
    assert job.poll() is None, "the job finished before it could be killed"
    os.kill(job.pid, signal.SIGKILL)
    job.wait()
    written = pd.read_csv(partial)["file"].nunique()
    assert 0 < written < 96 and not out.exists()

    resumed = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    frame = pd.read_csv(out)
    assert set(frame["file"]) == {str(path) for path in folder.rglob("*.jpg")}
    assert not frame.duplicated(subset=["file", "face"]).any()
    assert "Resuming:" in resumed.stdout
