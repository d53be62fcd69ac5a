"""dparallel bench: the JSON has the documented fields and its numbers are consistent with each other."""

import json

import pytest

from dparallel.cli import main


def test_bench_writes_consistent_json(tmp_path):
    args = [
        "bench",
        "recipes/tiny/bench.yaml",
        f"run_dir={tmp_path}",
        "bench.batches=[2]",
        "bench.caches=[dual,none,dual-static]",
        "bench.context=24",
        "bench.block_length=16",
        "bench.steps=4",
        "bench.reps=1",
        "bench.copy_mib=8",
        "bench.train_step=true",
        "bench.train_recipe=recipes/tiny/distill.yaml",
        "bench.train_prompt=12",
        "bench.train_gen=32",
        "bench.train_batch=2",
    ]
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 0
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["device"] == "cpu" and report["copy_bandwidth_gbs"] > 0
    assert [(r["batch"], r["cache"]) for r in report["rows"]] == [(2, "dual"), (2, "none"), (2, "dual-static")]
    for r in report["rows"]:
        assert r["nfe"] == 4 and r["tpf"] == 16 / 4  # EOS suppressed: every answer fills its block
        assert r["floor_ratio"] == pytest.approx(r["ms_per_forward"] / r["floor_ms"])
        assert r["forwards_per_s"] == pytest.approx(1e3 / r["ms_per_forward"])
        assert r["overhead_frac"] < 1.0  # not clamped at 0: noise may make it negative, and the JSON says so
        assert r["context"] == 24 and r["block"] == 16
    assert (tmp_path / "bench.md").read_text().startswith("| batch | cache |")
    step = report["train_step"]  # one LoRA certainty-forcing step of the tiny distill recipe's student
    assert (step["batch"], step["seq"], step["peak_mem_gb"]) == (2, 44, None)
    assert step["tokens_per_s"] == pytest.approx(2 * 44 / (step["step_ms"] / 1e3))
    assert 0 < step["mfu"] < 1
