"""The decoding engine: `topk` against a LLaDA reference oracle, batched == unbatched, rules, stats, config errors."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_shape
from omegaconf import OmegaConf

from dparallel.adapters.base import SpecialIds
from dparallel.adapters.load import load_adapter
from dparallel.adapters.tiny import TinyAdapter, new_tiny_adapter
from dparallel.core.errors import DParallelError
from dparallel.engine.config import DecodeConfig
from dparallel.engine.decoder import Decoder, add_gumbel_noise
from dparallel.engine.rules import Confidence, Entropy, Factor, LeftToRight, Proposal, TopK

SHAPE = tiny_shape()
PROMPTS = [[22, 23, 16, 28, 34], [77, 74, 81, 81, 84, 5, 92, 84, 87], [70, 71]]  # three lengths: left padding


pytestmark = pytest.mark.usefixtures("one_thread")


# ---- the LLaDA reference oracle (written from the semantics of LLaDA's public generate.py) -----------------------
def llada_generate(
    model_fn,
    prompt,
    attention_mask,
    steps,
    gen_length,
    block_length,
    temperature,
    cfg_scale,
    remasking,
    mask_id,
    eos_id,
    eot_id,
    logits_eos_inf,
    confidence_eos_eot_inf,
    topk=torch.topk,
):
    batch, plen = prompt.shape
    x = torch.cat([prompt, torch.full((batch, gen_length), mask_id, dtype=torch.long)], dim=1)
    attn = torch.cat([attention_mask, torch.ones((batch, gen_length), dtype=attention_mask.dtype)], dim=1)
    prompt_index = x != mask_id
    assert gen_length % block_length == 0
    num_blocks = gen_length // block_length
    assert steps % num_blocks == 0
    per_block = steps // num_blocks
    ties = 0  # steps where torch.topk had to choose among equal confidences (its order there is unspecified)
    for block in range(num_blocks):
        end = plen + (block + 1) * block_length
        n = (x[:, end - block_length : end] == mask_id).sum(dim=1, keepdim=True)
        num_transfer = torch.zeros((batch, per_block), dtype=torch.int64) + n // per_block
        for j in range(batch):
            num_transfer[j, : int(n[j, 0] % per_block)] += 1
        for i in range(per_block):
            mask_index = x == mask_id
            if cfg_scale > 0:
                un_x = x.clone()
                un_x[prompt_index] = mask_id
                cond, un = model_fn(torch.cat([x, un_x]), torch.cat([attn, attn])).chunk(2)
                logits = un + (cfg_scale + 1) * (cond - un)
            else:
                logits = model_fn(x, attn)
            if logits_eos_inf:
                logits[:, :, eos_id] = -torch.inf
            if temperature == 0:
                noisy = logits  # the very same tensor: LLaDA's EOS/EoT quirk below depends on it
            else:
                logits64 = logits.to(torch.float64)
                noisy = logits64.exp() / (-torch.log(torch.rand_like(logits64))) ** temperature
            x0 = noisy.argmax(dim=-1)
            if confidence_eos_eot_inf:
                noisy[:, :, eos_id] = logits[:, :, eot_id] = -torch.inf
            if remasking == "low_confidence":
                x0_p = torch.softmax(logits, dim=-1).gather(-1, x0.unsqueeze(-1)).squeeze(-1)
            elif remasking == "random":
                x0_p = torch.rand((batch, x.shape[1]))
            else:
                raise NotImplementedError(remasking)
            x0_p[:, end:] = -torch.inf
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, -torch.inf)
            transfer = torch.zeros_like(x0, dtype=torch.bool)
            for j in range(batch):
                k = int(num_transfer[j, i])
                _, index = topk(confidence[j], k=k)
                transfer[j, index] = True
                ranked = confidence[j].sort(descending=True).values
                ties += bool(k < len(ranked) and ranked[k - 1] == ranked[k] > -torch.inf)
            x[transfer] = x0[transfer]
    return x, ties


def lowest_index_topk(values, k):
    """torch.topk, except that equal values are taken lowest index first (torch.topk leaves that order unspecified:
    it changes with k, the row length and the device). The engine's documented tie rule."""
    ordered = values.sort(descending=True, stable=True)
    return ordered.values[:k], ordered.indices[:k]


