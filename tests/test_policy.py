"""RL unmasking policy: the network's shape and slow start, rewards, advantages, the PPO-clip loss, the `policy`
rule (forced argmax, batch invariance), a tiny GRPO fit into a component that a fresh process loads, and running a
policy at a gen length it was not trained at."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from conftest import fresh_process_tokens
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

import dparallel
from dparallel.commands.export import export_run
from dparallel.commands.recipe import load_recipe
from dparallel.commands.train import train
from dparallel.core.errors import DParallelError
from dparallel.data.suite import make_example
from dparallel.engine.config import DecodeConfig
from dparallel.engine.decoder import Decoder
from dparallel.engine.rules import Confidence, Proposal, StepContext
from dparallel.samplers.config import PolicyConfig
from dparallel.samplers.policy import PolicyRule, UnmaskingPolicy, bernoulli_log_prob
from dparallel.samplers.policy_train import (
    UnmaskingPolicyModule,
    group_advantages,
    mixture_log_prob,
    new_policy,
    ppo_clip_loss,
    rewards,
)

PROMPTS = ["copy: abcdefghijklmnopqr\n", "reverse: qwertyuiopasdfgh\n", "sum: 3 7 5 8\n", "chain: 7 +5 *2 -3\n"]


pytestmark = pytest.mark.usefixtures("one_thread")


def random_policy(seed: int = 0, std: float = 2.0, features: tuple[str, ...] = ("conf",)) -> UnmaskingPolicy:
    """A policy whose head reads its features (the fresh head is zero: every logit is the bias)."""
    torch.manual_seed(seed)
    policy = UnmaskingPolicy(features)
    torch.nn.init.normal_(policy.head.weight, std=std)
    torch.nn.init.normal_(policy.modulation[1].weight, std=0.05)
    return policy.eval()


# ---- the network ---------------------------------------------------------------------------------------------
def test_parameter_count_and_slow_start():
    policy = UnmaskingPolicy()
    assert sum(p.numel() for p in policy.parameters()) == 314_369  # d 128, FFN 512, 2 heads, one max-prob feature
    assert sum(p.numel() for p in UnmaskingPolicy(["conf", "entropy"], topk=3).parameters()) == 314_369 + 4 * 128
    torch.manual_seed(0)
    logits = policy(torch.rand(3, 40, 1), torch.rand(3, 40) < 0.5, torch.rand(3))
    assert torch.equal(logits, torch.full((3, 40), -2.0))  # sigmoid(-2) ~ 0.119 everywhere, whatever the state
    assert math.isclose(float(torch.sigmoid(logits[0, 0].detach())), 1 / (1 + math.e**2), rel_tol=1e-6)


def test_features_read_committed_positions_as_certain():
    policy = UnmaskingPolicy(["conf", "entropy", "margin"], topk=2)
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]]])
    feats = policy.features_of(logits, torch.tensor([[True, False]]))
    p = torch.softmax(torch.tensor([2.0, 0.0, 0.0]), 0)
    entropy = float(-(p * p.log()).sum())
    want = torch.tensor([[[p[0], entropy, p[0] - p[1], p[0], p[1]], [1.0, 0.0, 1.0, 1.0, 0.0]]])
    assert torch.allclose(feats, want)
    with pytest.raises(DParallelError, match="policy.features"):
        UnmaskingPolicy(["loss"])


def test_conflict_features_see_repeats_and_clashes_on_the_canvas():
    """Canvas [committed 'a', masked -> 'a' (repeat), masked -> 'b' at 0.9, masked -> 'b' at 0.6 (clash),
    committed 'c']: the policy reads the same conflicts as the filter, committed positions read none."""
    policy = UnmaskingPolicy(["conf", "repeat", "clash"])
    rows = [[5.0, 0.0, 0.0], [4.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.5, 0.0], [0.0, 0.0, 5.0]]
    logits = torch.tensor([rows])  # [1, 5, 3]: the argmax proposals are a, a, b, b, c
    masked = torch.tensor([[False, True, True, True, False]])
    feats = policy.features_of(logits, masked, torch.tensor([[0, 9, 9, 9, 2]]), logits.argmax(-1))
    assert feats[0, :, 1].tolist() == [0.0, 1.0, 0.0, 0.0, 0.0]  # repeat: only position 1 ('a' is committed)
    assert feats[0, :, 2].tolist() == [0.0, 0.0, 0.0, 1.0, 0.0]  # clash: the less confident 'b'
    assert feats[0, [0, 4], 0].tolist() == [1.0, 1.0]  # committed: certain


# ---- rewards, advantages, the loss ---------------------------------------------------------------------------
def test_rewards_multiplicative_and_additive():
    correct = torch.tensor([True, True, False, True])
    steps = torch.tensor([16, 128, 4, 200])  # 200 > L: clamped to L in the multiplicative reward
    assert rewards(correct, steps, 128, 1.0, "multiplicative").tolist() == [113 / 128, 1 / 128, 0.0, 1 / 128]
    assert rewards(correct, steps, 128, 3.0, "multiplicative").tolist()[0] == (113 / 128) ** 3
    assert rewards(correct, steps, 128, 0.0, "multiplicative").tolist() == [1.0, 1.0, 0.0, 1.0]
    assert rewards(correct, steps, 128, 1.0, "additive").tolist() == [0.875, 0.0, -0.03125, 1 - 200 / 128]
    with pytest.raises(DParallelError, match="policy.reward"):
        rewards(correct, steps, 128, 1.0, "exponential")


def test_group_advantages():
    r = torch.tensor([1.0, 0.0, 0.5, 0.5, 0.0, 0.0, 0.0, 1.0])
    assert group_advantages(r, 4).tolist() == [0.5, -0.5, 0.0, 0.0, -0.25, -0.25, -0.25, 0.75]
    std = torch.tensor([0.5**2 * 2 / 3, 0.25]).sqrt()  # unbiased std of each group
    normalised = group_advantages(r, 4, std_normalize=True)
    assert torch.allclose(normalised[:2], torch.tensor([0.5, -0.5]) / (std[0] + 1e-4))
    assert torch.allclose(normalised[4:], torch.tensor([-0.25, -0.25, -0.25, 0.75]) / (std[1] + 1e-4))


def test_advantages_group_policy_and_expert_rollouts_by_prompt():
    # 2 prompts x G = 2 policy rollouts (rows 0-3), then one expert rollout per prompt (rows 4-5)
    reward = torch.tensor([1.0, 0.0, 0.5, 0.5, 1.0, 0.0])
    adv = policy_module(group_size=2, expert_steering=True).advantages(reward, 2)
    assert torch.allclose(adv, torch.tensor([1 / 3, -2 / 3, 1 / 6, 1 / 6, 1 / 3, -1 / 3]))
    assert policy_module(group_size=2).advantages(reward[:4], 2).tolist() == [0.5, -0.5, 0.0, 0.0]


def test_ppo_clip_and_mixture_likelihood():
    new = torch.tensor([math.log(2.0), math.log(0.25), 0.3])
    old = torch.tensor([0.0, 0.0, 0.3])
    adv = torch.tensor([1.0, -1.0, 2.0])
    # rho = 2 (clipped to 1.5 for A > 0), 0.25 (clipped to 0.5: min(-0.25, -0.5) = -0.5 for A < 0), 1
    assert math.isclose(float(ppo_clip_loss(new, old, adv, 0.5)), -(1.5 - 0.5 + 2.0) / 3, rel_tol=1e-6)
    assert math.isclose(float(ppo_clip_loss(new, old, adv, 0.2)), -(1.2 - 0.8 + 2.0) / 3, rel_tol=1e-6)
    mix = mixture_log_prob(torch.tensor([math.log(0.5), math.log(0.5)]), torch.tensor([True, False]), 3)
    assert torch.allclose(mix, torch.tensor([0.75 * 0.5 + 0.25, 0.75 * 0.5]).log())


def test_bernoulli_log_prob_counts_eligible_positions_only():
    logits = torch.tensor([[0.0, 2.0, -1.0, 5.0]])
    action = torch.tensor([[True, False, True, True]])
    eligible = torch.tensor([[True, True, True, False]])
    want = math.log(0.5) + math.log(1 - 1 / (1 + math.exp(-2))) + math.log(1 / (1 + math.exp(1)))
    assert math.isclose(float(bernoulli_log_prob(logits, action, eligible)), want, rel_tol=1e-6)


def synthetic_rollout(seed: int = 0, n: int = 6, length: int = 12, w: int = 4) -> dict:
    g = torch.Generator().manual_seed(seed)
    eligible = torch.rand(n, w, generator=g) < 0.7
    eligible[:, 0] = True
    offset = torch.randint(0, length - w + 1, (n, 1), generator=g)
    return {
        "feats": torch.rand(n, length, 1, generator=g),
        "masked": torch.rand(n, length, generator=g) < 0.6,
        "time": torch.rand(n, generator=g),
        "window": offset + torch.arange(w),
        "action": (torch.rand(n, w, generator=g) < 0.3) & eligible,
        "eligible": eligible,
        "old_log_prob": -torch.rand(n, generator=g) * 3,
        "expert_match": torch.tensor([True, False] * (n // 2)),
        "row": torch.tensor([0, 0, 1, 2, 3, 3]),
    }


def policy_module(**overrides) -> UnmaskingPolicyModule:
    policy = {**OmegaConf.to_container(OmegaConf.structured(PolicyConfig)), **overrides}
    cfg = OmegaConf.create({"policy": policy, "train": {"seed": 0}})
    cfg.policy.temperature = 0.5
    return UnmaskingPolicyModule(cfg, SimpleNamespace(model=None), random_policy(1, std=0.05), [None], None)


def hand_log_prob(module: UnmaskingPolicyModule, roll: dict) -> torch.Tensor:
    """log pi(a|s) written out position by position (sigmoid, log, loops) to check the vectorised loss."""
    logits = module.policy(roll["feats"], roll["masked"], roll["time"]) / module.cfg.policy.temperature
    out = []
    for i in range(len(logits)):
        total = 0.0
        for j, pos in enumerate(roll["window"][i].tolist()):
            if roll["eligible"][i, j]:
                p = torch.sigmoid(logits[i, pos])
                total = total + (p.log() if roll["action"][i, j] else (1 - p).log())
        out.append(total)
    return torch.stack(out)


def test_policy_loss_pinned_on_a_fixed_seed():
    roll, adv = synthetic_rollout(), torch.tensor([1.0, -0.5, 0.25, -0.75])
    module = policy_module()
    lp = hand_log_prob(module, roll).detach()
    roll["old_log_prob"] = lp + 0.8 * torch.randn(len(lp), generator=torch.Generator().manual_seed(1))
    loss, parts = module.policy_loss(roll, adv)
    ratio, a = (lp - roll["old_log_prob"]).exp(), adv[roll["row"]]
    assert math.isclose(
        float(loss.detach()), float(-torch.minimum(ratio * a, ratio.clamp(0.5, 1.5) * a).mean()), rel_tol=1e-5
    )
    assert math.isclose(float(loss.detach()), 0.1433707, abs_tol=1e-6)
    assert parts["clip_frac"] == 0.0  # ratios 0.59 .. 1.44 sit inside 1 -+ 0.5
    loss.backward()  # gradients reach the policy
    assert module.policy.head.weight.grad.abs().sum() > 0
    steered, _ = policy_module(expert_steering=True, group_size=3).policy_loss(roll, adv)
    assert math.isclose(float(steered.detach()), -0.0281558, abs_tol=1e-6)
    with_kl, parts = policy_module(kl_coef=0.1).policy_loss(roll, adv)
    assert abs(parts["kl"]) < 1e-9 and math.isclose(with_kl.item(), loss.item(), rel_tol=1e-6)  # at the start pi = pi_0


# ---- the rule ------------------------------------------------------------------------------------------------
def hand_proposal(seed: int = 0, mask: int = 1, width: int = 2, length: int = 8, w: int = 4) -> Proposal:
    """Two rows, prompt width 2, canvas 8, active block = answer positions [0, 4)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(5, 20, (2, width + length), generator=g)
    x[:, width:] = mask
    x[0, width + 1] = 7  # row 0: position 1 of the block already committed
    x[1, width + 4] = 9  # row 1: a committed position outside the block
    logits = torch.randn(2, width + length, 30, generator=g)
    context = StepContext(x, torch.ones_like(x), width, logits, 0, (width, width + w), torch.tensor([3, 5]), g)
    block = slice(width, width + w)
    masked = x[:, block] == mask
    conf = logits[:, block].softmax(-1).max(-1).values.masked_fill(~masked, float("-inf"))
    return Proposal(logits[:, block].argmax(-1), conf, logits[:, block], masked, step=1, offset=0, context=context)


