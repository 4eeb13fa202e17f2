"""The GPU benchmark's code runs on a CPU with tiny models, so it is ready when a GPU is lent."""

import json

import pytest

from experiments import bench_gpu

pytestmark = pytest.mark.filterwarnings("ignore")


def test_the_gpu_benchmark_runs_every_mode_on_tiny_models(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench_gpu.main(["--device", "cpu", "--sizes", "tiny,tiny-roberta", "--batches", "4",
                           "--seq-len", "16", "--steps", "2", "--warmup", "1", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["size"], r["mode"]) for r in rows] == [
        (size, mode) for size in ("tiny", "tiny-roberta") for mode in bench_gpu.MODES]
    for r in rows:
        assert "error" not in r, r
        assert r["s_per_step"] > 0 and r["examples_per_s"] == pytest.approx(4 / r["s_per_step"])
    assert all(r["time_vs_nondp"] > 0 for r in rows if r["mode"] != "nondp")