class NoMaskTiny(TinyAdapter):
    """Like any trained dLLM, never proposes the mask token. (A random model does at T > 0; LLaDA then keeps that
    position masked and may commit it in a *later* block, while the engine only ever commits inside the active
    block: outside the semantics both sides share, so kept out of the comparison.)"""

    def _forward(self, input_ids, attention_mask):
        logits = super()._forward(input_ids, attention_mask)
        logits[:, :, self.ids.mask] = -1e4
        return logits


@pytest.fixture(scope="module")
def tiny():
    base = new_tiny_adapter(OmegaConf.create(SHAPE), seed=0)
    # EOS/EoT are tokens this random model often proposes, so the EOS/EoT options change its output.
    return NoMaskTiny(base.model.eval(), base.tokenizer, SpecialIds(mask=1, eos=43, eot=39, pad=0))


@pytest.fixture(scope="module")
def teacher():
    return load_adapter("builtin:tiny-teacher")


def left_pad(prompts, pad):
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def engine_and_oracle(adapter, prompts, topk=torch.topk, **options):
    cfg = DecodeConfig(rule="topk", **options)
    tokens, order, _ = Decoder(adapter, cfg).run(prompts)
    prompt, attn = left_pad(prompts, adapter.ids.pad)
    torch.manual_seed(cfg.seed)
    ref, ties = llada_generate(
        lambda ids, a: adapter.logits(ids, a),
        prompt,
        attn,
        steps=cfg.steps or cfg.gen_length,
        gen_length=cfg.gen_length,
        block_length=cfg.block_length,
        temperature=cfg.temperature,
        cfg_scale=cfg.cfg_scale,
        remasking=cfg.remasking,
        mask_id=adapter.ids.mask,
        eos_id=adapter.ids.eos,
        eot_id=adapter.ids.eot,
        logits_eos_inf=cfg.logits_eos_inf,
        confidence_eos_eot_inf=cfg.confidence_eos_eot_inf,
        topk=topk,
    )
    return tokens.tolist(), ref[:, prompt.shape[1] :].tolist(), order, ties


ORACLE_SETTINGS = {
    "T0-one-per-step": dict(gen_length=16, block_length=4),
    "T0-two-per-step": dict(gen_length=16, block_length=4, steps=8),
    "T0-uneven-schedule": dict(gen_length=16, block_length=8, steps=6),
    "random-remasking": dict(gen_length=16, block_length=8, remasking="random", seed=3),
    "T0.7": dict(gen_length=16, block_length=8, steps=8, temperature=0.7, seed=1),
    "T1": dict(gen_length=16, block_length=4, temperature=1.0, seed=2),
    "cfg": dict(gen_length=16, block_length=8, steps=8, cfg_scale=0.5),
    "logits-eos-inf": dict(gen_length=16, block_length=8, logits_eos_inf=True),
    "conf-eos-eot-inf-T0": dict(gen_length=16, block_length=8, confidence_eos_eot_inf=True),
    "conf-eos-eot-inf-T1": dict(gen_length=16, block_length=8, confidence_eos_eot_inf=True, temperature=1.0),
}


@pytest.mark.parametrize("name", ORACLE_SETTINGS)
def test_topk_matches_llada_reference(tiny, name):
    options = ORACLE_SETTINGS[name]
    ours, ref, order, ties = engine_and_oracle(tiny, PROMPTS, topk_ties="reference", **options)
    # Every EOS/EoT proposal gets confidence exactly 0 there, so LLaDA's output rests on torch.topk's own order
    # among equal values: topk_ties=reference makes the same call on the same row.
    assert (ties > 0) == (name == "conf-eos-eot-inf-T0")
    assert ours == ref
    assert tiny.ids.mask not in sum(ours, [])
    steps = options.get("steps", options["gen_length"])
    assert order.min() == 0 and order.max() == steps - 1  # every position committed, at a step that ran


