"""A sharded save writes, replaces and removes files only inside the directory it locked.

A directory removed, renamed or replaced by a link while a save runs never receives that
save's files, and never loses its own: the save works through the locked directory's
descriptor, not through its path."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

import tensorbridge as tb
from tensorbridge.cli.convert_cmd import convert_file
from tensorbridge.errors import FileFormatError
from tensorbridge.formats import safetensors as stf

SHARD = 5000  # two shards of one 4000-byte tensor each


def tree(value: float, name: str = "t") -> dict[str, np.ndarray]:
    return {f"{name}{j}": np.full(1000, value + j, np.float32) for j in range(2)}


def save(tree_: dict[str, np.ndarray], directory) -> None:
    tb.save(tree_, str(directory), format="sharded", max_shard_size=SHARD)


def snapshot(directory) -> dict[str, bytes]:
    return {n: (directory / n).read_bytes() for n in sorted(os.listdir(directory))}


def same_tree(got: dict, want: dict[str, np.ndarray]) -> bool:
    return sorted(got) == sorted(want) and all(
        np.asarray(got[k]).tobytes() == want[k].tobytes() for k in want
    )


def temp_files(root) -> list[str]:
    return [os.path.join(d, f) for d, _, files in os.walk(root) for f in files if ".tb-tmp-" in f]


def before_second_shard(monkeypatch, action, method: str = "write") -> None:
    """Run ``action`` once, just before the second shard of the next save is written."""
    real = getattr(stf.SafetensorsFormat, method)
    calls: list[str] = []

    def hooked(self, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            action()
        return real(self, path, *args, **kwargs)

    monkeypatch.setattr(stf.SafetensorsFormat, method, hooked)


def test_a_save_whose_directory_is_removed_and_saved_into_again_keeps_off_the_new_one(
    tmp_path, monkeypatch
):
    """Another program removes the directory and saves its own checkpoint there (its lock
    is on the new directory, so it does not wait): the first save fails, and the second
    checkpoint keeps every file (before, the failed save's cleanup removed the shards of
    the same names, which were the other checkpoint's)."""
    x = tmp_path / "x"

    def removed_and_saved_again() -> None:
        shutil.rmtree(x)
        save(tree(50.0, "b"), x)  # (other names: another generation)

    before_second_shard(monkeypatch, removed_and_saved_again)
    with pytest.raises(FileFormatError, match="No such file"):
        save(tree(0.0), x)
    monkeypatch.undo()
    assert same_tree(tb.load(str(x)), tree(50.0, "b"))
    assert sorted(os.listdir(x)) == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
    ]
    assert temp_files(tmp_path) == []


@pytest.mark.parametrize("replacement", ["link", "directory"])
def test_a_save_whose_directory_is_renamed_away_lands_in_it_and_not_at_its_old_path(
    tmp_path, monkeypatch, replacement
):
    """The directory is renamed and its path made to name another checkpoint (a link to
    it) or a new empty directory: that one is left byte-identical, and the save completes
    in the directory it locked, under its new name, with no temporary file anywhere."""
    x, moved, other = tmp_path / "x", tmp_path / "x-moved", tmp_path / "other"
    save(tree(7.0), other)
    (other / "notes.txt").write_text("mine")
    save({"old": np.zeros(10, np.float32)}, x)
    before = snapshot(other)

    def renamed_away() -> None:
        os.rename(x, moved)
        if replacement == "link":
            os.symlink(other, x)
        else:
            os.mkdir(x)

    before_second_shard(monkeypatch, renamed_away)
    save(tree(0.0), x)
    monkeypatch.undo()
    assert snapshot(other) == before
    assert same_tree(tb.load(str(other)), tree(7.0))
    assert same_tree(tb.load(str(moved)), tree(0.0))
    if replacement == "directory":
        assert os.listdir(x) == []
    assert temp_files(tmp_path) == []