def test_policy_rule_forces_the_argmax_when_nothing_passes():
    p = hand_proposal()
    policy = random_policy(3)
    feats, masked, time = PolicyRule(policy, 1).state(p)
    assert feats.shape == (2, 8, 1) and time.tolist() == [3 / 8, 5 / 8]
    assert feats[0, 1, 0] == 1.0 and feats[1, 4, 0] == 1.0  # committed positions read as certain
    logits = policy(feats, masked, time)[:, :4]
    torch.nn.init.constant_(policy.head.bias, -50.0)  # nothing passes p > 0.5: the most probable masked one
    commit = PolicyRule(policy, 1).select(p)
    scores = (logits - 48.0).masked_fill(~p.masked, float("-inf"))  # the same ordering as the -50 bias
    assert commit.sum(1).tolist() == [1, 1] and commit[0, scores[0].argmax()] and commit[1, scores[1].argmax()]
    assert not commit[0, 1]  # never a committed position
    torch.nn.init.constant_(policy.head.bias, 50.0)
    assert torch.equal(PolicyRule(policy, 1).select(p), p.masked)  # every masked position of the block


def test_sampling_rule_records_its_actions_and_reproduces_from_a_seed():
    policy = random_policy(4, std=0.05)
    rule = PolicyRule(policy, 1, mode="sample", temperature=0.5, record=True, expert=Confidence(0.5))
    first = rule.select(hand_proposal(seed=5))
    again = PolicyRule(policy, 1, mode="sample", temperature=0.5).select(hand_proposal(seed=5))
    assert torch.equal(first, again)
    (step,) = rule.rollout.steps
    assert torch.equal(step["eligible"], hand_proposal(seed=5).masked) and step["offset"] == 0
    assert not (step["action"] & ~step["eligible"]).any() and (first | ~step["action"]).all()
    window = policy(step["feats"], step["masked"], step["time"])[:, :4] / 0.5
    assert torch.allclose(step["old_log_prob"], bernoulli_log_prob(window, step["action"], step["eligible"]))