def test_lowest_index_ties_match_llada_with_a_stable_topk(tiny):
    """The default topk_ties=lowest_index (batch-invariant, no host sync) is LLaDA with equal values taken lowest
    index first; it commits other positions than torch.topk where confidences tie."""
    options = ORACLE_SETTINGS["conf-eos-eot-inf-T0"]
    ours, ref, _, ties = engine_and_oracle(tiny, PROMPTS, topk=lowest_index_topk, **options)
    assert ties > 0 and ours == ref
    assert ours != engine_and_oracle(tiny, PROMPTS, topk_ties="reference", **options)[0]


@pytest.mark.parametrize(
    "options",
    [dict(gen_length=32, block_length=32), dict(gen_length=32, block_length=8, steps=16), dict(gen_length=32, steps=8)],
)
def test_topk_matches_llada_verbatim_where_the_teacher_ties(teacher, options):
    """A trained model's float32 confidences saturate at exactly 1.0: torch.topk breaks those ties its own way, and
    topk_ties=reference reproduces LLaDA's generate (its own torch.topk call) token for token."""
    prompts = teacher.encode(TEACHER_PROMPTS)
    ours, ref, _, ties = engine_and_oracle(teacher, prompts, topk_ties="reference", **options)
    assert ties > 0
    assert ours == ref


def test_oracle_options_change_the_output(tiny):
    """The options above are not silently inert on this model (else their oracle checks would prove nothing)."""

    def decode(**options):
        return Decoder(tiny, DecodeConfig(gen_length=16, block_length=8, **options)).run(PROMPTS)[0].tolist()

    plain = decode()
    for option in (dict(logits_eos_inf=True), dict(confidence_eos_eot_inf=True), dict(cfg_scale=0.5)):
        assert decode(**option) != plain, option
    assert decode(temperature=1.0) != plain != decode(remasking="random")


PINNED = [
    [16, 92, 35, 70, 97, 32, 82, 73, 17, 72, 68, 43, 61, 76, 56, 38],
    [10, 8, 45, 31, 61, 32, 87, 92, 63, 61, 85, 63, 15, 13, 62, 5],
    [13, 63, 5, 82, 21, 28, 79, 62, 68, 39, 62, 52, 56, 79, 72, 20],
]


def test_topk_pinned_output(tiny):
    ours, ref, _, _ = engine_and_oracle(tiny, PROMPTS, **ORACLE_SETTINGS["T0.7"])
    assert ours == ref == PINNED


def test_proposal_is_llada_gumbel_max_and_softmax_confidence(tiny):
    logits = torch.randn(2, 6, 100, generator=torch.Generator().manual_seed(0)) * 3
    logits[..., tiny.ids.mask] = -torch.inf  # the engine never proposes the mask token
    masked = torch.ones(2, 6, dtype=torch.bool)
    masked[:, :2] = False
    sampler = Decoder(tiny, DecodeConfig(temperature=0.7))
    tokens, conf = sampler._propose(logits, logits[..., 0], masked, torch.Generator().manual_seed(5))
    torch.manual_seed(5)
    logits64 = logits.to(torch.float64)
    noisy = logits64.exp() / (-torch.log(torch.rand_like(logits64))) ** 0.7
    assert torch.equal(add_gumbel_noise(logits, 0.7, torch.Generator().manual_seed(5)), noisy)  # float64 throughout
    assert torch.equal(tokens, noisy.argmax(-1)) and not torch.equal(tokens, logits.argmax(-1))
    expected = logits.softmax(-1).gather(-1, tokens[..., None])[..., 0].masked_fill(~masked, -torch.inf)
    assert torch.equal(conf, expected)