def test_a_convert_into_a_directory_replaced_by_a_link_leaves_the_linked_checkpoint(
    tmp_path, monkeypatch
):
    """The same for a parallel `convert`, whose workers fill the shards by their paths:
    those now lead elsewhere, so the convert fails; the linked checkpoint is left
    byte-identical, the renamed directory keeps its old checkpoint, and no temporary
    file is left (before, the second shard replaced the linked checkpoint's own)."""
    src = tmp_path / "src.safetensors"
    tb.save(tree(3.0), str(src))
    dst, moved, other = tmp_path / "dst", tmp_path / "dst-moved", tmp_path / "other"
    save(tree(7.0), other)
    save({"old": np.zeros(10, np.float32)}, dst)
    before, old = snapshot(other), snapshot(dst)

    def replaced_by_a_link() -> None:
        os.rename(dst, moved)
        os.symlink(other, dst)

    before_second_shard(monkeypatch, replaced_by_a_link, "placed")
    with pytest.raises(FileFormatError, match="No such file"):
        convert_file(str(src), str(dst) + "/", max_shard_size=SHARD, workers=2)
    monkeypatch.undo()
    assert snapshot(other) == before
    assert snapshot(moved) == old
    assert temp_files(tmp_path) == []


def test_a_path_through_a_link_then_dotdot_is_the_kernels_and_keeps_the_index_mode(tmp_path):
    """``lnk/../ck`` is ``ck`` beside the link's target, as the kernel resolves it, for
    every file of the save; a re-save keeps the index's mode (before, the mode was read
    from the path's lexical parent, and a 0600 index became 0644)."""
    (tmp_path / "real" / "sub").mkdir(parents=True)
    (tmp_path / "lnk").symlink_to(tmp_path / "real" / "sub")
    path = tmp_path / "lnk" / ".." / "ck"
    save(tree(1.0), path)
    index = tmp_path / "real" / "ck" / "model.safetensors.index.json"
    os.chmod(index, 0o600)
    save(tree(2.0, "u"), path)
    assert os.stat(index).st_mode & 0o777 == 0o600
    assert same_tree(tb.load(str(tmp_path / "real" / "ck")), tree(2.0, "u"))
    assert not (tmp_path / "ck").exists()


def test_an_interrupt_once_the_new_index_landed_still_removes_the_file_it_supersedes(
    tmp_path, monkeypatch
):
    """A Ctrl-C after the new index landed, as the files it supersedes are removed: the
    save is complete and kept, and an old ``model.safetensors`` (which from_pretrained
    would load before any index) is removed all the same."""
    import tensorbridge.formats.sharded as sharded_mod

    d = tmp_path / "ck"
    d.mkdir()
    tb.save(tree(0.0, "old"), str(d / "model.safetensors"))
    real_remove, calls = sharded_mod._remove_old_shards, []

    def remove_old_shards(*args):
        calls.append(args)
        if len(calls) == 1:
            raise KeyboardInterrupt  # as the removal starts
        return real_remove(*args)

    monkeypatch.setattr(sharded_mod, "_remove_old_shards", remove_old_shards)
    with pytest.raises(KeyboardInterrupt):
        save(tree(1.0), d)
    monkeypatch.undo()
    assert len(calls) == 2
    assert sorted(os.listdir(d)) == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
    ]
    assert same_tree(tb.load(str(d)), tree(1.0))


def test_leftovers_are_cleaned_only_in_the_directory_the_save_locked(tmp_path, monkeypatch):
    """A killed writer's temporary files are removed from the directory the save locked,
    not from the one its path names by then (another checkpoint's directory is not the
    save's to clean)."""
    import subprocess
    import sys

    import tensorbridge.formats.sharded as sharded_mod

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    pid = int(dead.stdout)
    x, moved, other = tmp_path / "x", tmp_path / "x-moved", tmp_path / "other"
    save(tree(7.0), other)
    save({"old": np.zeros(10, np.float32)}, x)
    theirs = other / f".model-00001-of-00002.safetensors.tb-tmp-{pid}-0badf00d"
    ours = x / f".model.safetensors.index.json.tb-tmp-{pid}-0000cafe"
    theirs.write_bytes(b"left")
    ours.write_bytes(b"left")
    real_plan, calls = sharded_mod.plan_shards, []

    def plan_shards(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:  # locked: now the path is made to name the other checkpoint
            os.rename(x, moved)
            os.symlink(other, x)
        return real_plan(*args, **kwargs)

    monkeypatch.setattr(sharded_mod, "plan_shards", plan_shards)
    save(tree(0.0), x)
    monkeypatch.undo()
    assert theirs.read_bytes() == b"left"
    assert not (moved / ours.name).exists()
    assert same_tree(tb.load(str(moved)), tree(0.0))
