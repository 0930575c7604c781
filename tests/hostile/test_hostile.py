"""Hostile files: every one is refused with a TensorBridgeError, quickly, without running
code, reading other files or writing anything. See tests/hostile/make_hostile.py for the
files and docs/reliability.md for the counts.

    pytest tests/hostile/test_hostile.py
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

import pytest

import tensorbridge.files as tbf
from tensorbridge.errors import TensorBridgeError

from .conftest import snapshot
from .make_hostile import CASES, SECRET, SENTINEL_NAME, format_of

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent


def _read_all(path: Path) -> None:
    with tbf.open(path) as r:
        for name in r.keys():
            r.info(name)
            r.read(name)


def _sentinels(root: Path) -> list[str]:
    return [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if f == SENTINEL_NAME]


def test_enough_cases_for_every_format():
    counts = collections.Counter(format_of(n) for n in CASES)
    assert sum(counts.values()) >= 60
    assert set(counts) == {"safetensors", "npy", "npz", "pt", "h5", "sharded"}
    print(dict(counts))


@pytest.mark.timeout(10)
@pytest.mark.parametrize("name", list(CASES))
def test_hostile_file_is_refused(name, hostile_files, hostile_root):
    path = hostile_files[name]
    case_dir = hostile_root / name.replace("/", "__")
    before = snapshot(hostile_root)

    with pytest.raises(TensorBridgeError) as lazy:
        _read_all(path)
    with pytest.raises(TensorBridgeError) as eager:
        tbf.load(path)

    assert snapshot(hostile_root) == before, "reading wrote something"
    assert not _sentinels(hostile_root), "a payload ran"
    for err in (lazy.value, eager.value):
        text = "".join(traceback.format_exception(err))
        assert SECRET.decode() not in text, "another file's bytes leaked into the error"
        # the message names the file (or the shard/index inside the case directory)
        assert case_dir.name in str(err), str(err)
        assert "Fix:" in str(err), str(err)


def test_no_sentinel_anywhere(hostile_files, hostile_root):
    for path in hostile_files.values():
        with pytest.raises(TensorBridgeError):
            _read_all(path)
    assert not _sentinels(hostile_root)
    assert not os.path.exists(os.path.join(os.getcwd(), SENTINEL_NAME))


_BOUNDED = r"""
import json, resource, sys, traceback
limit = int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
import tensorbridge.files as tbf
from tensorbridge.errors import TensorBridgeError
paths = json.load(open(sys.argv[1]))
out = {}
for name, path in paths.items():
    try:
        with tbf.open(path) as r:
            for k in r.keys():
                r.read(k)
        out[name] = "accepted"
    except TensorBridgeError as e:
        out[name] = "ok"
    except BaseException as e:
        out[name] = "".join(traceback.format_exception(e))[-2000:]
print(json.dumps(out))
"""


@pytest.mark.timeout(120)
def test_all_hostile_files_under_a_2gib_address_space_limit(hostile_files, tmp_path):
    """The whole set, in one process whose address space is capped at 2 GiB: nothing
    allocates what a header merely claims, and no MemoryError or crash escapes."""
    listing = tmp_path / "paths.json"
    listing.write_text(json.dumps({k: str(v) for k, v in hostile_files.items()}))
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-c", _BOUNDED, str(listing), str(2 << 30)],
        capture_output=True,
        text=True,
        env=env,
        timeout=110,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.splitlines()[-1])
    bad = {k: v for k, v in results.items() if v != "ok"}
    assert not bad, bad
    assert len(results) == len(CASES)


def _one_per_format(hostile_files):
    picked = {}
    for name, path in hostile_files.items():
        picked.setdefault(format_of(name), path)
    return picked


@pytest.mark.timeout(120)
def test_cli_inspect_and_convert_refuse_hostile_files(hostile_files, tmp_path):
    """Through the CLI: exit status 2, a one-line error, no traceback, nothing written."""
    picks = list(_one_per_format(hostile_files).values()) + [
        hostile_files["h5/external-storage"],
        hostile_files["pt/zip-pickle-os-system"],
    ]
    for path in picks:
        for args in (["inspect", str(path)], ["convert", str(path), str(tmp_path / "out.npz")]):
            proc = subprocess.run(
                [sys.executable, "-m", "tensorbridge", *args],
                capture_output=True,
                text=True,
                timeout=60,
                cwd=tmp_path,
            )
            assert proc.returncode == 2, (args, proc.returncode, proc.stdout, proc.stderr)
            assert "Traceback" not in proc.stderr, proc.stderr
            assert SECRET.decode() not in proc.stdout + proc.stderr
    assert sorted(os.listdir(tmp_path)) == []