def test_generator_draws_equal_global_rng():
    torch.manual_seed(7)
    gumbel, remask = torch.rand_like(torch.zeros(2, 5, 11, dtype=torch.float64)), torch.rand((2, 5))
    gen = torch.Generator().manual_seed(7)
    assert torch.equal(gumbel, torch.rand((2, 5, 11), dtype=torch.float64, generator=gen))
    assert torch.equal(remask, torch.rand((2, 5), dtype=torch.float32, generator=gen))


# ---- batched == unbatched (left padding + attention mask) on the trained teacher ----------------------------------
TEACHER_PROMPTS = ["reverse: qwertyuiopasdfgh\n", "sum: 3 7 5\n", "shuffle: abcdefghijkl\n"]
RULES = {
    "topk": dict(rule="topk"),
    "confidence": dict(rule="confidence", threshold=0.9),
    "entropy": dict(rule="entropy", threshold=0.5),
    "factor": dict(rule="factor", factor=1.0),
    "ltr": dict(rule="ltr", threshold=0.9),
}


@pytest.mark.parametrize("rule", RULES)
def test_batched_equals_unbatched(teacher, rule):
    prompts = teacher.encode(TEACHER_PROMPTS)
    assert len({len(p) for p in prompts}) == 3
    cfg = DecodeConfig(gen_length=32, block_length=8, **RULES[rule])
    tokens, order, stats = Decoder(teacher, cfg).run(prompts)
    for i, prompt in enumerate(prompts):
        alone, alone_order, alone_stats = Decoder(teacher, cfg).run([prompt])
        assert tokens[i].tolist() == alone[0].tolist()
        assert stats[i].nfe == alone_stats[0].nfe
        assert order[i].tolist() == alone_order[0].tolist()  # the recorded trajectory does not depend on the batch
        assert order[i].max() == stats[i].nfe - 1
    if rule != "topk":
        assert len({s.nfe for s in stats}) > 1  # rows finish at different steps: per-row NFE is really per row


# ---- rules on hand-made proposals ---------------------------------------------------------------------------------
def proposal(confidence, masked, logits=None, step=0):
    confidence, masked = torch.tensor(confidence), torch.tensor(masked, dtype=torch.bool)
    if logits is None:
        logits = torch.zeros(*confidence.shape, 4)
    return Proposal(torch.zeros(confidence.shape, dtype=torch.long), confidence, logits, masked, step)


def test_confidence_rule():
    p = proposal(
        [[0.95, 0.5, 0.99, 0.9, 0.2], [0.3, 0.6, 0.1, 0.97, 0.2], [0.99, 0.99, 0.99, 0.99, 0.99]],
        [[1, 1, 0, 1, 1], [1, 1, 1, 0, 1], [0, 0, 0, 0, 0]],
    )
    commit = Confidence(0.9).select(p)
    # >= tau (0.9 itself included), never the unmasked 0.99/0.97; the best masked one when none passes; none if done.
    assert commit.int().tolist() == [[1, 0, 0, 1, 0], [0, 1, 0, 0, 0], [0, 0, 0, 0, 0]]


def test_ltr_rule_commits_left_to_right_through_a_confident_run():
    p = proposal(
        [[0.2, 0.95, 0.9, 0.5, 0.99], [0.99, 0.3, 0.97, 0.99, 0.99], [0.1, 0.99, 0.99, 0.99, 0.1], [0.9] * 5],
        [[1, 1, 1, 1, 1], [0, 1, 1, 0, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]],
    )
    commit = LeftToRight(0.9).select(p)
    # row 0: the leftmost (0.2, always) then 0.95, 0.9 (tau itself passes); 0.5 ends the run, so the later 0.99 waits.
    # row 1: the unmasked 0.99 is skipped; the leftmost masked is 0.3; 0.97 follows; the committed slot ends the run.
    # row 2: a confident run after the leftmost; row 3: nothing masked, nothing committed.
    assert commit.int().tolist() == [[1, 1, 1, 0, 0], [0, 1, 1, 0, 0], [1, 1, 1, 1, 0], [0, 0, 0, 0, 0]]
    assert Confidence(0.9).select(p)[0].int().tolist() == [0, 1, 1, 0, 1]  # the any-order rule takes the later 0.99


