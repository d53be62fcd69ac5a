"""The frontier section of eval.json: targets, nfe_at_target per decoder family, macro and per task family."""

import pytest

from dparallel.commands.frontier import best_heuristic, decoder_kind, frontier, frontier_table, wilson_interval
from dparallel.core.errors import DParallelError


def _rows(decoder: str, macro: tuple[float, float], **families: tuple[float, float]) -> list[dict]:
    rows = [{"decoder": decoder, "task": f, "family": f, "accuracy": a, "nfe": n} for f, (a, n) in families.items()]
    return rows + [{"decoder": decoder, "task": "macro", "family": "all", "accuracy": macro[0], "nfe": macro[1]}]


ROWS = (
    _rows("sequential", (0.95, 32), **{"one-answer": (1.0, 32), "many-answers": (0.9, 32)})
    + _rows("confidence-0.9", (0.945, 12), **{"one-answer": (1.0, 2), "many-answers": (0.89, 22)})
    + _rows("confidence-0.7", (0.80, 6), **{"one-answer": (1.0, 1.5), "many-answers": (0.6, 10.5)})
    + _rows("topk-4", (0.5, 8), **{"one-answer": (0.99, 8), "many-answers": (0.01, 8)})
    + _rows("filter-0.9", (0.942, 5), **{"one-answer": (1.0, 1.2), "many-answers": (0.884, 8.8)})
)
DECODERS = [
    {"name": "sequential", "frontier": "sequential", "kind": "reference"},
    {"name": "confidence-0.9", "frontier": "confidence", "kind": "heuristic"},
    {"name": "confidence-0.7", "frontier": "confidence", "kind": "heuristic"},
    {"name": "topk-4", "frontier": "topk", "kind": "heuristic"},
    {"name": "filter-0.9", "frontier": "filter", "kind": "method", "model": "runs/filter/model"},
]


def test_nfe_at_target_is_the_lowest_nfe_at_or_above_the_target():
    fr = frontier(ROWS, DECODERS, "sequential", 0.01, "builtin:tiny-teacher")
    assert fr["reference"] == "sequential"
    assert fr["target"] == pytest.approx(0.94)
    fams = fr["families"]
    assert fams["sequential"]["nfe_at_target"] == 32
    assert fams["confidence"]["nfe_at_target"] == 12  # 0.7 is cheaper but below the target
    assert [p["decoder"] for p in fams["confidence"]["points"]] == ["confidence-0.9", "confidence-0.7"]
    assert fams["topk"]["nfe_at_target"] is None
    assert fams["filter"] == {
        "points": [{"decoder": "filter-0.9", "nfe": 5, "accuracy": 0.942}],
        "nfe_at_target": 5,
        "kind": "method",
        "model": "runs/filter/model",
    }
    assert fams["confidence"]["model"] == "builtin:tiny-teacher"
    assert best_heuristic(fr) == ("confidence", 12)


def test_each_task_family_has_its_own_target_and_frontier():
    fr = frontier(ROWS, DECODERS, "sequential", 0.01, "m")
    assert list(fr["task_families"]) == ["one-answer", "many-answers"]
    one, many = fr["task_families"]["one-answer"], fr["task_families"]["many-answers"]
    assert one["target"] == pytest.approx(0.99)
    assert one["families"]["confidence"]["nfe_at_target"] == 1.5
    assert one["families"]["topk"]["nfe_at_target"] == 8
    assert many["target"] == pytest.approx(0.89)
    assert many["families"]["confidence"]["nfe_at_target"] == 22
    assert many["families"]["filter"]["nfe_at_target"] is None  # 0.884 < 0.89
    assert best_heuristic(many) == ("confidence", 22)


def test_frontier_table_lists_every_family_and_target():
    table = frontier_table({"frontier": frontier(ROWS, DECODERS, "sequential", 0.01, "m")})
    assert "| target | | 0.940 | 0.990 | 0.890 |" in table
    assert "| topk | heuristic | - | 8.0 | - |" in table
    assert "| filter | method | 5.0 | 1.2 | - |" in table


def test_missing_reference_is_a_one_line_error():
    with pytest.raises(DParallelError, match="eval.reference='greedy' is not a decoder of this eval"):
        frontier(ROWS, DECODERS, "greedy", 0.01, "m")


