"""Single-layer joint sampler: hidden-state access, training windows, the pinned loss, a tiny fit whose held-out KL
falls into a loadable component, the `joint` and `marginal` rules (k = 1 is sequential by entropy; an untrained
sampler is the marginal; NFE = ceil(W / k) per block; batched == unbatched; caches; temperature) and bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import fresh_process_tokens
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

import dparallel
from dparallel.adapters.base import position_ids_from_mask
from dparallel.commands.export import export_run
from dparallel.commands.recipe import load_recipe
from dparallel.commands.train import train
from dparallel.core.errors import DParallelError
from dparallel.data.trajectory import state_at
from dparallel.engine.config import DecodeConfig
from dparallel.engine.decoder import Decoder
from dparallel.samplers.joint import JointRule, new_sampler
from dparallel.samplers.joint_data import Windows, masked_kl, windows_of
from dparallel.samplers.joint_train import joint_loss

GEN, BLOCK = 16, 8
PROMPTS = ["copy: abcdefghijklmnopqr\n", "18 distinct lowercase:\n", "sort: zyxwvutsrqponmlkji\n"]


pytestmark = pytest.mark.usefixtures("one_thread")


# ---- hidden states --------------------------------------------------------------------------------------------
def test_hidden_states_give_the_logits_on_every_forward_path(teacher):
    adapter = teacher.adapter
    x = torch.randint(3, 90, (2, 12))
    attn = torch.ones_like(x)
    attn[0, :3] = 0
    logits, hidden = adapter.logits_and_hidden(x, attn)
    assert hidden.shape == (2, 12, 192) and torch.equal(adapter.output_head()(hidden), logits)
    with adapter.capture_hidden() as cap:
        full, layers = adapter.prefill(x, attn)
    assert torch.equal(cap.hidden, hidden) and torch.equal(full, logits)
    with adapter.capture_hidden() as cap:
        part = adapter.extend(
            x[:, 8:], position_ids_from_mask(attn)[:, 8:], attn, [(k[:, :, :8], v[:, :, :8]) for k, v in layers]
        )
    assert cap.hidden.shape == (2, 4, 192) and torch.allclose(adapter.output_head()(cap.hidden), part)
    layer, _, config = adapter.stock_layer_class(adapter.model.config)
    assert layer is LlamaDecoderLayer and config.num_hidden_layers == 1 and config.hidden_size == 192


# ---- training windows and the loss ----------------------------------------------------------------------------
def hand_record():
    # G = 8, W = 4, one token per step: block 0 takes steps 0-3, block 1 steps 4-7
    return {
        "prompt_ids": np.array([5, 6]),
        "tokens": np.array([10, 11, 12, 13, 20, 21, 22, 23]),
        "order": np.array([2, 0, 3, 1, 4, 7, 5, 6]),
    }


def test_windows_and_their_states_are_exact():
    r = hand_record()
    # (step, window start, max depth): step s can be unrolled until the block's last step
    assert windows_of(r, 4, 2).tolist() == [[0, 0, 2], [1, 0, 2], [2, 0, 1], [4, 4, 2], [5, 4, 2], [6, 4, 1]]
    windows = Windows([r], 4, 2)
    batch = windows.batch(np.array([1, 3]), 2, mask_id=1, pad_id=0)
    assert batch["x"][0].tolist() == [5, 6, *state_at(r["tokens"], r["order"], 1, 1).tolist()]
    assert batch["target"][1].tolist() == [5, 6, *state_at(r["tokens"], r["order"], 6, 1).tolist()]
    assert batch["columns"].tolist() == [[2, 3, 4, 5], [6, 7, 8, 9]]
    assert batch["states"][0].tolist() == [[1, 11, 1, 13], [10, 11, 1, 13]]  # x_2 and x_3 of block 0
    assert batch["states"][1].tolist() == [[20, 1, 1, 1], [20, 1, 22, 1]]  # x_5 and x_6 of block 1


def test_loss_starts_at_the_marginal_and_is_pinned(teacher):
    adapter = teacher.adapter
    adapter.model.requires_grad_(False)  # as JointSamplerModule: only the sampler layer trains
    batch = Windows([hand_record()], 4, 2).batch(np.array([0, 1, 3, 4]), 2, mask_id=1, pad_id=0)
    torch.manual_seed(0)
    sampler = new_sampler(adapter)
    out = joint_loss(sampler, adapter, batch)
    assert out["kl"].item() == out["kl_marginal"].item()  # the output norm starts at zero: h = the base hidden
    torch.nn.init.constant_(sampler.norm_out.weight, 0.5)
    out = joint_loss(sampler, adapter, batch)
    assert out["kl"].item() == pytest.approx(2.4831, abs=1e-4)
    assert out["error"].item() == pytest.approx(2.4412, abs=1e-4)  # Huber, at each window's lowest-entropy mask
    out["kl"].backward()
    assert sampler.fuse.weight.grad.abs().sum() > 0  # gradients reach the layer through the frozen LM head
    sampler.zero_grad(set_to_none=True)
    joint_loss(sampler, adapter, batch)["error"].backward()  # the error head reads detached hidden states
    assert sampler.fuse.weight.grad is None and sampler.error_head[0].weight.grad.abs().sum() > 0
    p, q = torch.tensor([[[2.0, 0.0, 1.0]]]), torch.tensor([[[0.0, 0.0, 0.0]]])
    expected = torch.tensor([2.0, 1.0]).softmax(-1) @ (torch.tensor([2.0, 1.0]).log_softmax(-1) - math.log(0.5))
    assert masked_kl(p, q, torch.tensor([[True]]), mask_id=1).item() == pytest.approx(expected.item())


# ---- a tiny fit: held-out KL falls, export round trip ---------------------------------------------------------
SEQUENTIAL = Path(__file__).parent / "fixtures" / "trajectories-sequential"  # the tiny teacher, gen 32, block 32


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny fit on the shipped sequential trajectories of the tiny teacher (recorded with rule=marginal k=1)."""
    run = tmp_path_factory.mktemp("joint") / "run"
    cfg = load_recipe(
        "recipes/tiny/joint.yaml",
        [
            f"run_dir={run}", "model.device=cpu", f"joint.trajectories={SEQUENTIAL}", "joint.block_length=32",
            "joint.depth=3", "joint.val_fraction=0.2", "joint.val_by=windows", "joint.val_windows=48",
            "joint.eval_every=10",
            "train.max_steps=30", "train.global_batch_size=8", "train.lr=3e-3", "train.warmup_steps=0",
            "train.schedule=constant", "train.log_every=1", f"decode.gen_length={GEN}", f"decode.block_length={BLOCK}",
        ],
    )  # fmt: skip
    return run, train(cfg)