def test_entropy_rule():
    peaks = torch.tensor([[10.0, 0.0, 20.0, 5.0, 1.0], [0.0, 1.0, 0.5, 30.0, 0.2]])
    logits = torch.zeros(2, 5, 4)
    logits[..., 0] = peaks
    masked = [[1, 1, 0, 1, 1], [1, 1, 1, 0, 1]]
    logp = logits.log_softmax(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    assert (entropy[0, [0, 3]] < 0.5).all() and (entropy[0, [1, 4]] > 0.5).all() and (entropy[1] > 0.5).sum() == 4
    commit = Entropy(0.5).select(proposal([[0.0] * 5] * 2, masked, logits))  # confidence plays no part
    # row 0: the two low-entropy masked positions (not the unmasked, lowest one); row 1: only the lowest masked one
    assert commit.int().tolist() == [[1, 0, 0, 1, 0], [0, 1, 0, 0, 0]]


def factor_count(confidences, f):
    """Longest prefix of the descending confidences with (n + 1)(1 - c_n) <= f for all its n (1-based); >= 1."""
    c, n = sorted(confidences, reverse=True), 0
    while n < len(c) and (n + 2) * (1 - c[n]) <= f:
        n += 1
    return max(n, 1)


@pytest.mark.parametrize("f, expected", [(1.0, 3), (2.0, 4), (0.01, 1), (10.0, 5)])
def test_factor_rule(f, expected):
    conf = [0.75, 0.1, 1.0, 0.99, 0.7, 0.9]  # masked, sorted: 0.99 0.9 0.75 0.7 0.1; n=3 sits exactly on f=1
    masked = [1, 1, 0, 1, 1, 1]
    assert factor_count([c for c, m in zip(conf, masked) if m], f) == expected
    commit = Factor(f).select(proposal([conf], [masked]))[0]
    best_first = [3, 5, 0, 4, 1]
    assert commit.nonzero().flatten().tolist() == sorted(best_first[:expected])


def test_factor_fast_dllm_mode_commits_all_when_only_the_last_fails():
    masked = [[1, 1, 1, 1]]
    conf = [[0.99, 0.95, 0.9, 0.1]]  # f = 1: n=1..3 pass ((n+1)(1-c) = 0.02, 0.15, 0.4), n=4 fails
    assert Factor(1.0).select(proposal(conf, masked)).int().tolist() == [[1, 1, 1, 0]]
    assert Factor(1.0, "fast_dllm").select(proposal(conf, masked)).int().tolist() == [[1, 1, 1, 1]]
    conf = [[0.99, 0.5, 0.4, 0.1]]  # fails at n=2 of 4: both modes keep the passing prefix
    assert Factor(1.0, "fast_dllm").select(proposal(conf, masked)).int().tolist() == [[1, 0, 0, 0]]
    conf = [[0.2, 0.1, 0.0, 0.0]]  # two masked, the first already fails: Fast-dLLM commits both
    masked2 = [[1, 1, 0, 0]]
    assert Factor(1.0).select(proposal(conf, masked2)).int().tolist() == [[1, 0, 0, 0]]
    assert Factor(1.0, "fast_dllm").select(proposal(conf, masked2)).int().tolist() == [[1, 1, 0, 0]]


def test_topk_schedule_and_selection():
    masked = torch.ones(2, 12, dtype=torch.bool)
    masked[0, :2] = False  # 10 masks
    masked[1, 5:] = False  # 5 masks
    rule = TopK(steps=8, num_blocks=2)
    rule.begin_block(masked)
    assert rule.schedule.tolist() == [[3, 3, 2, 2], [2, 1, 1, 1]]
    conf = torch.rand(2, 12, generator=torch.Generator().manual_seed(0))
    for step in range(4):
        score = conf.masked_fill(~masked, -torch.inf)
        commit = rule.select(Proposal(torch.zeros(2, 12, dtype=torch.long), score, None, masked, step))
        assert commit.sum(1).tolist() == rule.schedule[:, step].tolist()
        assert not (commit & ~masked).any()
        for row in range(2):  # exactly the highest-confidence masked positions
            k = int(rule.schedule[row, step])
            assert set(commit[row].nonzero().flatten().tolist()) == set(score[row].topk(k).indices.tolist())
        masked = masked & ~commit
    assert not masked.any()


def test_topk_ties_lowest_index_first_and_ignores_unmasked_scores():
    rule = TopK(steps=2, num_blocks=1)
    masked = torch.tensor([[0, 1, 1, 1, 1, 0]], dtype=torch.bool)
    rule.begin_block(masked)  # 4 masks over 2 steps: 2, 2
    conf = torch.tensor([[0.9, 0.0, 0.5, 0.5, 0.5, 0.9]])  # unmasked positions score high: must not use up k
    commit = rule.select(Proposal(torch.zeros(1, 6, dtype=torch.long), conf, None, masked, 0))
    assert commit.int().tolist() == [[0, 0, 1, 1, 0, 0]]


# ---- stats --------------------------------------------------------------------------------------------------------
def test_stats(teacher):
    prompts = teacher.encode(TEACHER_PROMPTS)
    tokens, _, stats = Decoder(teacher, DecodeConfig(rule="confidence", gen_length=32, block_length=8)).run(prompts)
    eos = teacher.ids.eos
    for row, s in zip(tokens.tolist(), stats):
        assert s.answer_tokens == (row.index(eos) + 1 if eos in row else len(row))
        assert 4 <= s.nfe <= 32  # at least one forward per block, at most one per token
        assert s.tpf == pytest.approx(s.answer_tokens / s.nfe) and s.to_dict()["tpf"] == s.tpf
    assert stats[0].answer_tokens == 17 and teacher.decode(tokens[0].tolist()) == "hgfdsapoiuytrewq"  # 16 + EOS
    _, _, stats = Decoder(teacher, DecodeConfig(rule="topk", gen_length=32, block_length=8, steps=16)).run(prompts)
    assert [s.nfe for s in stats] == [16, 16, 16]
    assert stats[0].tpf == 17 / 16


def test_answer_length_stops_at_eos_or_eot(tiny):
    assert tiny.answer_length([5, 6, 39, 43, 7]) == 3  # EoT first
    assert tiny.answer_length([5, 43, 39]) == 2  # EOS first
    assert tiny.answer_length([5, 6, 7]) == 3  # none: the whole canvas


# ---- configuration errors -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "options, message",
    [
        (dict(gen_length=30, block_length=8), "gen_length=30 is not divisible by block_length=8"),
        (dict(gen_length=32, block_length=8, steps=6), "steps=6 must be a multiple of the number of blocks 4"),
        (dict(gen_length=32, block_length=8, steps=64), "steps=64 must be between 1 and gen_length=32"),
        (dict(rule="confidence", threshold=1.5), "confidence threshold 1.5 must be in"),
    ],
)
def test_config_errors(tiny, options, message):
    with pytest.raises(DParallelError, match=message):
        Decoder(tiny, DecodeConfig(**options))


def test_mask_id_equal_to_pad_id_is_an_error(tiny):
    with pytest.raises(DParallelError, match="mask id 0 equals the pad id"):
        TinyAdapter(tiny.model, tiny.tokenizer, SpecialIds(mask=0, eos=2, eot=2, pad=0))