def test_kinds_follow_the_rule_unless_set():
    assert decoder_kind("sequential", "topk", "sequential") == "reference"
    assert decoder_kind("topk-4", "topk", "sequential") == "heuristic"
    assert decoder_kind("oracle", "oracle", "sequential") == "oracle"
    assert decoder_kind("filter-0.9", "filter", "sequential") == "method"
    assert decoder_kind("student-entropy", "entropy", "sequential", "method") == "method"
    with pytest.raises(DParallelError, match="kind='fast'"):
        decoder_kind("x", "topk", "sequential", "fast")


def test_wilson_interval():
    assert wilson_interval(95, 100) == [0.8882, 0.9785]
    assert wilson_interval(100, 100) == [0.963, 1.0]
    assert wilson_interval(0, 10) == [0.0, 0.2775]


def test_one_eval_puts_the_teacher_and_another_model_in_one_frontier(tmp_path, capsys):
    """A decoder with `model:` decodes with that model (a student) in the same run, on the same prompts."""
    import json

    from conftest import run_cli, tiny_shape
    from omegaconf import OmegaConf

    from dparallel.adapters.folder import save_model_folder
    from dparallel.adapters.tiny import new_tiny_adapter

    for name, seed in (("teacher", 0), ("student", 1)):
        save_model_folder(new_tiny_adapter(OmegaConf.create(tiny_shape()), seed=seed), tmp_path / name, "float32")
    student = str(tmp_path / "student")
    decoders = (
        "eval.decoders=[{name: sequential, gen_length: 32, block_length: 32},"
        " {name: confidence-0.9, rule: confidence, threshold: 0.9, gen_length: 32, block_length: 32},"
        f" {{name: student-0.9, rule: confidence, threshold: 0.9, model: '{student}', gen_length: 32,"
        " block_length: 32},"
        f" {{name: student-seq, model: '{student}', gen_length: 32, block_length: 32}}]"
    )
    args = ["eval", "recipes/tiny/eval.yaml", f"run_dir={tmp_path / 'eval'}", f"model.path={tmp_path / 'teacher'}"]
    code, _, _ = run_cli([*args, "eval.suite.n_per_task=1", "eval.suite.tasks=[copy,sum]", decoders], capsys)
    assert code in (0, None)
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    fams = report["frontier"]["families"]
    assert {k: (v["kind"], v["model"]) for k, v in fams.items()} == {
        "sequential": ("reference", str(tmp_path / "teacher")),
        "confidence": ("heuristic", str(tmp_path / "teacher")),
        f"confidence@{student}": ("method", student),
        f"topk@{student}": ("method", student),
    }
    rows = {r["decoder"]: r for r in report["results"] if r["task"] == "macro"}
    assert rows["student-seq"]["nfe"] == rows["sequential"]["nfe"] == 32  # one token per step on either model
    assert list(report["frontier"]["task_families"]) == ["one-answer", "reasoning"]


def test_a_reference_on_another_model_stays_the_reference():
    """A method's eval runs on the student and decodes the teacher's reference with `model:`: that decoder is the
    reference (its own family), not a method point."""
    from omegaconf import OmegaConf

    from dparallel.commands.config import EvalConfig
    from dparallel.commands.evaluate import decoder_points

    cfg = OmegaConf.merge(
        OmegaConf.structured(EvalConfig),
        {
            "reference": "teacher-sequential",
            "decoders": [
                {"name": "teacher-sequential", "model": "builtin:tiny-teacher"},
                {"name": "teacher-conf", "model": "builtin:tiny-teacher", "rule": "confidence", "kind": "heuristic"},
                {"name": "student-entropy", "rule": "entropy"},
            ],
        },
    )
    points = {p["name"]: (p["frontier"], p["kind"], p["model"]) for p in decoder_points(cfg, "student")}
    assert points == {
        "teacher-sequential": ("teacher-sequential", "reference", "builtin:tiny-teacher"),
        "teacher-conf": ("confidence@builtin:tiny-teacher", "heuristic", "builtin:tiny-teacher"),
        "student-entropy": ("entropy", "heuristic", "student"),
    }
