"""Certainty-forcing distillation: masks, the loss (exact at any batch size), the data path and a tiny fit."""

import json
import sys
from itertools import islice
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import fresh_process_tokens, run_dparallel, tiny_shape
from omegaconf import OmegaConf

import dparallel
from dparallel.adapters.folder import save_model_folder
from dparallel.adapters.llada import LLaDAAdapter
from dparallel.adapters.tiny import new_tiny_adapter
from dparallel.commands.export import export_run
from dparallel.commands.recipe import load_recipe
from dparallel.commands.train import train
from dparallel.core.errors import DParallelError
from dparallel.methods import distill
from dparallel.methods.distill import (
    CertaintyForcingModule,
    EpochSampler,
    TrajectoryBatches,
    build_distill_inputs,
    certainty_forcing_terms,
)

SHAPE = tiny_shape()
G, BLOCK, MASK = 16, 8, 1
PROMPTS = [("copy: ab\n", "ab"), ("reverse: hello\n", "olleh"), ("sort: dcba\n", "abcd")]


def tiny():
    return new_tiny_adapter(OmegaConf.create(SHAPE), seed=0)


def records(tokenizer, eos=2, pairs=PROMPTS):
    out = []
    for prompt, answer in pairs:
        ids = tokenizer(answer, add_special_tokens=False).input_ids
        out.append({"prompt_ids": tokenizer(prompt).input_ids, "tokens": ids + [eos] * (G - len(ids))})
    return out


def recipe(*overrides):
    return load_recipe("recipes/tiny/distill.yaml", [f"distill.block_length={BLOCK}", *overrides])


def batch_of(adapter, recs):
    return TrajectoryBatches(recs, adapter.ids.pad).collate(recs)


@pytest.mark.parametrize(
    "opts",
    [
        dict(complementary=True, mask_suffix=True),
        dict(complementary=False, mask_suffix=False, mask_ratio=[0.2, 0.9]),
        dict(complementary=True, full_response=True),
        dict(complementary=False, single_pass=True),
    ],
)
def test_batched_masks_equal_per_example_masks(opts):
    adapter = tiny()
    recs = records(adapter.tokenizer)
    b = batch_of(adapter, recs)
    batched = build_distill_inputs(
        b["prompt_ids"],
        b["tokens"],
        b["attention_mask"],
        MASK,
        BLOCK,
        generator=torch.Generator().manual_seed(3),
        **opts,
    )
    g = torch.Generator().manual_seed(3)
    for i, r in enumerate(recs):
        one = batch_of(adapter, [r])
        alone = build_distill_inputs(
            one["prompt_ids"], one["tokens"], one["attention_mask"], MASK, BLOCK, generator=g, **opts
        )
        for x, y in zip(batched, alone):
            if x is None:
                assert y is None
                continue
            assert torch.equal(x[i, -G:], y[0, -G:])  # the response part: same draws for row i alone
            assert torch.equal(x[i, :-G][b["attention_mask"][i, :-G].bool()], y[0, :-G])  # the prompt is kept


def test_complementary_passes_partition_the_block_and_mask_the_suffix_without_loss():
    B = 16
    tokens = torch.randint(4, 50, (B, 32))
    prompt = torch.randint(4, 50, (B, 5))
    noisy_a, noisy_b, la, lb = build_distill_inputs(
        prompt, tokens, None, MASK, 8, mask_ratio=0.5, generator=torch.Generator().manual_seed(0)
    )
    assert not (la[:, :5] | lb[:, :5]).any() and torch.equal(noisy_a[:, :5], prompt)
    ra, rb = la[:, 5:], lb[:, 5:]
    assert not (ra & rb).any()  # disjoint
    block = ra | rb
    for i in range(B):
        where = block[i].nonzero().flatten()
        k = int(where[0]) // 8
        assert where.tolist() == list(range(8 * k, 8 * k + 8))  # one whole block, every token supervised once
        for noisy in (noisy_a, noisy_b):
            assert torch.equal(noisy[i, 5 : 5 + 8 * k], tokens[i, : 8 * k])  # earlier blocks clean
            assert (noisy[i, 5 + 8 * k + 8 :] == MASK).all()  # suffix masked, no loss on it
        assert torch.equal(noisy_a[i, 5:][ra[i]], torch.full((int(ra[i].sum()),), MASK))
        assert torch.equal(noisy_a[i, 5:][rb[i]], tokens[i][rb[i]])  # the complement stays clean in pass a
    # mask_suffix=false leaves later blocks clean; full_response makes the whole answer the block
    a, _, la, _ = build_distill_inputs(prompt, tokens, None, MASK, 8, mask_suffix=False, generator=None)
    assert torch.equal(a[:, 5:][~la[:, 5:]], tokens[~la[:, 5:]])
    _, _, la, lb = build_distill_inputs(prompt, tokens, None, MASK, 8, full_response=True, generator=None)
    assert (la[:, 5:] ^ lb[:, 5:]).all()


