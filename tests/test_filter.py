"""Learn2PD filter and End-of-Text prediction: labels, the loss, a tiny fit into a loadable component, the `filter`
and `oracle` rules, eot_stop on the shipped teacher, and refusing a mismatched base."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import fresh_process_tokens
from omegaconf import OmegaConf
from safetensors.torch import save_file

import dparallel
from dparallel.commands.export import export_run
from dparallel.commands.recipe import load_recipe
from dparallel.commands.train import train
from dparallel.core.errors import DParallelError
from dparallel.data.record import record
from dparallel.data.trajectory import select_records, state_at
from dparallel.engine.config import DecodeConfig
from dparallel.engine.decoder import Decoder
from dparallel.engine.oracle import OracleRule
from dparallel.engine.rules import Proposal, TopK, conflicts
from dparallel.filters.learn2pd import build_examples, filter_loss, record_examples
from dparallel.filters.rule import FilterHead, FilterRule, block_features

SHAPE = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    max_position_embeddings=256,
    rope_theta=10000.0,
)
MASK = 1


pytestmark = pytest.mark.usefixtures("one_thread")


# ---- labels and features -------------------------------------------------------------------------------------
def hand_record():
    # G = 8, W = 4: block 0 takes steps 0-2 (positions 1 and 2 together at step 1), block 1 steps 3-4.
    tokens = np.array([10, 11, 12, 13, 2, 2, 2, 2])
    order = np.array([0, 1, 1, 2, 3, 4, 3, 4])
    pred = np.array(
        [
            [10, 11, 99, 99, 2, 2, 2, 2],  # step 0: positions 0 and 1 already right, 2 and 3 not
            [10, 11, 12, 98, 2, 2, 2, 2],
            [10, 11, 12, 13, 2, 2, 2, 2],
            [10, 11, 12, 13, 2, 5, 2, 2],  # step 3 (block 1): position 5 wrong
            [10, 11, 12, 13, 2, 2, 2, 7],  # step 4: position 7 wrong
        ]
    )
    conf = np.linspace(0.1, 0.9, 40).reshape(5, 8).astype(np.float16)
    return {"tokens": tokens, "order": order, "steps": 5, "pred": pred, "conf": conf}


def test_labels_and_features_from_a_hand_made_record():
    r = hand_record()
    ex = record_examples(r, 4)
    assert ex["label"].astype(int).tolist() == [
        [1, 1, 0, 0],
        [1, 1, 1, 0],
        [1, 1, 1, 1],
        [1, 0, 1, 1],
        [1, 1, 1, 0],
    ]
    assert ex["masked"].astype(int).tolist() == [
        [1, 1, 1, 1],
        [0, 1, 1, 1],
        [0, 0, 0, 1],
        [1, 1, 1, 1],
        [0, 1, 0, 1],
    ]
    for s, start in enumerate([0, 0, 0, 4, 4]):  # the mask bit is exactly state_at's
        state = state_at(r["tokens"], r["order"], s, MASK)[start : start + 4]
        assert ((state == MASK) == ex["masked"][s]).all()
    assert ex["step"].tolist() == [0, 1, 2, 0, 1]  # the step inside the block
    np.testing.assert_array_equal(ex["conf"][4], r["conf"][4, 4:8].astype(np.float32))
    feats = block_features(
        {"conf": torch.tensor(ex["conf"])},
        torch.tensor(ex["masked"]),
        torch.tensor(ex["step"]),
        ["conf", "mask", "step"],
    )
    assert feats.shape == (5, 12)
    assert feats[4, :4].tolist()[0] == 1.0 and feats[4, 2] == 1.0  # committed positions: confidence 1.0
    assert feats[4, 4:8].tolist() == [0.0, 1.0, 0.0, 1.0] and feats[4, 8:].tolist() == [0.25] * 4


def test_conflicts_see_repeated_and_contested_proposals():
    # W = 5; position 2 is committed to token 7; positions 0 and 1 both propose 5, 3 proposes 7, 4 proposes 9
    proposed = torch.tensor([[5, 5, 4, 7, 9]])
    block = torch.tensor([[0, 0, 7, 0, 0]])  # what the canvas holds (read at committed positions only)
    masked = torch.tensor([[True, True, False, True, True]])
    conf = torch.tensor([[0.5, 0.8, 1.0, 0.3, 0.3]])
    c = conflicts({"proposed": proposed, "block": block, "conf": conf}, masked)
    assert c["repeat"].tolist() == [[False, False, False, True, False]]  # 7 is already in the block
    assert c["clash"].tolist() == [[True, False, False, False, False]]  # 1 proposes 5 more confidently than 0
    x = block_features({"proposed": proposed, "block": block, "conf": conf}, masked, 0, ["repeat", "clash"])
    assert x.tolist() == [[0, 0, 0, 1, 0, 1, 0, 0, 0, 0]]
    with pytest.raises(DParallelError, match=r"conflict features need \['proposed', 'block'\]"):
        block_features({"conf": conf}, masked, 0, ["clash"])


def test_decoding_reads_exactly_the_features_training_reads(teacher, tmp_path):
    """Record the shipped teacher one token per step with dense features, then replay the same decoder: at every
    step the filter rule's input (statistics, mask, step, conflicts) equals the training example's."""
    features = ["conf", "entropy", "margin", "mask", "step", "repeat", "clash"]
    overrides = [f"run_dir={tmp_path}", "record.source.suite.n_per_task=1", "record.batch_size=1",
                 "record.source.suite.tasks=[shuffle,distinct,sort,sum]", "model.device=cpu"]  # fmt: skip
    cfg = load_recipe("recipes/tiny/record-features.yaml", overrides, command="record")
    records = select_records(record(cfg), ["prompt_ids", "tokens", "order", "steps", "pred", "conf", "entropy",
                                           "margin"], "", arrays=False)  # fmt: skip
    rule = FilterRule(FilterHead(32, features), 0.5)
    seen = []

    class Replay(TopK):  # the recorded schedule, capturing the filter's input before each commit
        def select(self, p: Proposal) -> torch.Tensor:
            seen.append(rule.features(p)[0])
            return super().select(p)

    decode = DecodeConfig(**OmegaConf.to_container(cfg.decode))
    for r in records:
        seen.clear()
        Decoder(teacher.adapter, decode, Replay(32, 1)).run([list(r["prompt_ids"])])
        ex = record_examples(r, 32, ["conf", "entropy", "margin"], tokens_too=True)
        stats = {k: torch.from_numpy(ex[k]) for k in ("conf", "entropy", "margin", "proposed", "block")}
        trained = block_features(stats, torch.from_numpy(ex["masked"]), torch.from_numpy(ex["step"]), features)
        assert len(seen) == r["steps"] and trained.shape == (r["steps"], 32 * 7)
        torch.testing.assert_close(torch.stack(seen), trained, atol=2e-3, rtol=2e-3)  # statistics stored as fp16
        assert torch.equal(torch.stack(seen)[:, 5 * 32 :], trained[:, 5 * 32 :])  # the conflicts exactly


def test_oracle_records_replay_the_decode_committing_every_matching_position(tmp_path):
    """record.oracle=true (Learn2PD's data): the same tokens as the plain record, in fewer steps, and every step
    commits exactly the masked positions whose argmax already equals the final token (or, when none does, one)."""
    base = ["record.source.suite.n_per_task=1", "record.source.suite.tasks=[shuffle,sum,sort]", "model.device=cpu"]
    keys = ["tokens", "order", "steps", "pred"]
    runs = {}
    for oracle in (False, True):
        overrides = [*base, f"run_dir={tmp_path / str(oracle)}", f"record.oracle={oracle}"]
        cfg = load_recipe("recipes/tiny/record-features.yaml", overrides, command="record")
        runs[oracle] = select_records(record(cfg), keys, "")
    for plain, replay in zip(runs[False], runs[True]):
        assert np.array_equal(plain["tokens"], replay["tokens"]) and replay["steps"] < plain["steps"]
        for s in range(replay["steps"]):
            masked, match = replay["order"] >= s, replay["pred"][s] == replay["tokens"]
            committed = replay["order"] == s
            if (masked & match).any():
                assert np.array_equal(committed, masked & match)
            else:
                assert committed.sum() == 1  # the stall guard


def test_loss_is_masked_bce_and_pinned():
    ex = build_examples([hand_record()], 4)
    torch.manual_seed(0)
    head = FilterHead(4, ["conf", "mask"], hidden=8)
    batch = ex.batch(torch.arange(len(ex)))
    loss, logits = filter_loss(head, batch)
    m = batch["masked"]
    expected = F.binary_cross_entropy_with_logits(logits[m], batch["label"][m].float())
    assert torch.allclose(loss, expected)
    assert loss.item() == pytest.approx(0.7238, abs=1e-4)
    weighted, _ = filter_loss(head, batch, pos_weight=3.0)
    assert weighted.item() > loss.item()


# ---- a 3-step fit into a loadable component ------------------------------------------------------------------
@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    from dparallel.adapters.folder import save_model_folder
    from dparallel.adapters.tiny import new_tiny_adapter

    root = tmp_path_factory.mktemp("filter")
    save_model_folder(new_tiny_adapter(OmegaConf.create(SHAPE), seed=0), root / "base", dtype="float32")
    cfg = load_recipe(
        "recipes/tiny/record.yaml",
        [
            f"run_dir={root / 'rec'}", f"model.path={root / 'base'}", "model.device=cpu", "decode.gen_length=16",
            "decode.block_length=8", "record.source.suite.n_per_task=2", "record.source.suite.tasks=[copy,reverse]",
            "record.shard_size=4", "record.batch_size=4", "record.features=true",
        ],
    )  # fmt: skip
    return root, record(cfg)


def test_fit_three_steps_and_save_a_loadable_filter(recorded):
    root, trajectories = recorded
    run = root / "run"
    cfg = load_recipe(
        "recipes/tiny/filter.yaml",
        [
            f"run_dir={run}", f"model.path={root / 'base'}", "model.device=cpu", f"filter.trajectories={trajectories}",
            "filter.block_length=8", "filter.features=[conf,mask,step]", "filter.val_fraction=0.25",
            "filter.eval_every=1", "train.max_steps=3", "train.global_batch_size=4", "train.log_every=1",
            "decode.gen_length=16", "decode.block_length=8",
        ],
    )  # fmt: skip
    model_dir = train(cfg)
    header, *rows = (run / "logs" / "version_0" / "metrics.csv").read_text().splitlines()
    assert {"train/loss", "val/precision", "val/recall", "val/fpr"} <= set(header.split(","))
    manifest = json.loads((model_dir / "dparallel.json").read_text())
    assert manifest["component"] == "filter" and manifest["family"] == "tiny"
    assert manifest["base_model"]["path"] == str(root / "base") and manifest["threshold"] == 0.99
    assert (manifest["block_length"], manifest["features"], manifest["ids"]["mask"]) == (8, ["conf", "mask", "step"], 1)
    assert manifest["vocab_size"] == 100 and set(manifest["metrics"]) >= {"precision", "recall", "fpr"}
    assert not (model_dir / "model.safetensors").exists()  # the head only, never the base
    prompts = ["copy: ab\n", "reverse: abc\n"]
    before = [o.tokens for o in dparallel.load(str(model_dir), device="cpu").generate(prompts, gen_length=16)]
    exported = export_run(run)  # the Hugging Face folder keeps the component, its base and the head
    exported_manifest = json.loads((exported / "dparallel.json").read_text())
    assert exported_manifest["component"] == "filter" and exported_manifest["decoding"]["rule"] == "filter"
    assert fresh_process_tokens(exported, prompts, gen_length=16) == before  # its defaults: rule filter, block 8
    gen = dparallel.load(str(exported), device="cpu")
    out = gen.generate(["copy: ab\n", "reverse: abc\n"], rule="filter", gen_length=16, block_length=8)
    assert all(len(o.tokens) == 16 and MASK not in o.tokens for o in out)
    out = gen.generate(["copy: ab\n"], rule="filter", threshold=0.0, gen_length=16, block_length=8)
    assert out[0].stats.nfe == 2  # threshold 0: every masked position passes -> one forward per block
    with pytest.raises(DParallelError, match="block_length=8"):
        gen.generate(["copy: ab\n"], rule="filter", gen_length=16, block_length=4)


# ---- the rules -----------------------------------------------------------------------------------------------
def test_filter_rule_commits_at_least_one_per_active_row_and_only_masked():
    torch.manual_seed(0)
    W = 6
    masked = torch.tensor([[1, 1, 0, 1, 0, 1], [0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 1], [1, 1, 1, 1, 1, 1]]).bool()
    logits = torch.randn(4, W, 20)
    conf = logits.softmax(-1).max(-1).values.masked_fill(~masked, float("-inf"))
    p = Proposal(logits.argmax(-1), conf, logits, masked, step=1)
    never = FilterHead(W, ["conf", "mask", "position", "step"], hidden=4)
    torch.nn.init.constant_(never.net[2].bias, -50.0)
    torch.nn.init.zeros_(never.net[2].weight)
    commit = FilterRule(never, 0.96).select(p)
    assert commit.sum(1).tolist() == [1, 0, 1, 1]  # only the top-confidence one
    assert commit[0, conf[0].argmax()] and commit[3, conf[3].argmax()]
    always = FilterHead(W, ["conf"], hidden=4)
    torch.nn.init.constant_(always.net[2].bias, 50.0)
    torch.nn.init.zeros_(always.net[2].weight)
    commit = FilterRule(always, 0.96).select(p)
    assert torch.equal(commit, masked)  # every masked position, never an unmasked one
    mixed = FilterRule(FilterHead(W, ["conf"], hidden=16), 0.5).select(p)
    assert not (mixed & ~masked).any() and (mixed.sum(1)[masked.any(1)] >= 1).all()


def test_oracle_replays_the_teachers_sequential_output(teacher):
    adapter = teacher.adapter
    prompts = adapter.encode(["copy: abc\n", "reverse: hello\n", "add: 47+815\n"])
    cfg = DecodeConfig(rule="topk", gen_length=32, block_length=8)
    reference, _, seq_stats = Decoder(adapter, cfg).run(prompts)
    tokens, order, stats = Decoder(adapter, DecodeConfig(gen_length=32, block_length=8), OracleRule(reference)).run(
        prompts
    )
    assert torch.equal(tokens, reference)
    assert all(s.nfe < q.nfe for s, q in zip(stats, seq_stats))  # far fewer forwards than one per token
    assert (order >= 0).all() and all(int(order[i].max()) == s.nfe - 1 for i, s in enumerate(stats))
    # a reference the model never proposes is still reached, through the stall guard (one token per step)
    wrong = torch.full_like(reference, 5)
    tokens, _, stats = Decoder(adapter, DecodeConfig(gen_length=32, block_length=8), OracleRule(wrong)).run(prompts)
    assert torch.equal(tokens, wrong) and stats[0].nfe == 32


# ---- End-of-Text prediction ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "options",
    [
        dict(rule="topk"),
        dict(rule="confidence", threshold=0.9),
        dict(rule="confidence", threshold=0.9, cache="dual"),
        dict(rule="entropy", threshold=0.5, cache="prefix"),
    ],
)
def test_eot_stop_accepted_keeps_the_answer_and_saves_forwards(teacher, options):
    prompts = ["copy: abcdefghijklmnop\n", "sum: 3 7 5\n"]  # answers end in the canvas's third block of 8
    plain = teacher.generate(prompts, gen_length=32, block_length=8, **options)
    cut = teacher.generate(prompts, gen_length=32, block_length=8, eot_stop="accepted", **options)
    for a, b in zip(plain, cut):
        assert a.text == b.text and b.text
        assert b.stats.nfe < a.stats.nfe  # the blocks after the answer's end cost nothing
        assert b.stats.answer_tokens == a.stats.answer_tokens
        first = b.tokens.index(teacher.adapter.ids.eos)
        assert set(b.tokens[first:]) == {teacher.adapter.ids.eos}
        assert max(b.order) == b.stats.nfe - 1  # EOS-filled positions are committed at a step that ran


def test_eot_stop_any_cuts_at_a_proposed_end(teacher):
    prompts = ["copy: abcdefghijklmnop\n", "reverse: qwertyuiopasdfgh\n"]
    plain = teacher.generate(prompts, rule="confidence", gen_length=32, block_length=8)
    cut = teacher.generate(prompts, rule="confidence", gen_length=32, block_length=8, eot_stop="any")
    for a, b in zip(plain, cut):
        assert b.stats.nfe < a.stats.nfe and teacher.adapter.ids.mask not in b.tokens
        assert b.text == a.text  # this teacher is sure where its short answers end
    with pytest.raises(DParallelError, match="eot_stop='sometimes'"):
        teacher.generate(prompts, eot_stop="sometimes")


# ---- refusing a mismatched base ------------------------------------------------------------------------------
@pytest.mark.parametrize("field, value", [("vocab_size", 4096), ("family", "llada"), ("ids", {"mask": 7})])
def test_filter_on_a_mismatched_base_is_refused(tmp_path, field, value):
    head = FilterHead(32, ["conf"])
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(tmp_path / "filter.safetensors"))
    manifest = {
        "component": "filter", "family": "tiny", "base_model": {"path": "builtin:tiny-teacher", "revision": None},
        "ids": {"mask": 1, "eos": 2, "eot": 2, "pad": 0}, "vocab_size": 100, "block_length": 32,
        "features": ["conf"], "hidden": 64, "threshold": 0.96,
    }  # fmt: skip
    Path(tmp_path / "dparallel.json").write_text(json.dumps(manifest))
    gen = dparallel.load(str(tmp_path), device="cpu")  # the matching manifest loads
    assert "filter" in gen.rules
    manifest[field] = value
    Path(tmp_path / "dparallel.json").write_text(json.dumps(manifest))
    with pytest.raises(DParallelError, match="was trained for a base with"):
        dparallel.load(str(tmp_path), device="cpu")


def test_filter_rule_needs_a_component(teacher):
    with pytest.raises(DParallelError, match="`filter` needs a filter component"):
        teacher.generate(["copy: a\n"], rule="filter")


def test_recipes_follow_the_paper():
    llada = load_recipe("recipes/llada-8b/filter.yaml")
    assert (llada.method, llada.train.lr, llada.filter.threshold, llada.filter.block_length) == (
        "filter",
        3e-3,
        0.96,
        32,
    )
    assert (llada.decode.gen_length, llada.decode.block_length, list(llada.filter.features)) == (256, 32, ["conf"])
    tiny = load_recipe("recipes/tiny/filter.yaml")
    assert (tiny.decode.gen_length, tiny.decode.block_length, tiny.filter.hidden) == (32, 32, 64)
    assert list(tiny.filter.features) == ["conf", "entropy", "margin", "mask", "step", "repeat", "clash"]  # measured
    assert "recipes/tiny/record-features.yaml" in Path("recipes/tiny/filter.yaml").read_text().split("\nname:")[0]
    records = load_recipe("recipes/tiny/record-features.yaml", command="record")
    assert (records.record.features, records.decode.rule, records.decode.steps, records.decode.cache) == (
        True, "topk", 32, "none"
    )  # fmt: skip


def test_token_statistics_and_entropy_margin_features():
    from dparallel.engine.rules import token_statistics

    logits = torch.tensor([[[0.5, 0.3, 0.2], [1.0, 0.0, 0.0]]]).log()  # [1, 2, 3]; the second has two -inf logits
    stats = token_statistics(logits)
    assert stats["conf"].tolist()[0] == pytest.approx([0.5, 1.0])
    assert stats["margin"].tolist()[0] == pytest.approx([0.2, 1.0])
    assert stats["entropy"].tolist()[0] == pytest.approx([1.0296530, 0.0], abs=1e-6)
    # committed positions read as certain: conf 1, entropy 0, margin 1, whatever the statistics say there
    masked = torch.tensor([[True, False]])
    x = block_features(stats, masked, 0, ["entropy", "margin", "conf"])
    assert x.tolist()[0] == pytest.approx([1.0296530, 0.0, 0.2, 1.0, 0.5, 1.0], abs=1e-6)
    with pytest.raises(DParallelError, match="filter feature 'entropy' was not recorded"):
        block_features({"conf": stats["conf"]}, masked, 0, ["entropy"])
    r = hand_record()  # recorded before entropy existed: a head that reads it is refused with the fix
    with pytest.raises(DParallelError, match=r"no \['entropy'\] features: record again with record.features=true"):
        record_examples(r, 4, ["conf", "entropy"])


def test_eval_oracle_decoder_replays_an_earlier_decoder(teacher):
    from dparallel.commands.evaluate import evaluate

    decoders = [
        {"name": "sequential", "rule": "topk", "gen_length": 32, "block_length": 8},
        {"name": "oracle", "rule": "oracle", "reference": "sequential", "gen_length": 32, "block_length": 8},
    ]
    cfg = OmegaConf.create(
        {"suite": {"tasks": ["copy", "sort"], "split": "test", "n_per_task": 2, "seed": 0}, "batch_size": 3}
    )
    cfg.decoders = decoders
    rows = {(r["decoder"], r["task"]): r for r in evaluate(teacher, cfg, progress=False)}
    seq, oracle = rows[("sequential", "macro")], rows[("oracle", "macro")]
    assert oracle["accuracy"] == seq["accuracy"]  # the same outputs (batch 3 over 4 prompts: per-batch references)
    assert seq["nfe"] == 32 and oracle["nfe"] < 16
    cfg.decoders = [decoders[1]]
    with pytest.raises(DParallelError, match="set reference to one of"):
        evaluate(teacher, cfg, progress=False)