def test_batched_equals_unbatched(teacher):
    ids = teacher.adapter.encode(PROMPTS)
    config = DecodeConfig(rule="policy", gen_length=32, block_length=32)

    policy = random_policy(4)
    torch.nn.init.constant_(policy.head.bias, 6.2)  # a bias at which it commits a few positions per step

    def run(rows):
        return Decoder(teacher.adapter, config, rule=PolicyRule(policy, teacher.adapter.ids.mask)).run(rows)

    tokens, order, stats = run(ids)
    nfe = [s.nfe for s in stats]
    assert nfe == [9, 9, 32, 26]  # several tokens per step on the letter tasks, ~one at a time on the arithmetic
    for i, row in enumerate(ids):
        one, one_order, one_stats = run([row])
        assert torch.equal(one[0], tokens[i]) and torch.equal(one_order[0], order[i]) and one_stats[0].nfe == nfe[i]


def test_conflict_features_decode_batched_equals_unbatched(teacher):
    """A policy that reads repeat/clash (the canvas's tokens, not only statistics) is batch invariant too; on the
    many-answers tasks (where the proposals clash) its commits hinge on the conflicts."""
    prompts = [
        make_example(task, "test", 0).prompt for task in ("shuffle", "distinct", "latin_square", "insert_random")
    ]
    ids = teacher.adapter.encode(prompts)
    config = DecodeConfig(rule="policy", gen_length=32, block_length=32)
    policy = random_policy(4, std=0.3, features=("conf", "repeat", "clash"))
    torch.nn.init.constant_(policy.head.bias, -1.0)

    def run(rows):
        return Decoder(teacher.adapter, config, rule=PolicyRule(policy, teacher.adapter.ids.mask)).run(rows)

    tokens, _, stats = run(ids)
    assert [s.nfe for s in stats] == [3, 4, 2, 10]  # the same head on `conf` alone: 32 steps each
    for i, row in enumerate(ids):
        one, _, one_stats = run([row])
        assert torch.equal(one[0], tokens[i]) and one_stats[0].nfe == stats[i].nfe