def test_entropy_term_only_on_correct_positions():
    logits = torch.tensor([[[3.0, 1.0, 0.0, 0.0], [0.5, 2.0, 0.1, 0.0], [2.0, 0.0, 1.0, 0.0]]], requires_grad=True)
    targets = torch.tensor([[0, 1, 2]])  # positions 0 and 1 correct, position 2 wrong
    mask = torch.tensor([[True, True, True]])
    t = certainty_forcing_terms(logits, targets, mask, temperature=0.5, correct_only=True)
    q = torch.softmax(logits.detach() / 0.5, -1)
    h = -(q * q.log()).sum(-1)[0]
    assert torch.allclose(t.entropy, h[:2].mean()[None])
    assert t.n_correct.item() == 2 and t.n_masked.item() == 3
    assert torch.allclose(t.ce, F.cross_entropy(logits[0].detach(), targets[0]).mean()[None])
    (grad,) = torch.autograd.grad(t.entropy.sum(), logits)
    assert grad[0, 2].abs().sum() == 0 and grad[0, :2].abs().sum() > 0
    every = certainty_forcing_terms(logits, targets, mask, temperature=0.5, correct_only=False)
    assert torch.allclose(every.entropy, h.mean()[None])


def reference_loss(adapter, recs, cfg):
    """The paper's loss at batch size 1, in plain Python, averaged over the rows (row i seeded by its draw i)."""
    d, total = cfg.distill, 0.0
    for i, r in enumerate(recs):
        prompt, tokens = torch.tensor([r["prompt_ids"]]), torch.tensor([r["tokens"]])
        y = torch.cat([prompt, tokens], 1)[0]
        seed = torch.tensor([cfg.train.seed * 1_000_000_007 + i])
        a, b, la, lb = build_distill_inputs(
            prompt, tokens, None, MASK, d.block_length, list(d.mask_ratio), row_seeds=seed
        )
        for noisy, m in ((a, la), (b, lb)):
            logits = adapter.logits(noisy)[0]
            idx = m[0].nonzero().flatten().tolist()
            total += sum(F.cross_entropy(logits[j], y[j], reduction="sum") for j in idx) / len(idx)
            good = [j for j in idx if int(logits[j].argmax()) == int(y[j])]
            if good:
                q = torch.softmax(logits[good] / d.temperature, -1)
                total += d.entropy_weight * (-(q * q.log()).sum(-1)).mean()
    return total / len(recs)


def test_batched_loss_equals_per_example_loop_and_is_pinned():
    adapter = tiny()
    cfg = recipe("distill.mask_ratio=[0.5]", "distill.entropy_weight=2.0")  # dParallel's LLaDA settings: the pin
    module = CertaintyForcingModule(cfg, adapter)
    recs = records(adapter.tokenizer)
    torch.manual_seed(0)
    loss, parts = module.compute_loss(batch_of(adapter, recs))
    torch.manual_seed(0)
    with torch.no_grad():
        ref = reference_loss(adapter, recs, cfg)
    assert abs(loss.item() - float(ref)) < 1e-5, (loss.item(), float(ref))
    assert abs(loss.item() - 8.8836) < 1e-4, loss.item()  # fixed seed: a change to masking or loss moves it
    assert set(parts) == {"ce", "entropy", "correct_frac", "mean_entropy"}
    assert 0.0 <= parts["correct_frac"] <= 1.0
    loss.backward()
    assert adapter.model.model.embed_tokens.weight.grad.abs().sum() > 0


