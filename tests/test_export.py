"""Export: train tiny -> export -> load in a fresh process -> the same tokens; refusals are one-line errors."""

import json
from pathlib import Path

import pytest
from conftest import fresh_process_tokens

import dparallel
from dparallel.cli import main
from dparallel.commands.recipe import load_recipe
from dparallel.commands.train import train

TINY = [
    "tiny.hidden_size=32",
    "tiny.intermediate_size=64",
    "tiny.num_hidden_layers=1",
    "tiny.num_attention_heads=2",
    "train.max_steps=2",
    "train.schedule_steps=16000",
    "train.global_batch_size=4",
    "pretrain.gen_lengths=[32]",
    "pretrain.tasks=[copy]",
    "train.num_workers=0",
    "decode.rule=confidence",
    "decode.gen_length=32",
    "decode.block_length=8",
]
PROMPTS = ["copy: abc\n", "copy: xy\n"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    train(load_recipe("recipes/tiny/teacher.yaml", [f"run_dir={run}", *TINY]))
    return run


def test_export_then_load_in_fresh_process_gives_same_tokens(run_dir, tmp_path, capsys):
    before = [
        g.tokens
        for g in dparallel.load(str(run_dir / "model"), device="cpu").generate(
            PROMPTS, rule="confidence", gen_length=32, block_length=8
        )
    ]
    with pytest.raises(SystemExit) as exc:
        main(["export", str(run_dir), "--to", str(tmp_path / "out")])
    assert exc.value.code == 0
    manifest = json.loads((tmp_path / "out" / "dparallel.json").read_text())
    assert manifest["component"] == "base" and manifest["family"] == "tiny" and manifest["method"] == "pretrain"
    assert manifest["decoding"]["rule"] == "confidence" and manifest["ids"]["mask"] == 1
    assert "## Load" in (tmp_path / "out" / "README.md").read_text()
    # The exported folder's decoding defaults (confidence, gen 32, block 8) apply without arguments.
    assert fresh_process_tokens(tmp_path / "out", PROMPTS) == before


def test_export_refuses_non_empty_target_and_keeps_it(run_dir, tmp_path, capsys):
    target = tmp_path / "taken"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit) as exc:
        main(["export", str(run_dir), "--to", str(target)])
    assert exc.value.code == 2
    assert "not empty: pass --overwrite" in capsys.readouterr().err
    assert [p.name for p in target.iterdir()] == ["keep.txt"]