# ---- training, export, portability ---------------------------------------------------------------------------
def test_fit_two_steps_export_and_load_in_a_fresh_process(tmp_path, teacher):
    run = tmp_path / "run"
    cfg = load_recipe(
        "recipes/tiny/policy.yaml",
        [
            f"run_dir={run}", "model.device=cpu", "policy.source.suite.tasks=[copy,reverse]", "policy.gen_length=16",
            "policy.block_length=16", "policy.group_size=2", "policy.init_bias=0.0", "train.max_steps=2",
            "train.global_batch_size=1", "decode.gen_length=16", "decode.block_length=16",
            "train.warmup_steps=0", "train.log_every=1",
            "policy.features=[conf]", "policy.dim=128", "policy.ffn=512",  # random_policy()'s shape (written below)
        ],
    )  # fmt: skip
    model_dir = train(cfg)
    header = (run / "logs" / "version_0" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train/reward", "train/accuracy", "train/nfe", "train/unmask_rate", "train/loss"} <= set(header)
    manifest = json.loads((model_dir / "dparallel.json").read_text())
    assert manifest["component"] == "policy" and manifest["policy"]["dim"] == 128 and manifest["threshold"] == 0.9
    assert manifest["trained"]["gen_length"] == 16 and manifest["decoding"]["rule"] == "policy"
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    assert set(state) == {k for k in state if k.startswith("policy.")}  # the base is not in the checkpoint
    trained = new_policy(cfg.policy)
    trained.load_state_dict({k.removeprefix("policy."): v for k, v in state.items()})
    # Two updates on 1 prompt x 2 rollouts barely move a zero-initialised head; give it weights whose commits hinge
    # on every parameter (as a trained head's do) and write them where training left its own, so the round trip
    # below checks real numbers.
    weights = model_dir / "policy.safetensors"
    assert torch.equal(load_file(str(weights))["head.bias"], trained.head.bias.detach())
    trained = random_policy(4)
    torch.nn.init.constant_(trained.head.bias, 6.2)
    save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, str(weights))
    mask = teacher.adapter.ids.mask
    ids = teacher.adapter.encode(PROMPTS)
    config = DecodeConfig(rule="policy", gen_length=16, block_length=16)
    tokens, _, stats = Decoder(teacher.adapter, config, rule=PolicyRule(trained.eval(), mask)).run(ids)
    before = tokens.tolist()
    assert [s.nfe for s in stats] == [16, 13, 16, 16]  # several commits per step on one prompt, not all at once
    exported = export_run(run)
    assert fresh_process_tokens(exported, PROMPTS) == before  # its defaults: rule policy, gen 16, one block
    # trained at gen_length 16, the same weights decode a canvas of 32, one block or semi-AR blocks of 8
    gen = dparallel.load(str(exported), device="cpu")
    for block in (32, 8):
        out = gen.generate(PROMPTS, gen_length=32, block_length=block)
        assert all(len(o.tokens) == 32 and mask not in o.tokens and o.stats.nfe <= 32 for o in out)