def test_batched_loss_equals_per_example_loop_on_the_shipped_teacher():
    adapter = dparallel.load("builtin:tiny-teacher", device="cpu").adapter  # mostly right: the entropy term bites
    letters = "qwertyuiopasdf"  # 14 letters: the shortest lists the teacher trained on, + 2 EOS = the canvas of 16
    pairs = [(f"copy: {letters}\n", letters), (f"reverse: {letters}\n", letters[::-1])]
    pairs.append((f"sort: {letters}\n", "".join(sorted(letters))))
    module, recs = CertaintyForcingModule(recipe(), adapter), records(adapter.tokenizer, pairs=pairs)
    torch.manual_seed(1)
    with torch.no_grad():
        loss, parts = module.compute_loss(batch_of(adapter, recs))
        torch.manual_seed(1)
        ref = reference_loss(adapter, recs, module.cfg)
    assert parts["correct_frac"] > 0.25 and parts["entropy"] > 0  # measured 0.5: the entropy term is active
    assert abs(loss.item() - float(ref)) < 1e-5, (loss.item(), float(ref))


def test_collate_left_pads_and_requires_one_canvas_length():
    data = TrajectoryBatches([{"prompt_ids": [5, 6, 7], "tokens": [9, 2]}, {"prompt_ids": [8], "tokens": [10, 2]}], 0)
    b = data.collate([data[0], data[1]])
    assert b["prompt_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert b["tokens"].tolist() == [[9, 2], [10, 2]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]]
    with pytest.raises(DParallelError, match="canvas lengths"):
        TrajectoryBatches([{"prompt_ids": [5], "tokens": [9, 2]}, {"prompt_ids": [8], "tokens": [2]}], 0)


def test_epoch_sampler_splits_ranks_and_resumes():
    full = list(islice(EpochSampler(10, 0, 2, seed=1), 12))
    other = list(islice(EpochSampler(10, 1, 2, seed=1), 5))
    assert not set(full[:5]) & set(other) and sorted(full[:5] + other) == list(range(10))
    assert list(islice(EpochSampler(10, 0, 2, seed=1, start=3), 9)) == full[3:]


def test_balance_tasks_repeats_the_small_tasks_up_to_the_largest():
    folder = str(Path(__file__).parent / "fixtures" / "trajectories-sequential")
    plain = distill.load_records(folder)  # correct ones: copy 16, reverse 16, sort 12, distinct 5
    balanced = distill.load_records(folder, balance_tasks=True)
    assert len(plain) == 49 and len(balanced) == 64
    key = lambda r: tuple(r["tokens"].tolist())  # noqa: E731
    counts: dict[tuple, int] = {}
    for r in balanced:
        counts[key(r)] = counts.get(key(r), 0) + 1
    # every record kept; a distinct record 3 or 4 times (16 = 3 x 5 + 1), a copy record once
    assert set(counts) == {key(r) for r in plain}
    assert sorted(counts.values()) == [1] * 32 + [1] * 8 + [2] * 4 + [3] * 4 + [4]
    # interleaved by round in the order tasks are first seen (copy, reverse, sort, distinct: the fixture's first
    # four); round 1 holds each task's second record, round 5 distinct's first again (it has 5)
    tokens = lambda rows, idx: [rows[i]["tokens"].tolist() for i in idx]  # noqa: E731
    assert tokens(balanced, range(4, 8)) == tokens(plain, (4, 5, 6, 10))
    assert tokens(balanced, [23]) == tokens(plain, [3])


def test_missing_trajectory_reader_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "dparallel.data.trajectory", None)
    with pytest.raises(DParallelError, match="trajectory"):
        distill.load_records(str(tmp_path))