def test_held_out_kl_falls_and_the_component_round_trips(trained):
    run, model_dir = trained
    header = (run / "logs" / "version_0" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train/loss", "val/kl", "val/kl_marginal"} <= set(header)
    manifest = json.loads((model_dir / "dparallel.json").read_text())
    assert manifest["component"] == "joint"
    assert manifest["decoding"] == {"rule": "joint", "k": 4, "gen_length": GEN, "block_length": BLOCK}
    metrics = manifest["metrics"]
    assert metrics["val_kl_start"] == pytest.approx(metrics["val_kl_marginal"])  # untrained: the marginal
    assert metrics["val_kl_end"] < metrics["val_kl_start"]  # held-out windows: the KL falls
    assert [s for s, _ in metrics["val_kl_curve"]] == [0, 10, 20, 30]
    assert not (model_dir / "model.safetensors").exists()  # the sampler layer only, never the base
    before = [o.tokens for o in dparallel.load(str(model_dir), device="cpu").generate(PROMPTS)]
    exported = export_run(run)
    assert json.loads((exported / "dparallel.json").read_text())["decoding"]["rule"] == "joint"
    assert fresh_process_tokens(exported, PROMPTS) == before  # its defaults: rule joint, k 4, gen 16, block 8


def test_head_only_refit_moves_the_error_head_alone(trained, tmp_path):
    """joint.init + joint.head_only: a short refit of a trained component changes its error head, not its layer
    (so its tokens at a fixed k are the same); head_only without init is refused in one line."""
    from safetensors.torch import load_file

    _, model_dir = trained
    overrides = [
        f"run_dir={tmp_path / 'refit'}", "model.device=cpu", f"joint.trajectories={SEQUENTIAL}", "joint.depth=3",
        "joint.val_windows=8", "train.max_steps=5", "train.global_batch_size=8", "train.warmup_steps=0",
        f"decode.gen_length={GEN}", f"decode.block_length={BLOCK}",
    ]  # fmt: skip
    refit = train(
        load_recipe("recipes/tiny/joint.yaml", [*overrides, f"joint.init={model_dir}", "joint.head_only=true"])
    )
    old, new = load_file(str(model_dir / "joint.safetensors")), load_file(str(refit / "joint.safetensors"))
    moved = sorted(k for k in old if not torch.equal(old[k], new[k]))
    assert moved and all(k.startswith("error_head.") for k in moved)
    with pytest.raises(DParallelError, match="joint.head_only=true refits the error head .*set joint.init"):
        train(load_recipe("recipes/tiny/joint.yaml", [*overrides, "joint.head_only=true"]))


# ---- the rules ------------------------------------------------------------------------------------------------
def sequential_by_entropy(adapter, prompt: str) -> list[int]:
    """The reference: one full forward per token, committing the lowest-entropy masked position of the block."""
    ids = adapter.encode([prompt])[0]
    x = torch.tensor([ids + [adapter.ids.mask] * GEN])
    with torch.no_grad():
        return _sequential(adapter, x, len(ids))


def _sequential(adapter, x: torch.Tensor, width: int) -> list[int]:
    for lo in range(width, width + GEN, BLOCK):
        for _ in range(BLOCK):
            logits = adapter.logits(x, torch.ones_like(x))[0, lo : lo + BLOCK]
            logits[:, adapter.ids.mask] = float("-inf")
            probs = logits.softmax(-1)
            entropy = -torch.special.xlogy(probs, probs).sum(-1)
            entropy = entropy.masked_fill(x[0, lo : lo + BLOCK] != adapter.ids.mask, float("inf"))
            i = int(entropy.argmin())
            x[0, lo + i] = logits[i].argmax()
    return x[0, width:].tolist()


@pytest.fixture(scope="module")
def joint_gen(trained):
    return dparallel.load(str(trained[1]), device="cpu")


def test_k1_is_sequential_by_entropy(joint_gen):
    for prompt in PROMPTS[:2]:
        want = sequential_by_entropy(joint_gen.adapter, prompt)
        for rule in ("joint", "marginal"):
            out = joint_gen.generate([prompt], rule=rule, k=1, gen_length=GEN, block_length=BLOCK)[0]
            assert out.tokens == want and out.stats.nfe == GEN and out.stats.sampler_calls == 0


@pytest.mark.parametrize("k", [2, 3, 8])
def test_k_per_forward_nfe_and_sampler_calls(joint_gen, k):
    per_block = math.ceil(BLOCK / k)
    for rule, calls in (("marginal", 0), ("joint", (GEN // BLOCK) * (BLOCK - per_block))):
        outs = joint_gen.generate(PROMPTS, rule=rule, k=k, gen_length=GEN, block_length=BLOCK)
        for o in outs:
            assert o.stats.nfe == (GEN // BLOCK) * per_block and joint_gen.adapter.ids.mask not in o.tokens
            assert o.stats.sampler_calls == calls  # k - 1 refreshes per forward, none after a block's last token
            assert sorted(np.bincount(o.order).tolist())[-1] <= k


def test_entropy_budget_makes_k_a_cap(joint_gen):
    """Under a vanishing budget k = 8 commits one token per forward (plus any of float32 entropy 0), so its tokens
    are sequential's; an unbounded budget is plain k; in between a forward commits 1..k tokens, rows stay
    independent (batched == unbatched) and joint refreshes only rows still committing."""
    opts = dict(gen_length=GEN, block_length=BLOCK)

    def seen(outs):
        return [(o.tokens, o.stats.nfe, o.stats.sampler_calls) for o in outs]

    for rule in ("marginal", "joint"):
        seq = joint_gen.generate(PROMPTS, rule=rule, k=1, **opts)
        tight = joint_gen.generate(PROMPTS, rule=rule, k=8, entropy_budget=1e-30, **opts)
        assert [o.tokens for o in tight] == [o.tokens for o in seq]
        plain = joint_gen.generate(PROMPTS, rule=rule, k=8, **opts)
        loose = joint_gen.generate(PROMPTS, rule=rule, k=8, entropy_budget=1e9, **opts)
        assert seen(loose) == seen(plain)
    mid = joint_gen.generate(PROMPTS, rule="joint", k=8, entropy_budget=2.0, **opts)
    for prompt, o in zip(PROMPTS, mid):
        assert seen(joint_gen.generate([prompt], rule="joint", k=8, entropy_budget=2.0, **opts)) == seen([o])
        # each forward commits c tokens after c - 1 refreshes, plus one more refresh where the budget closed it
        assert 2 < o.stats.nfe <= GEN and GEN - o.stats.nfe <= o.stats.sampler_calls <= GEN
        assert joint_gen.adapter.ids.mask not in o.tokens
    # pinned on the tiny fit: the confident copy and sort rows take 3-4 forwards, the distinct row one token each
    assert [(o.stats.nfe, o.stats.sampler_calls) for o in mid] == [(4, 14), (16, 14), (3, 14)]


def test_kl_budget_stops_where_the_error_head_predicts_error(joint_gen):
    """The error head's predicted KL is > 0, so a vanishing KL budget is sequential decoding, one token a forward;
    an unbounded one is plain k; marginal decoding has no head and refuses the option."""
    opts = dict(gen_length=GEN, block_length=BLOCK)
    seq = joint_gen.generate(PROMPTS, rule="joint", k=1, **opts)
    tight = joint_gen.generate(PROMPTS, rule="joint", k=8, kl_budget=1e-30, **opts)
    assert [(o.tokens, o.stats.nfe) for o in tight] == [(o.tokens, GEN) for o in seq]
    plain = joint_gen.generate(PROMPTS, rule="joint", k=8, **opts)
    loose = joint_gen.generate(PROMPTS, rule="joint", k=8, kl_budget=1e9, **opts)
    assert [(o.tokens, o.stats.nfe) for o in loose] == [(o.tokens, o.stats.nfe) for o in plain]
    mid = joint_gen.generate(PROMPTS, rule="joint", k=8, kl_budget=0.05, **opts)
    # pinned on the tiny fit: 5-7 forwards for 16 tokens, where the head lets some forwards commit several
    assert [(o.stats.nfe, o.stats.sampler_calls) for o in mid] == [(7, 14), (7, 14), (5, 14)]
    with pytest.raises(DParallelError, match="kl_budget=0.1 needs the joint rule .*set rule=joint"):
        joint_gen.generate(PROMPTS, rule="marginal", k=8, kl_budget=0.1, **opts)


def test_untrained_sampler_is_the_marginal(teacher):
    adapter = teacher.adapter
    rule = JointRule(new_sampler(adapter), adapter, k=4, temperature=0.0, eos_inf=False)
    ids = adapter.encode(PROMPTS)
    cfg = DecodeConfig(rule="marginal", k=4, gen_length=GEN, block_length=BLOCK)
    joint, _, stats = Decoder(adapter, cfg, rule=rule).run(ids)
    marginal, _, _ = Decoder(adapter, cfg).run(ids)
    assert torch.equal(joint, marginal) and stats[0].sampler_calls == 12


def test_batched_equals_unbatched_and_caches_run(joint_gen):
    opts = dict(rule="joint", k=4, gen_length=GEN, block_length=BLOCK)
    batched = joint_gen.generate(PROMPTS, **opts)
    for prompt, b in zip(PROMPTS, batched):
        alone = joint_gen.generate([prompt], **opts)[0]
        assert alone.tokens == b.tokens and alone.stats.sampler_calls == b.stats.sampler_calls
    for cache in ("prefix", "dual"):
        for o in joint_gen.generate(PROMPTS, cache=cache, **opts):
            assert o.stats.nfe == 4 and o.stats.sampler_calls == 12 and joint_gen.adapter.ids.mask not in o.tokens
    hot = [o.tokens for o in joint_gen.generate(PROMPTS, temperature=1.0, seed=3, **opts)]
    assert hot == [o.tokens for o in joint_gen.generate(PROMPTS, temperature=1.0, seed=3, **opts)]  # seeded


def test_bad_k_and_missing_component(teacher, joint_gen):
    with pytest.raises(DParallelError, match="k=0 tokens per full forward must be between 1 and block_length=8"):
        teacher.generate(["copy: a\n"], rule="marginal", k=0, gen_length=GEN, block_length=BLOCK)
    with pytest.raises(DParallelError, match="k=9 tokens per full forward must be between 1 and block_length=8"):
        joint_gen.generate(["copy: a\n"], rule="joint", k=9, gen_length=GEN, block_length=BLOCK)
    with pytest.raises(DParallelError, match="`joint` a joint sampler"):
        teacher.generate(["copy: a\n"], rule="joint")
    with pytest.raises(DParallelError, match="cfg_scale"):
        joint_gen.generate(["copy: a\n"], rule="joint", cfg_scale=1.0, gen_length=GEN, block_length=BLOCK)


def test_training_refuses_parallel_trajectories(tmp_path):
    from dparallel.samplers.joint_data import check_sequential, load_sequential_records

    check_sequential([2, 0, 1], 3, "t")
    with pytest.raises(DParallelError, match="t is not a sequential trajectory.*decode.rule=marginal decode.k=1"):
        check_sequential([1, 0, 0], 2, "t")  # two tokens at step 0
    assert len(load_sequential_records("tests/fixtures/trajectories-tiny", None)[0]) == 4  # topk, one per step
    with pytest.raises(DParallelError, match="no trajectories at"):
        load_sequential_records(str(tmp_path / "none"), None)


def test_recipes():
    tiny = load_recipe("recipes/tiny/joint.yaml")
    assert (tiny.method, tiny.decode.rule, tiny.decode.k, tiny.decode.gen_length, tiny.decode.block_length) == (
        "joint", "joint", 4, 32, 32,
    )  # fmt: skip
    for path in ("recipes/llada-8b/joint.yaml", "recipes/dream-7b/joint.yaml"):
        cfg = load_recipe(path)
        assert (cfg.train.lr, cfg.train.global_batch_size, cfg.train.precision) == (5e-5, 32, "bf16-mixed")