def test_a_component_attaches_to_the_eval_model_as_to_its_own_base(tmp_path, teacher):
    """An eval decoder with ``component:`` (the policy on the eval's model) decodes exactly as one with ``model:``
    (the policy loaded onto the base its folder names), at the component's exported threshold unless the spec sets
    one; a folder that is not a component is refused."""
    from dparallel.commands.evaluate import decoder_points, evaluate
    from dparallel.engine.components import save_component

    policy = random_policy(4, std=0.3, features=("conf", "repeat", "clash"))
    torch.nn.init.constant_(policy.head.bias, -1.0)
    shape = {"features": ["conf", "repeat", "clash"], "topk": 0, "dim": 128, "ffn": 512, "heads": 2, "init_bias": -1.0}
    base = OmegaConf.create({"name": "p", "model": {"path": "builtin:tiny-teacher", "revision": None}})
    decoding = {"rule": "policy", "gen_length": 32, "block_length": 32}
    fields = {"policy": shape, "threshold": 0.2}
    save_component(tmp_path / "p", "policy", policy, teacher.adapter, base, fields, decoding)
    cfg = OmegaConf.create(
        {"suite": {"tasks": ["shuffle", "distinct"], "split": "test", "n_per_task": 2, "seed": 0}, "batch_size": 4}
    )
    cfg.decoders = [
        {"name": "own-base", "model": str(tmp_path / "p"), "rule": "policy"},
        {"name": "attached", "component": str(tmp_path / "p"), "rule": "policy"},
        {"name": "at-0.2", "component": str(tmp_path / "p"), "rule": "policy", "threshold": 0.2},
        {"name": "at-0.9", "component": str(tmp_path / "p"), "rule": "policy", "threshold": 0.9},
    ]
    rows = {(r["decoder"], r["task"]): r for r in evaluate(teacher, cfg, progress=False, load_model=dparallel.load)}
    for task in ("shuffle", "distinct", "macro"):
        own, attached = rows[("own-base", task)], rows[("attached", task)]
        assert (own["accuracy"], own["nfe"]) == (attached["accuracy"], attached["nfe"])
    # no threshold in the spec: the component's exported 0.2, not DecodeConfig's 0.9
    assert [rows[(name, "macro")]["nfe"] for name in ("attached", "at-0.2", "at-0.9")] == [3.75, 3.75, 32.0]
    cfg.reference = "own-base"
    point = decoder_points(cfg, "builtin:tiny-teacher")[1]
    assert (point["frontier"], point["kind"], point["model"]) == (
        f"policy@{tmp_path / 'p'}",
        "method",
        str(tmp_path / "p"),
    )
    with pytest.raises(DParallelError, match="is not a component"):
        teacher.with_component("builtin:tiny-teacher")


def test_policy_rule_needs_a_component(teacher):
    with pytest.raises(DParallelError, match="unknown decoding rule 'policy'"):
        teacher.generate(["copy: ab\n"], rule="policy", gen_length=16, block_length=16)