@pytest.mark.parametrize("lora", [False, True])
def test_fit_three_steps_then_export_and_load_the_student_in_a_fresh_process(tmp_path, monkeypatch, lora):
    adapter = tiny()
    save_model_folder(adapter, tmp_path / "base", dtype="float32")
    recs = records(adapter.tokenizer)
    monkeypatch.setattr(distill, "load_records", lambda *a, **k: recs)
    run = tmp_path / "run"
    cfg = recipe(
        f"run_dir={run}", f"model.path={tmp_path / 'base'}", "model.device=cpu", "train.max_steps=3",
        "train.global_batch_size=2", "train.log_every=1", "train.warmup_steps=1", f"lora.enabled={lora}",
        "lora.r=4", "lora.alpha=8", "train.lr=1e-2",
    )  # fmt: skip
    model_dir = train(cfg)
    header, *rows = (run / "logs" / "version_0" / "metrics.csv").read_text().splitlines()
    assert {"train/ce", "train/entropy", "train/correct_frac", "train/mean_entropy"} <= set(header.split(","))
    assert len(rows) == 3
    gen = dparallel.load(str(model_dir), device="cpu")
    out = gen.generate(["copy: ab\n"], rule="entropy", threshold=0.5, gen_length=16, block_length=8)
    assert len(out[0].tokens) == 16
    assert not (model_dir / "adapter_config.json").exists()  # LoRA merged into a plain model
    before, after = adapter.model.model.layers[0].self_attn.q_proj.weight, gen.adapter.model.model.layers[0]
    assert not torch.allclose(before, after.self_attn.q_proj.weight.float(), atol=1e-3)  # it trained
    folder = export_run(run, tmp_path / "export")
    assert json.loads((folder / "dparallel.json").read_text())["component"] == "student"
    decode = {"rule": "entropy", "threshold": 0.5, "gen_length": 16, "block_length": 8}
    assert fresh_process_tokens(folder, ["copy: ab\n"], **decode) == [out[0].tokens]
    assert (folder / "adapter" / "adapter_config.json").is_file() == lora
    if lora:  # the peft adapter onto the base, in a process that has only peft, transformers and the folders
        assert peft_adapter_tokens(tmp_path / "base", folder, "copy: ab\n", decode) == out[0].tokens


def peft_adapter_tokens(base, folder, prompt: str, decode: dict) -> list[int]:
    """PeftModel.from_pretrained(base, FOLDER/adapter), merged and rounded as the exported student was saved
    (bfloat16), decoded by dparallel's engine in a fresh process."""
    import subprocess
    import sys

    code = f"""
import json, torch
from peft import PeftModel
from transformers import AutoTokenizer, LlamaForCausalLM
from dparallel.adapters.tiny import TinyAdapter
from dparallel.engine.pipeline import Pipeline
model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained({str(base)!r}), {str(folder / "adapter")!r})
model = model.merge_and_unload().to(torch.bfloat16).to(torch.float32).eval()
tok = AutoTokenizer.from_pretrained({str(folder)!r})
out = Pipeline(TinyAdapter(model, tok, TinyAdapter.default_ids(tok))).generate([{prompt!r}], **{decode!r})
print(json.dumps(out[0].tokens))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _fit_losses(tmp_path, monkeypatch):
    """A function fit(run_dir, steps) -> the run's logged losses, over a fixed 4-step schedule (so a run stopped
    early and resumed follows the same curve as one that never stopped)."""
    import csv

    adapter = tiny()
    save_model_folder(adapter, tmp_path / "base", dtype="float32")
    recs = records(adapter.tokenizer) * 2
    monkeypatch.setattr(distill, "load_records", lambda *a, **k: recs)

    def fit(run, steps):
        train(
            recipe(
                f"run_dir={run}",
                f"model.path={tmp_path / 'base'}",
                "model.device=cpu",
                f"train.max_steps={steps}",
                "train.global_batch_size=2",
                "train.log_every=1",
                "train.warmup_steps=1",
                "train.lr=1e-2",
                "train.schedule_steps=4",
                "train.checkpoint_every=1",
            )  # fmt: skip
        )
        logs = sorted((run / "logs").glob("version_*/metrics.csv"))
        return [float(r["train/loss"]) for log in logs for r in csv.DictReader(log.open()) if r.get("train/loss")]

    return fit


def test_a_killed_run_resumes_to_the_uninterrupted_loss_curve(tmp_path, monkeypatch):
    """Stopped after 2 of 4 steps (the checkpoint a kill leaves) and rerun: the same 4 losses as a run that never
    stopped (the data order resumes by batch index, the optimizer and schedule from the checkpoint)."""
    fit = _fit_losses(tmp_path, monkeypatch)
    whole = fit(tmp_path / "whole", 4)
    fit(tmp_path / "killed", 2)
    resumed = fit(tmp_path / "killed", 4)
    assert len(whole) == 4 and whole[0] != whole[-1]
    assert resumed == pytest.approx(whole, abs=1e-6)


def test_a_damaged_last_checkpoint_resumes_from_the_previous_good_one(tmp_path, monkeypatch, capsys):
    """Bytes flipped inside last.ckpt (step 2): the rerun says so in one line, resumes from previous.ckpt (step 1)
    and logs the uninterrupted run's losses from step 2 on."""
    fit = _fit_losses(tmp_path, monkeypatch)
    whole = fit(tmp_path / "whole", 4)
    run = tmp_path / "damaged"
    fit(run, 2)
    last = run / "checkpoints" / "last.ckpt"
    assert json.loads((run / "checkpoints" / "previous.ckpt.json").read_text())["global_step"] == 1
    data = bytearray(last.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)  # zeroes inside a tensor: torch.load alone would not see it
    last.write_bytes(bytes(data))
    capsys.readouterr()
    losses = fit(run, 4)
    assert "last.ckpt is damaged" in capsys.readouterr().out
    assert losses[2:] == pytest.approx(whole[1:], abs=1e-6)  # attempt 1 logged steps 1-2; the resume steps 2-4


