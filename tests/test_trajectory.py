"""The trajectory pipeline: state_at, record -> shards + manifest, resume, errors, features, sources, torchrun.

Regenerate the golden fixture (after a schema change) with: .venv/bin/python tests/test_trajectory.py
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_one_line_error, run_cli, run_dparallel, tiny_shape
from omegaconf import OmegaConf

from dparallel.commands.recipe import load_recipe
from dparallel.core.errors import DParallelError
from dparallel.data import trajectory as T
from dparallel.data.config import SourceConfig
from dparallel.data.record import record
from dparallel.data.sources import build_checker, load_items

FIXTURE = Path(__file__).parent / "fixtures" / "trajectories-tiny"
SHAPE = tiny_shape(hidden=32, layers=1)


pytestmark = pytest.mark.usefixtures("one_thread")


def make_model(folder: Path) -> Path:
    from dparallel.adapters.folder import save_model_folder
    from dparallel.adapters.tiny import new_tiny_adapter

    save_model_folder(new_tiny_adapter(OmegaConf.create(SHAPE), seed=0), folder, dtype="float32")
    return folder


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_model(tmp_path_factory.mktemp("teacher") / "tiny")


def overrides(model: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        f"run_dir={run_dir}",
        f"model.path={model}",
        "decode.gen_length=16",
        "decode.block_length=8",
        "record.source.suite.n_per_task=2",
        "record.source.suite.tasks=[copy,reverse,sum,chain]",
        "record.shard_size=3",
        "record.batch_size=2",
        *extra,
    ]


def recipe(model: Path, run_dir: Path, *extra: str):
    return load_recipe("recipes/tiny/record.yaml", overrides(model, run_dir, *extra))


def rows(path: Path) -> list[dict]:
    return [json.loads(json.dumps(r)) for r in T.read_trajectories(path)]


def test_state_at_round_trip():
    rng = np.random.default_rng(0)
    tokens = rng.integers(5, 50, size=(3, 16)).astype(np.int32)
    order = np.stack([rng.permutation(16) // 2 for _ in range(3)]).astype(np.int32)  # two commits per step
    mask = 1
    assert (T.state_at(tokens, order, 0, mask) == mask).all()
    assert (T.state_at(tokens, order, 8, mask) == tokens).all()
    for s in range(8):
        before, after = T.state_at(tokens, order, s, mask), T.state_at(tokens, order, s + 1, mask)
        revealed = (before == mask) & (after != mask)
        assert (revealed == (order == s)).all() and (after[revealed] == tokens[revealed]).all()
    per_row = T.state_at(torch.from_numpy(tokens), torch.from_numpy(order), torch.tensor([[0], [4], [8]]), mask)
    assert per_row.tolist() == [T.state_at(tokens[i], order[i], s, mask).tolist() for i, s in enumerate((0, 4, 8))]


def test_golden_fixture_round_trip(tmp_path):
    manifest = T.read_manifest(FIXTURE)
    assert manifest["schema_version"] == T.SCHEMA_VERSION  # a schema change must regenerate the fixture
    ds = T.load_trajectories(FIXTURE)
    assert len(ds) == manifest["counts"]["records"] == sum(s["records"] for s in manifest["shards"])
    records = list(ds)
    for r in records:
        T.validate_record(r)
        final = T.state_at(np.asarray(r["tokens"]), np.asarray(r["order"]), r["steps"], manifest["ids"]["mask"])
        assert final.tolist() == r["tokens"]
    # write the records again as shards of a new folder: they read back identical
    for i, entry in enumerate(manifest["shards"]):
        part = list(T.load_shard(FIXTURE / entry["name"]))
        T.write_shard(tmp_path, i, part, "pred" in ds.column_names, {"config_hash": "x", "prompts": len(part)})
    shards = [
        {"name": T.shard_name(i), "sha256": json.loads(T.sidecar_path(tmp_path, i).read_text())["sha256"]}
        for i in range(len(manifest["shards"]))
    ]
    T.write_manifest(tmp_path, {"counts": {"records": len(records)}, "shards": shards})
    assert rows(tmp_path) == json.loads(json.dumps(records))


# ---- recording -------------------------------------------------------------------------------------------------


def test_record_manifest_counts_match_shards(model, tmp_path):
    from dparallel.engine.pipeline import load

    out = record(recipe(model, tmp_path))
    manifest = T.read_manifest(out)
    shards = [T.load_shard(out / s["name"]) for s in manifest["shards"]]
    assert manifest["counts"]["records"] == sum(len(s) for s in shards) == len(T.load_trajectories(out))
    assert manifest["counts"]["prompts"] == 8 and len(shards) == 3 and manifest["counts"]["checked"] == 8
    assert manifest["decode"]["gen_length"] == 16 and manifest["teacher"]["family"] == "tiny"
    records = rows(out)
    for r in records:
        T.validate_record(r)
        assert len(r["tokens"]) == 16 and set(r["meta"]) >= {"source", "id", "answer", "correct"}
    # the records are what the engine decodes for these prompts
    gen = load(str(model), device="cpu")
    outs = gen.generate([r["meta"]["prompt"] for r in records[:2]], gen_length=16, block_length=8)
    assert [o.tokens for o in outs] == [r["tokens"] for r in records[:2]]
    assert [o.order for o in outs] == [r["order"] for r in records[:2]]
    assert (out.parent / "config.yaml").is_file()


def test_resume_skips_finished_shards_and_matches_an_uninterrupted_run(model, tmp_path):
    whole = record(recipe(model, tmp_path / "whole"))
    part = recipe(model, tmp_path / "part", "record.max_shards=1")
    out = record(part)
    assert not (out / T.MANIFEST).exists() and T.sidecar_path(out, 0).is_file()
    assert not T.sidecar_path(out, 1).exists()
    first = out / "shard-00000"
    stamp = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in first.iterdir()}
    # a kill in the middle of shard 1: a half-written temp folder and a shard folder without its sidecar
    (out / ".shard-00001.abc.tmp").mkdir()
    (out / "shard-00001").mkdir()
    (out / "shard-00001" / "junk").write_text("half written")
    record(recipe(model, tmp_path / "part"))
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in first.iterdir()} == stamp
    assert not list(out.glob(".shard-*")) and not (out / "shard-00001" / "junk").exists()
    assert rows(out) == rows(whole)
    assert T.read_manifest(out)["config_hash"] == T.read_manifest(whole)["config_hash"]
    assert "entropy_budget" not in T.read_manifest(whole)["decode"]  # a later option, unset: earlier hashes hold
    (out / T.MANIFEST).unlink()  # resuming into shards of another recipe is refused before any weights load
    with pytest.raises(DParallelError, match="shard-00000 was recorded with another recipe"):
        record(recipe(model, tmp_path / "part", "decode.remasking=random"))
    with pytest.raises(DParallelError, match="shard-00000 was recorded with another recipe"):
        record(recipe(model, tmp_path / "part", "decode.rule=marginal", "decode.entropy_budget=0.5"))


def test_batched_features_shapes(model, tmp_path):
    batched = record(recipe(model, tmp_path / "b", "record.features=true", "record.batch_size=3"))
    alone = record(recipe(model, tmp_path / "a", "record.features=true", "record.batch_size=1"))
    ds = T.load_trajectories(batched)
    stored = ds.with_format("arrow")[:1].schema  # the numpy formatter upcasts; the stored types are exact
    assert str(stored.field("pred").type) == "list<item: list<item: int32>>"
    assert str(stored.field("conf").type) == "list<item: list<item: halffloat>>"
    mask = T.read_manifest(batched)["ids"]["mask"]
    for r, a in zip(ds.with_format("numpy"), T.load_trajectories(alone).with_format("numpy")):
        steps = int(r["steps"])
        pred, conf = np.stack(r["pred"]), np.stack(r["conf"])
        entropy, margin = np.stack(r["entropy"]).astype(np.float32), np.stack(r["margin"]).astype(np.float32)
        assert pred.shape == conf.shape == entropy.shape == margin.shape == (steps, 16)
        assert ((conf >= 0) & (conf <= 1)).all()
        # p1 - p2 <= p1 and 0 <= H <= log V
        covered = conf > 0
        assert (margin <= conf.astype(np.float32) + 1e-3).all() and (entropy[covered] >= -1e-3).all()
        assert (entropy <= np.log(100) + 1e-2).all()
        assert np.allclose(entropy, np.stack(a["entropy"]).astype(np.float32), atol=2e-2)  # batched == alone
        for s in range(steps):  # pred at step s is the argmax on x_s: what topk commits at that step
            now = r["order"] == s
            assert now.any() and (pred[s][now] == r["tokens"][now]).all()
            assert (T.state_at(r["tokens"], r["order"], s, mask)[now] == mask).all()
        assert (r["tokens"] == a["tokens"]).all() and (r["order"] == a["order"]).all()
        assert (pred == np.stack(a["pred"])).all()
        assert np.allclose(conf.astype(np.float32), np.stack(a["conf"]).astype(np.float32), atol=2e-3)


# ---- sources ---------------------------------------------------------------------------------------------------


def write_sources(folder: Path, rows_: list[dict]) -> dict[str, Path]:
    import csv

    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    paths = {"jsonl": folder / "p.jsonl", "csv": folder / "p.csv", "parquet": folder / "p.parquet", "hf": folder / "hf"}
    paths["jsonl"].write_text("".join(json.dumps(r) + "\n" for r in rows_))
    with open(paths["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows_[0]))
        w.writeheader()
        w.writerows(rows_)
    pq.write_table(pa.Table.from_pylist(rows_), paths["parquet"])
    datasets.disable_progress_bars()
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows_)}).save_to_disk(str(paths["hf"]))
    return paths


def test_sources_agree_dedup_and_checkers(tmp_path):
    data = [
        {"q": "Tom has 3 pens. Gets 4 more.", "a": "3+4=7 #### 7"},
        {"q": "copy: ab\n", "a": "ab"},
        {"q": "Tom has 3 pens. Gets 4 more.", "a": "3+4=7 #### 7"},
    ]
    paths = write_sources(tmp_path, data)
    got = []
    for kind, path in paths.items():
        src = OmegaConf.structured(SourceConfig(path=str(path), prompt_column="q", answer_column="a"))
        got.append([(it.id, it.prompt, it.answer) for it in load_items(src, dedup=True)])
        assert len(got[-1]) == 2, kind  # the repeated prompt is dropped
    assert all(g == got[0] for g in got)
    src = OmegaConf.structured(SourceConfig(path=str(paths["jsonl"]), prompt_column="q", answer_column="a"))
    items = load_items(src)
    check = build_checker("last_number", src, items)
    assert check(items[0], "so 3+4 = 7.") and not check(items[0], "#### 8")
    assert build_checker("exact", src, items)(items[1], " ab\n")
    with pytest.raises(DParallelError, match="no_such_module"):
        build_checker("no_such_module:fn", src, items)
    assert build_checker("auto", src, items) is None


def test_keep_correct_filters(model, tmp_path, capsys):
    mod = tmp_path / "check_mod.py"
    mod.write_text("def odd(prompt, output, answer):\n    return len(prompt) % 2 == 1\n")
    sys.path.insert(0, str(tmp_path))
    try:
        out = record(recipe(model, tmp_path / "r", "record.checker=check_mod:odd", "record.keep=correct"))
    finally:
        sys.path.remove(str(tmp_path))
    records = rows(out)
    counts = T.read_manifest(out)["counts"]
    assert counts["records"] == len(records) == counts["correct"] < counts["prompts"]
    assert all(r["meta"]["correct"] and len(r["meta"]["prompt"]) % 2 == 1 for r in records)
    dropped = counts["prompts"] - counts["records"]
    assert f"dropped {dropped} the checker marked wrong" in capsys.readouterr().out


# ---- errors: one line, exit code 2, nothing overwritten ------------------------------------------------------------


def test_a_damaged_shard_is_named_then_recorded_again(model, tmp_path, capsys):
    """A truncated shard: `data inspect` names it in one line; a `record` rerun (the manifest still there) finds it,
    records it again and leaves a folder equal to the one first written; a deleted shard is repaired the same way."""
    out = record(recipe(model, tmp_path))
    whole = rows(out)
    arrow = next((out / "shard-00001").glob("*.arrow"))
    arrow.write_bytes(arrow.read_bytes()[:100])
    capsys.readouterr()
    code, _, err = run_cli(["data", "inspect", str(out)], capsys)
    assert_one_line_error(code, err, "shard-00001", "corrupt")
    stamp = (out / "shard-00000" / "dataset_info.json").stat().st_mtime_ns
    code, printed, _ = run_cli(["record", "recipes/tiny/record.yaml", *overrides(model, tmp_path)], capsys)
    assert code == 0 and "damaged (shard-00001): recording them again" in printed
    assert rows(out) == whole and (out / "shard-00000" / "dataset_info.json").stat().st_mtime_ns == stamp
    shutil.rmtree(out / "shard-00002")
    record(recipe(model, tmp_path))
    assert rows(out) == whole


def test_wrong_schema_version_is_a_one_line_error(tmp_path, capsys):
    shutil.copytree(FIXTURE, tmp_path / "t")
    manifest = json.loads((tmp_path / "t" / T.MANIFEST).read_text())
    (tmp_path / "t" / T.MANIFEST).write_text(json.dumps({**manifest, "schema_version": 99}))
    code, _, err = run_cli(["data", "inspect", str(tmp_path / "t")], capsys)
    assert_one_line_error(code, err, str(tmp_path / "t" / T.MANIFEST), "schema version 99")


def test_missing_column_in_jsonl_is_a_one_line_error(model, tmp_path, capsys):
    src = tmp_path / "prompts.jsonl"
    src.write_text(json.dumps({"question": "copy: ab\n"}) + "\n")
    args = ["record", "recipes/tiny/record.yaml", *overrides(model, tmp_path / "run"), f"record.source.path={src}"]
    code, _, err = run_cli(args, capsys)
    assert_one_line_error(code, err, str(src), "'prompt'")
    assert not (tmp_path / "run" / "trajectories").exists()


def test_a_hub_dataset_id_offline_is_one_line(model, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    args = ["record", "recipes/tiny/record.yaml", *overrides(model, tmp_path), "record.source.path=openai/gsm8k"]
    code, _, err = run_cli(args, capsys)
    assert_one_line_error(code, err, "openai/gsm8k", "HF_HUB_OFFLINE=1")


def test_cli_record_and_inspect(model, tmp_path, capsys):
    code, _, _ = run_cli(["record", "recipes/tiny/record.yaml", *overrides(model, tmp_path)], capsys)
    assert code == 0
    code, out, _ = run_cli(["data", "inspect", str(tmp_path / "trajectories"), "--samples", "2"], capsys)
    assert code == 0
    assert "8 prompts -> 8 records" in out and "unmasking order" in out and "s=0" in out and "TPF" in out


def test_model_recipes_load():
    for name in ("llada-8b", "dream-7b"):
        cfg = load_recipe(f"recipes/{name}/record.yaml", ["record.source.path=gsm8k.jsonl"])
        assert cfg.decode.gen_length == 256 and cfg.record.checker == "last_number"
        assert cfg.record.out.endswith("/trajectories")


# ---- torchrun ---------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_process_torchrun_matches_one_process(model, tmp_path):
    one = record(recipe(model, tmp_path / "one", "record.features=true"))
    args = ["record", "recipes/tiny/record.yaml", *overrides(model, tmp_path / "two", "record.features=true")]
    proc = run_dparallel(args, nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = tmp_path / "two" / "trajectories"
    assert rows(two) == rows(one)
    assert T.read_manifest(two)["counts"] == T.read_manifest(one)["counts"]


def regenerate_fixture() -> None:
    """Record the golden fixture: 4 suite prompts in 2 shards, gen 16, block 8, dense features."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        cwd = os.getcwd()
        os.chdir(tmp)  # a relative model path keeps the fixture's manifest free of temporary paths
        try:
            make_model(Path("tiny-random"))
            cfg = load_recipe(
                str(Path(cwd) / "recipes/tiny/record.yaml"),
                [
                    "run_dir=run",
                    "model.path=tiny-random",
                    "decode.gen_length=16",
                    "decode.block_length=8",
                    "record.source.suite.n_per_task=1",
                    "record.source.suite.tasks=[copy,sum,chain,distinct]",
                    "record.shard_size=2",
                    "record.batch_size=2",
                    "record.features=true",
                ],
            )
            out = record(cfg)
            shutil.rmtree(FIXTURE, ignore_errors=True)
            shutil.copytree(out, FIXTURE)
        finally:
            os.chdir(cwd)


if __name__ == "__main__":
    torch.set_num_threads(1)
    regenerate_fixture()
    print(f"wrote {FIXTURE}")
