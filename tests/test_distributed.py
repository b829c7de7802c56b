"""Distributed collection under torchrun (CPU, gloo, 2 processes) equals a single process.

Run as a script (by torchrun) this file is the worker: it collects the colour
model's activations and rank 0 saves them for the test to compare.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).parent


def _collect(images, labels, cache, chunk_size, **kw):
    from auditor.collect import build_transform, collect, state_hash
    from auditor.data import load_probe_set
    from auditor.models import Preprocessing, load_model
    from conftest import COLOUR_MODEL

    probe = load_probe_set(images, labels)
    model = load_model(COLOUR_MODEL).module
    _, tf = build_transform(Preprocessing(), normalize=False)
    return collect(model, ["act", "conv"], probe, transform=tf, transform_desc={"t": "plain"},
                   model_hash=state_hash(model), batch_size=16, chunk_size=chunk_size, device="cpu", top_k=5,
                   cache_dir=cache, progress=False, **kw)


def _save(got, path):
    arrays = {"ok": got.ok, "world": np.asarray(got.world_size)}
    for name, layer in got.layers.items():
        for field in ("values", "top_index", "top_values", "top_maps"):
            arrays[f"{name}/{field}"] = np.asarray(getattr(layer, field))
    np.savez(path, **arrays)
    Path(str(path) + ".json").write_text(json.dumps(got.cache))


def _worker(argv):
    images, labels, cache, out, chunk_size = argv
    logged = []
    got = _collect(images, labels, cache, int(chunk_size), log=logged.append)
    rank = int(os.environ["RANK"])
    if rank == 0:
        assert got is not None
        _save(got, out)
        Path(out + ".log").write_text("\n".join(logged))
    else:
        assert got is None, "ranks other than 0 return None"
        Path(f"{out}.rank{rank}").write_text("none")


def _torchrun(args, n=2, timeout=240, env=None):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n), *args]
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(HERE.parent), str(HERE), os.environ.get("PYTHONPATH", "")]), **(env or {}))
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(var, None)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=e, cwd=HERE.parent)
    return proc


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py


def test_distributed_without_cache_dir_is_a_config_error(colour_probe, monkeypatch):
    from auditor.errors import ConfigError

    monkeypatch.setenv("WORLD_SIZE", "2")
    images, labels = colour_probe
    with pytest.raises(ConfigError, match=r"distributed run \(WORLD_SIZE=2\) needs a cache folder.*--cache-dir"):
        _collect(images, labels, None, 64)


def test_distributed_false_ignores_the_environment(colour_probe, monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    images, labels = colour_probe
    got = _collect(images, labels, tmp_path, 64, distributed=False)
    assert got.world_size == 1


def test_shard_is_round_robin():
    from auditor.distributed import Dist

    items = list(range(7))
    shards = [Dist(rank=r, world=3, local_rank=r, created=False).shard(items) for r in range(3)]
    assert shards == [[0, 3, 6], [1, 4], [2, 5]]
    assert sorted(sum(shards, [])) == items


@pytest.mark.slow
def test_torchrun_two_processes_equal_one(colour_probe, tmp_path):
    images, labels = colour_probe
    single = _collect(images, labels, tmp_path / "single", 32)  # 5 chunks: ranks get 3 and 2
    out = str(tmp_path / "dist.npz")
    args = [str(HERE / "test_distributed.py"), str(images), str(labels), str(tmp_path / "dist"), out, "32"]
    proc = _torchrun(args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert Path(out + ".rank1").read_text() == "none"
    cache = json.loads(Path(out + ".json").read_text())
    assert cache["status"] == "miss" and cache["key"] == single.cache["key"]  # same key as one process
    assert "across 2 ranks" in Path(out + ".log").read_text()
    with np.load(out) as got:
        assert int(got["world"]) == 2
        assert np.array_equal(got["ok"], single.ok)
        for name, layer in single.layers.items():
            for field in ("values", "top_index", "top_values", "top_maps"):
                assert np.array_equal(got[f"{name}/{field}"], getattr(layer, field)), (name, field)
    key_dir = tmp_path / "dist" / cache["key"]
    assert not list(key_dir.glob("chunk-*")), "rank 0 folds the chunks into the final arrays"
    # again: a hit, decided by rank 0 for every rank
    proc = _torchrun(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(Path(out + ".json").read_text())["status"] == "hit"
    # the single-process cache is a hit for the same inputs, whatever wrote it
    single_cache = tmp_path / "single"
    again = _collect(images, labels, single_cache, 32)
    assert again.cache["status"] == "hit"


@pytest.mark.slow
def test_torchrun_resumes_a_partial_cache(colour_probe, tmp_path):
    """Chunks left by an interrupted single-process run are reused by a distributed run."""
    from auditor.collect import build_transform, collect, state_hash
    from auditor.data import load_probe_set
    from auditor.models import Preprocessing, load_model
    from conftest import COLOUR_MODEL

    images, labels = colour_probe
    reference = _collect(images, labels, None, 32)
    # an interrupted run: two chunks committed, then Ctrl-C
    model = load_model(COLOUR_MODEL).module
    calls = {"n": 0}

    def bomb(_m, _i, _o):
        calls["n"] += 1
        if calls["n"] == 2 + 5:  # after the 2 calibration passes: in the third chunk
            raise KeyboardInterrupt

    model.conv.register_forward_hook(bomb)
    _, tf = build_transform(Preprocessing(), normalize=False)
    with pytest.raises(KeyboardInterrupt):
        collect(model, ["act", "conv"], load_probe_set(images, labels), transform=tf,
                transform_desc={"t": "plain"}, model_hash=state_hash(load_model(COLOUR_MODEL).module),
                batch_size=16, chunk_size=32, device="cpu", top_k=5, cache_dir=tmp_path / "c", progress=False)
    assert len(list((tmp_path / "c").glob("*/chunk-*.npz"))) == 2
    out = str(tmp_path / "dist.npz")
    proc = _torchrun([str(HERE / "test_distributed.py"), str(images), str(labels), str(tmp_path / "c"), out, "32"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    cache = json.loads(Path(out + ".json").read_text())
    assert cache["status"] == "partial" and cache["reused"] == 2
    with np.load(out) as got:
        assert np.array_equal(got["act/values"], reference.layers["act"].values)
        assert np.array_equal(got["conv/top_maps"], reference.layers["conv"].top_maps)


@pytest.mark.slow
def test_torchrun_cli_run_equals_single_process(colour_args, tmp_path):
    """`auditor run` under torchrun: rank 0 writes the report, rank 1 exits 0; same findings."""
    single_out = tmp_path / "single-out"
    args = [a if a != str(tmp_path / "out") else str(single_out) for a in colour_args]
    args += ["--formats", "json", "--no-fail-on-flag", "--quiet"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(HERE.parent))
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(var, None)
    one = subprocess.run([sys.executable, "-m", "auditor.cli", "run", *args], capture_output=True, text=True,
                         env=env, cwd=HERE.parent, timeout=240)
    assert one.returncode == 0, one.stderr[-3000:]
    dist_out = tmp_path / "dist-out"
    dargs = [a if a != str(single_out) else str(dist_out) for a in args]
    dargs = [a if a != str(tmp_path / "cache") else str(tmp_path / "dist-cache") for a in dargs]
    proc = _torchrun(["-m", "auditor.cli", "run", *dargs])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    a = json.loads((single_out / "results.json").read_text())
    b = json.loads((dist_out / "results.json").read_text())
    assert a["layers"] == b["layers"]
    assert a["concepts"] == b["concepts"] and a["warnings"] == b["warnings"]
    assert b["provenance"]["cache"]["status"] == "miss"


if __name__ == "__main__":
    _worker(sys.argv[1:])