def test_no_intact_checkpoint_is_one_line(tmp_path):
    from dparallel.methods.checkpoints import resume_point

    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(DParallelError, match="no intact checkpoint .* delete"):
        resume_point(tmp_path)


def test_recipes_follow_the_paper(monkeypatch):
    llada = load_recipe("recipes/llada-8b/distill.yaml")
    assert set(llada.lora.targets) == set(LLaDAAdapter.lora_targets) and llada.lora.r == llada.lora.alpha == 128
    assert (llada.distill.entropy_weight, llada.distill.temperature, llada.train.lr) == (2.0, 0.5, 2e-5)
    dream = load_recipe("recipes/dream-7b/distill.yaml")
    assert dream.distill.full_response and dream.distill.entropy_weight == 1.0 and dream.lora.r == 32
    from dparallel.methods.base import micro_batch

    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert micro_batch(llada) == (1, 8) and micro_batch(dream) == (1, 8)
    with pytest.raises(DParallelError, match="mask_ratio"):
        build_distill_inputs(torch.zeros(1, 2).long(), torch.zeros(1, 8).long(), None, 1, 8, mask_ratio=[0.0, 0.5])


@pytest.mark.slow
def test_two_process_ddp_and_fsdp_give_the_one_process_loss_curve(tmp_path):
    """Same global batch, 1 process vs 2 gloo ranks under ddp and under fsdp (FSDP2, parameters sharded): per-record
    mask seeds and rank-mean logging make the curves equal (up to float error from the different left padding of
    each micro batch and the sharded reductions); both export the same student."""
    import csv

    folder = tmp_path / "student"
    save_model_folder(new_tiny_adapter(OmegaConf.create(SHAPE), seed=0), folder, dtype="float32")
    fixture = Path(__file__).parent / "fixtures" / "trajectories-tiny"
    args = [
        "recipes/tiny/distill.yaml",
        f"model.path={folder}",
        f"distill.trajectories={fixture}",
        "distill.block_length=8",
        "distill.only_correct_records=false",
        "train.global_batch_size=4",
        "train.max_steps=3",
        "train.log_every=1",
        "train.warmup_steps=0",
        "train.lr=1e-2",
    ]
    curves, weights = {}, {}
    for name, nproc in (("one", 1), ("ddp", 2), ("fsdp", 2)):
        strategy = ["train.strategy=fsdp"] if name == "fsdp" else []
        proc = run_dparallel(["train", *args, *strategy, f"run_dir={tmp_path / name}"], nproc=nproc)
        assert proc.returncode == 0, proc.stderr[-3000:]
        rows = list(csv.DictReader((tmp_path / name / "logs" / "version_0" / "metrics.csv").open()))
        curves[name] = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
        weights[name] = torch.load(tmp_path / name / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert len(curves["one"]) == 3
    assert curves["one"][0] != curves["one"][-1]  # it trained
    assert curves["ddp"] == pytest.approx(curves["one"], abs=1e-4)
    assert curves["fsdp"] == pytest.approx(curves["ddp"], abs=1e-4)
    assert weights["fsdp"].keys() == weights["ddp"].keys()  # full, unsharded names: resumable under either
    for key, value in weights["ddp"].items():
        torch.testing.assert_close(weights["fsdp"][key], value, atol=1e-4, rtol=1e-3)