def test_unreachable_hub_id_is_one_line(monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit) as exc:
        main(["generate", "no-such-org/no-such-model", "--prompt", "hi"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and "cannot get 'no-such-org/no-such-model'" in err[0]


class _FakeHub:
    """Stands in for huggingface_hub.HfApi at the network boundary: records what would be sent."""

    calls: list = []
    fail: str | None = None

    def create_repo(self, repo_id, private=False, exist_ok=False):
        type(self).calls.append(("create_repo", repo_id, private, exist_ok))
        if type(self).fail:
            raise OSError(f"{type(self).fail}\nsecond line of a long traceback")
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, folder_path, repo_id, commit_message):
        names = sorted(p.name for p in Path(folder_path).iterdir())
        type(self).calls.append(("upload_folder", repo_id, names, commit_message))


def test_push_to_hub_uploads_the_exported_folder(run_dir, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", _FakeHub)
    monkeypatch.setattr(_FakeHub, "calls", [])
    monkeypatch.setattr(_FakeHub, "fail", None)
    with pytest.raises(SystemExit) as exc:
        main(["export", str(run_dir), "--to", str(tmp_path / "out"), "--push-to-hub", "me/tiny", "--private"])
    assert exc.value.code == 0
    assert _FakeHub.calls[0] == ("create_repo", "me/tiny", True, True)
    op, repo, names, message = _FakeHub.calls[1]
    assert (op, repo, message) == ("upload_folder", "me/tiny", "dparallel export")
    assert {"README.md", "dparallel.json", "config.json", "model.safetensors"} <= set(names)
    assert "pushed to https://huggingface.co/me/tiny" in capsys.readouterr().out


def test_failed_push_is_one_line_and_keeps_the_export(run_dir, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", _FakeHub)
    monkeypatch.setattr(_FakeHub, "calls", [])
    monkeypatch.setattr(_FakeHub, "fail", "401 Unauthorized: invalid token")
    with pytest.raises(SystemExit) as exc:
        main(["export", str(run_dir), "--to", str(tmp_path / "out"), "--push-to-hub", "me/tiny"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1
    assert "cannot push to me/tiny: 401 Unauthorized: invalid token" in err[0] and str(tmp_path / "out") in err[0]
    assert (tmp_path / "out" / "dparallel.json").is_file()


def test_model_card_parses_with_hub_metadata_and_eval_results(tmp_path):
    from huggingface_hub import ModelCard

    from dparallel.commands.export import model_card

    manifest = {
        "name": "llada-dparallel",
        "component": "student",
        "family": "llada",
        "method": "distill",
        "base_model": {"path": "GSAI-ML/LLaDA-8B-Instruct"},
        "decoding": {"rule": "entropy", "threshold": 0.5},
        "eval": {"suite": "suite/test", "results": [
            {"decoder": "entropy-0.5", "task": "macro", "accuracy": 0.71, "nfe": 9.4},
            {"decoder": "entropy-0.5", "task": "copy", "accuracy": 1.0, "nfe": 2.0},
            {"decoder": "oracle", "task": "macro", "accuracy": 0.8, "nfe": 3.0},
        ], "frontier": {"families": {"oracle": {"kind": "oracle", "points": [{"decoder": "oracle"}]}}}},
    }  # fmt: skip
    (tmp_path / "README.md").write_text(model_card(manifest, tmp_path))
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.base_model == "GSAI-ML/LLaDA-8B-Instruct" and card.data.library_name == "dparallel"
    assert card.data.license == "apache-2.0" and "distill" in card.data.tags
    [result] = card.data.eval_results  # the macro row only, and never the oracle's
    assert result.metric_type == "accuracy" and result.metric_value == 0.71 and "NFE 9.4" in result.metric_name
    assert "dparallel.load(" in card.text and "PATH_OR_HUB_ID" not in card.text


def test_the_export_decodes_with_the_evaluated_decoder_of_fewest_forwards_at_the_best_accuracy():
    from dparallel.commands.export import best_decoder
    from dparallel.commands.recipe import load_recipe

    cfg = load_recipe("recipes/tiny/frontier.yaml")
    names = [d.name for d in cfg.eval.decoders]
    report = {"results": [{"decoder": n, "task": "macro", "accuracy": 0.5, "nfe": 20.0} for n in names]}
    report["results"][names.index("confidence-0.9")].update(accuracy=0.80, nfe=10.0)
    report["results"][names.index("entropy-0.2")].update(accuracy=0.795, nfe=7.0)  # within 1 point, fewer NFE
    chosen = best_decoder(cfg, report)
    assert chosen["rule"] == "entropy" and chosen["threshold"] == 0.2 and "name" not in chosen
    assert best_decoder(cfg, None) == {}
    filt = load_recipe("recipes/tiny/filter.yaml")  # the oracle and the teacher's heuristics are not the filter's
    names = [d.name for d in filt.eval.decoders]
    rows = [{"decoder": n, "task": "macro", "accuracy": 0.9, "nfe": 20.0 - i} for i, n in enumerate(names)]
    report = {"results": rows}
    report["results"][names.index("oracle")].update(nfe=1.0)
    report["results"][names.index("confidence-0.95")].update(nfe=2.0)
    assert best_decoder(filt, report)["rule"] == "filter" and best_decoder(filt, report)["eot_stop"] == "accepted"
