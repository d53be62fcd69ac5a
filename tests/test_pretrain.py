"""Masked-diffusion pretraining: the loss, the batches, a tiny end-to-end train, resume, and the shipped teacher."""

import torch
from omegaconf import OmegaConf

import dparallel
from dparallel.adapters.char_tokenizer import build_char_tokenizer
from dparallel.commands.recipe import load_recipe
from dparallel.commands.train import train
from dparallel.data.sft import SuiteBatches, collate
from dparallel.data.suite import is_correct
from dparallel.methods.pretrain import mask_ratios, mdlm_loss

PINNED_TEACHER = ["hgfdsapoiuytrewq", "adefghiopqrstuwy", "dcab, bacd, abdc, cdba", "fkconmpbjigelhad"]
TINY = ["tiny.hidden_size=32", "tiny.intermediate_size=64", "tiny.num_hidden_layers=1", "tiny.num_attention_heads=2"]


def test_collate_left_pads_prompt_and_marks_it():
    batch = collate([[5, 6, 7], [8]], [[9, 2], [10, 2]], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 9, 2], [0, 0, 8, 10, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]]
    assert batch["prompt_mask"].tolist() == [[True, True, True, False, False]] * 2


def test_stratified_mask_ratios_cover_the_unit_interval():
    p = mask_ratios(4, eps=0.0, stratified=True, generator=torch.Generator().manual_seed(0), device="cpu")
    gaps = sorted(p.tolist())
    assert all(abs((b - a) - 0.25) < 1e-6 for a, b in zip(gaps, gaps[1:]))


def test_mdlm_loss_weights_by_inverse_mask_ratio_and_answer_length():
    logits = torch.zeros(2, 3, 4)  # uniform: CE = log 4 everywhere
    targets = torch.zeros(2, 3, dtype=torch.long)
    masked = torch.tensor([[True, False, True], [False, False, True]])
    loss = mdlm_loss(logits, targets, masked, torch.tensor([0.5, 0.25]), torch.tensor([2.0, 1.0]))
    ln4 = torch.log(torch.tensor(4.0))
    assert torch.allclose(loss, (2 * ln4 / (0.5 * 2) + ln4 / (0.25 * 1)) / 2)


def test_suite_batches_are_reproducible_and_rank_disjoint():
    tok = build_char_tokenizer()
    a = SuiteBatches(tok, ["copy", "sum"], 4, [32], eos_id=2, pad_id=0, rank=0, world=2).batch(3)
    b = SuiteBatches(tok, ["copy", "sum"], 4, [32], eos_id=2, pad_id=0, rank=0, world=2).batch(3)
    c = SuiteBatches(tok, ["copy", "sum"], 4, [32], eos_id=2, pad_id=0, rank=1, world=2).batch(3)
    assert torch.equal(a["input_ids"], b["input_ids"])
    assert not torch.equal(a["input_ids"][:, -32:], c["input_ids"][:, -32:])
    assert (a["input_ids"][:, -1] == 2).all()  # the canvas ends in EOS padding


def test_train_tiny_teacher_pins_loss_and_saves_loadable_model(tmp_path):
    args = [
        f"run_dir={tmp_path}",
        "train.max_steps=3",
        "train.schedule_steps=16000",  # the recipe's warm-up (300) outlasts 3 steps: the lr is its first steps'
        "train.global_batch_size=4",
        "train.log_every=1",
        "pretrain.gen_lengths=[32]",
        "pretrain.tasks=[copy,reverse]",
        "train.checkpoint_every=2",
        *TINY,
    ]
    cfg = load_recipe("recipes/tiny/teacher.yaml", args + ["train.num_workers=0"])
    model_dir = train(cfg)
    rows = (tmp_path / "logs" / "version_0" / "metrics.csv").read_text().splitlines()
    first_loss = float(rows[1].split(",")[2])
    assert abs(first_loss - 4.4246) < 1e-3, first_loss  # fixed seed: a change to data, masking or loss moves it
    assert (tmp_path / "config.yaml").is_file() and (tmp_path / "checkpoints" / "last.ckpt").is_file()
    gen = dparallel.load(str(model_dir), device="cpu")
    assert gen.adapter.family == "tiny" and gen.adapter.ids.mask == 1
    assert gen.defaults == {"gen_length": 32, "block_length": 32}  # the recipe's canvas, from dparallel.json
    out = gen.generate(["copy: ab\n"], rule="confidence", gen_length=8, block_length=8)
    assert len(out[0].tokens) == 8

    # A rerun with a larger budget resumes from last.ckpt instead of starting over.
    cfg = load_recipe(
        "recipes/tiny/teacher.yaml", args + ["train.num_workers=0", "train.max_steps=4", "train.schedule_steps=16000"]
    )
    train(cfg)
    resumed = (tmp_path / "logs" / "version_1" / "metrics.csv").read_text().splitlines()[1:]
    assert [r.split(",")[1] for r in resumed] == ["3"]  # only the new step ran
    assert (tmp_path / "logs" / "version_0" / "metrics.csv").read_text().splitlines() == rows  # kept


def test_resume_with_a_changed_recipe_is_refused_in_one_line(tmp_path, capsys):
    from conftest import assert_one_line_error, run_cli

    base = [
        "train",
        "recipes/tiny/teacher.yaml",
        f"run_dir={tmp_path}",
        "train.max_steps=1",
        "train.warmup_steps=0",
        *TINY,
    ]
    base += ["train.global_batch_size=2", "pretrain.tasks=[copy]", "train.num_workers=0"]
    assert run_cli(base, capsys)[0] in (0, None)
    saved = (tmp_path / "config.yaml").read_text()
    code, _, err = run_cli([*base, "train.max_steps=2", "tiny.hidden_size=16"], capsys)
    assert_one_line_error(code, err, "cannot resume", "the recipe changed tiny.hidden_size", "use another run_dir")
    code, _, err = run_cli([*base, "method=ar", "train.max_steps=2"], capsys)
    assert_one_line_error(code, err, "holds a 'pretrain' run; this recipe trains 'ar'")
    assert (tmp_path / "config.yaml").read_text() == saved  # the refused reruns left the run's recipe alone
    # more steps, another lr: the same model, so the run resumes
    assert run_cli([*base, "train.max_steps=2", "train.lr=1e-4"], capsys)[0] in (0, None)


def test_shipped_teacher_solves_pinned_prompts():
    gen = dparallel.load("builtin:tiny-teacher", device="cpu")
    assert gen.defaults == {"gen_length": 32, "block_length": 32}  # the suite's canvas, one block
    prompts = [
        "reverse: qwertyuiopasdfgh\n",
        "sort: qwertyuiopasdfgh\n",
        "latin square: abcd\n",
        "shuffle: abcdefghijklmnop\n",
    ]
    outs = gen.generate(prompts, rule="topk")  # one token per step: the teacher's sequential answers
    assert [o.text for o in outs] == PINNED_TEACHER
    tasks = ["reverse", "sort", "latin_square", "shuffle"]
    assert all(is_correct(t, p, o.text) for t, p, o in zip(tasks, prompts, outs))  # each one a valid answer
    assert OmegaConf.create(gen.adapter.model.config.to_dict()).num_hidden_layers == 4
