"""GRPO for the unmasking policy (:mod:`dparallel.samplers.policy`): the frozen dLLM decoding at temperature 0 is
the environment, the policy picks which masked positions of the active block to commit, the reward comes at the end.

Per rollout batch (prompts of this rank, ``G`` samples each, decoded together by the engine's Decoder with a
recording :class:`PolicyRule`):

- reward ``r = correct * ((L - min(steps, L) + 1) / L) ** alpha`` (``multiplicative``) or
  ``r = correct - alpha * steps / L`` (``additive``, an ablation that reward-hacks), ``steps`` = NFE, ``L`` the gen
  length, ``correct`` from the synthetic suite's checker;
- advantage ``A = r - mean_group(r)`` (optionally ``/ (std_group(r) + 1e-4)``), shared by every step of a rollout;
- PPO-clip on each step's joint Bernoulli log-likelihood ``log pi(a_s | s)`` (the sampled bits over the masked
  positions of the active block): ``-min(rho A, clip(rho, 1 - eps, 1 + eps) A)`` with
  ``rho = pi_new(a|s) / mu(a|s)``, averaged over every (rollout, step); ``updates_per_batch`` optimizer updates per
  rollout batch; plus ``kl_coef * KL(pi_new || pi_init)`` (exact, per position) when asked;
- expert steering (optional): one rollout per prompt with the ``confidence`` threshold rule joins each group; the
  behaviour policy is then the mixture ``mu(a|s) = w_p pi_old(a|s) + w_e [a == expert(s)]`` with
  ``w_p = G / (G + 1)``, ``w_e = 1 / (G + 1)``, which is the likelihood in ``rho`` for every rollout of the group.

Manual optimisation; under ``torchrun`` each rank rolls out its own prompts and Lightning's DDP all-reduces the
policy's gradients at every ``manual_backward``. ``train.max_steps`` counts optimizer updates
(``updates_per_batch`` per rollout batch); ``train.global_batch_size`` counts prompts per rollout batch (all ranks).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator

import torch
from omegaconf import DictConfig
from torch.utils.data import IterableDataset

from dparallel.core.errors import require
from dparallel.core.runtime import weights_dtype
from dparallel.data.sources import Item, build_checker, load_items, source_name
from dparallel.engine.config import DecodeConfig
from dparallel.engine.decoder import Decoder
from dparallel.engine.rules import Confidence
from dparallel.methods.base import DParallelModule
from dparallel.samplers.config import REWARDS
from dparallel.samplers.policy import PolicyRule, UnmaskingPolicy, bernoulli_kl, bernoulli_log_prob


def rewards(correct: torch.Tensor, steps: torch.Tensor, length: int, alpha: float, kind: str) -> torch.Tensor:
    """[N] rewards from correctness [N] (bool) and steps [N] (NFE) at gen length ``length``."""
    require(kind in REWARDS, f"policy.reward={kind!r}: use {' or '.join(REWARDS)}")
    c, s = correct.double(), steps.double()
    if kind == "multiplicative":
        return c * ((length - s.clamp(max=length) + 1) / length) ** alpha
    return c - alpha * s / length


def group_advantages(reward: torch.Tensor, group: int, std_normalize: bool = False) -> torch.Tensor:
    """[N] rewards laid out as N / group consecutive groups -> ``r - mean_group`` (``/ (std_group + 1e-4)``)."""
    r = reward.reshape(-1, group)
    adv = r - r.mean(dim=1, keepdim=True)
    if std_normalize:
        adv = adv / (r.std(dim=1, keepdim=True) + 1e-4)
    return adv.reshape(-1)


def ppo_clip_loss(new_lp: torch.Tensor, behaviour_lp: torch.Tensor, adv: torch.Tensor, eps: float) -> torch.Tensor:
    """Mean over steps of ``-min(rho A, clip(rho, 1 - eps, 1 + eps) A)``, ``rho = exp(new - behaviour)``."""
    ratio = torch.exp(new_lp - behaviour_lp)
    return -torch.minimum(ratio * adv, ratio.clamp(1 - eps, 1 + eps) * adv).mean()


def mixture_log_prob(old_lp: torch.Tensor, match: torch.Tensor, group: int) -> torch.Tensor:
    """Expert steering's behaviour likelihood log(w_p pi_old + w_e [match]) with G policy + 1 expert rollouts."""
    w_p, w_e = group / (group + 1), 1 / (group + 1)
    expert = torch.where(match, math.log(w_e), -math.inf)
    return torch.logaddexp(old_lp + math.log(w_p), expert.to(old_lp.dtype))


class PromptBatches(IterableDataset):
    """Endless batches of prompt numbers: batch ``i`` on rank ``r`` of ``w`` holds prompts ``(i * w + r) * n + j``
    (modulo the source's size; the module maps them through a seeded permutation), so ranks see disjoint
    prompts and a resumed run skips ahead by batch index."""

    def __init__(self, n: int, rank: int = 0, world: int = 1, start_batch: int = 0):
        self.n, self.rank, self.world, self.start_batch = n, rank, world, start_batch

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        i = self.start_batch
        while True:
            base = (i * self.world + self.rank) * self.n
            yield {"example": torch.arange(base, base + self.n)}
            i += 1


def flatten_rollout(steps: list[dict], rows: int) -> dict[str, torch.Tensor]:
    """Stack the recorded steps, keeping only real ones (row still active): each tensor [N, ...], plus ``row``
    [N] (the rollout each step belongs to) and ``window`` [N, W] (answer-canvas indices of its active block)."""
    out: dict[str, list] = {k: [] for k in ("feats", "masked", "time", "action", "eligible", "old_log_prob",
                                            "expert_match", "row", "window")}  # fmt: skip
    for s in steps:
        keep = s["active"]
        w = s["action"].shape[1]
        for k in ("feats", "masked", "time", "action", "eligible", "old_log_prob", "expert_match"):
            out[k].append(s[k][keep])
        out["row"].append(torch.arange(rows, device=keep.device)[keep])
        index = s["offset"] + torch.arange(w, device=keep.device)
        out["window"].append(index.expand(int(keep.sum()), w))
    return {k: torch.cat(v) for k, v in out.items()}


class UnmaskingPolicyModule(DParallelModule):
    """GRPO over the unmasking policy. The base dLLM is frozen and kept out of the module tree (the checkpoint
    holds the policy only, and DDP neither broadcasts nor wraps the base's weights)."""

    def __init__(self, cfg: DictConfig, adapter, policy: UnmaskingPolicy, items: list[Item], checker):
        super().__init__(cfg, adapter)
        self.items, self.checker = items, checker
        self.order = torch.randperm(len(items), generator=torch.Generator().manual_seed(cfg.train.seed)).tolist()
        del self.model  # registered by the base class; the frozen base must not be a submodule (see above)
        self.policy = policy
        self.reference = copy.deepcopy(policy).requires_grad_(False) if cfg.policy.kl_coef > 0 else None
        self.automatic_optimization = False
        self.last_metrics: dict[str, float] = {}

    def on_fit_start(self) -> None:
        self.adapter.model.to(self.device)  # the base is not a submodule, so Lightning does not move it

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return list(self.policy.parameters())

    # ---- rollouts ------------------------------------------------------------------------------------------
    def decode_config(self, seed: int) -> DecodeConfig:
        p = self.cfg.policy
        return DecodeConfig(rule="policy", gen_length=p.gen_length, block_length=p.block_length, seed=seed)

    def rollout(self, examples: list[Item], seed: int) -> dict[str, torch.Tensor]:
        """Decode every prompt ``G`` times with the sampling policy (plus once with the expert under steering);
        returns the flattened steps (:func:`flatten_rollout`) with ``reward``, ``correct``, ``nfe`` per rollout
        (policy rollouts first, grouped by prompt: rows ``[j * G, (j + 1) * G)``, then one expert row per prompt)."""
        p, ids = self.cfg.policy, self.adapter.ids
        prompts = self.adapter.encode([e.prompt for e in examples], p.source.chat_template)
        expert = Confidence(p.expert_threshold) if p.expert_steering else None
        runs = [("sample", [q for q in prompts for _ in range(p.group_size)])]
        if expert is not None:
            runs.append(("expert", prompts))
        self.policy.eval()
        parts, tokens, nfe, rate = [], [], [], []
        for mode, rows in runs:
            rule = PolicyRule(self.policy, ids.mask, mode=mode, temperature=p.temperature, expert=expert, record=True)
            out, _, stats = Decoder(self.adapter, self.decode_config(seed), rule=rule).run(rows)
            part = flatten_rollout(rule.rollout.steps, len(rows))
            part["row"] += sum(len(t) for t in tokens)
            parts.append(part)
            tokens.append(out.tolist())
            nfe += [s.nfe for s in stats]
            if mode == "sample":
                rate.append(float(rule.chosen) / max(float(rule.eligible), 1.0))
        self.policy.train()
        flat = {k: torch.cat([q[k] for q in parts]) for k in parts[0]}
        rows_ex = [e for e in examples for _ in range(p.group_size)] + (examples if expert is not None else [])
        texts = [self.adapter.decode(t) for part in tokens for t in part]
        correct = torch.tensor([bool(self.checker(e, t)) for e, t in zip(rows_ex, texts)])
        steps = torch.tensor(nfe)
        reward = rewards(correct, steps, p.gen_length, p.alpha, p.reward)
        flat.update(correct=correct, nfe=steps.float(), reward=reward.float(), unmask_rate=torch.tensor(rate[0]))
        return flat

    def advantages(self, reward: torch.Tensor, n_prompts: int) -> torch.Tensor:
        """Per-rollout advantages [rows]: each prompt's group is its G policy rollouts (+ its expert rollout)."""
        p = self.cfg.policy
        g = p.group_size
        grouped = reward[: n_prompts * g].reshape(n_prompts, g)
        if p.expert_steering:
            grouped = torch.cat([grouped, reward[n_prompts * g :, None]], dim=1)  # [prompts, G + 1]
        adv = group_advantages(grouped.reshape(-1), grouped.shape[1], p.std_normalize).reshape(grouped.shape)
        out = adv[:, :g].reshape(-1)
        return torch.cat([out, adv[:, g]]) if p.expert_steering else out

    # ---- the loss ------------------------------------------------------------------------------------------
    def policy_loss(self, roll: dict[str, torch.Tensor], adv: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """PPO-clip (+ KL) over every recorded step; ``adv`` [rows] per rollout."""
        p = self.cfg.policy
        param = next(self.policy.parameters())
        feats = roll["feats"].to(param.dtype)
        logits = self.policy(feats, roll["masked"], roll["time"]).gather(1, roll["window"]) / p.temperature
        new_lp = bernoulli_log_prob(logits.float(), roll["action"], roll["eligible"])  # [N]
        behaviour = roll["old_log_prob"]
        if p.expert_steering:
            behaviour = mixture_log_prob(behaviour, roll["expert_match"], p.group_size)
        a = adv[roll["row"]].to(new_lp.dtype)
        loss = ppo_clip_loss(new_lp, behaviour, a, p.clip_eps)
        ratio = torch.exp(new_lp - behaviour).detach()
        parts = {"pg_loss": float(loss.detach()), "clip_frac": float(((ratio - 1).abs() > p.clip_eps).float().mean())}
        if self.reference is not None:
            with torch.no_grad():
                ref = self.reference(feats, roll["masked"], roll["time"]).gather(1, roll["window"]) / p.temperature
            kl = bernoulli_kl(logits.float(), ref.float(), roll["eligible"]).mean()
            loss = loss + p.kl_coef * kl
            parts["kl"] = float(kl.detach())
        return loss, parts

    def training_step(self, batch: dict, batch_idx: int) -> None:
        p = self.cfg.policy
        opt, sched = self.optimizers(), self.lr_schedulers()
        index = batch["example"].tolist()
        examples = [self.items[self.order[k % len(self.items)]] for k in index]
        # a distinct, reproducible Bernoulli stream per rollout batch and rank
        seed = (self.cfg.train.seed * 1_000_003 + index[0]) % (2**63)
        roll = self.rollout(examples, seed)
        adv = self.advantages(roll["reward"], len(examples)).to(roll["old_log_prob"].device)
        for _ in range(p.updates_per_batch):
            loss, parts = self.policy_loss(roll, adv)
            opt.zero_grad()
            self.manual_backward(loss)
            if p.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(self.policy.parameters(), p.max_grad_norm)
            opt.step()
            sched.step()
        n = len(examples) * p.group_size
        policy_rows = slice(0, n)
        metrics = {
            "loss": float(loss.detach()),
            "reward": float(roll["reward"][policy_rows].mean()),
            "accuracy": float(roll["correct"][policy_rows].float().mean()),
            "nfe": float(roll["nfe"][policy_rows].mean()),
            "unmask_rate": float(roll["unmask_rate"]),
            **parts,
        }
        if p.expert_steering:
            metrics["expert_reward"] = float(roll["reward"][n:].mean())
        self.last_metrics = metrics
        self.log_dict({f"train/{k}": v for k, v in metrics.items()}, batch_size=n, sync_dist=True, prog_bar=False)
        self.log("train/lr", opt.param_groups[0]["lr"], batch_size=n)


# ---- build, save ----------------------------------------------------------------------------------------------


def new_policy(p) -> UnmaskingPolicy:
    """The policy network a ``policy`` recipe section (or a component manifest) describes."""
    return UnmaskingPolicy(list(p["features"]), int(p["topk"]), int(p["dim"]), int(p["ffn"]), int(p["heads"]),
                           float(p["init_bias"]))  # fmt: skip


def build(cfg: DictConfig, micro: int, start_batch: int):
    """The module (frozen base from ``model.*`` + a fresh policy) and the prompt stream of this rank."""
    from torch.utils.data import DataLoader

    from dparallel.adapters.load import load_adapter
    from dparallel.core.runtime import rank_world

    p = cfg.policy
    require(p.reward in REWARDS, f"policy.reward={p.reward!r}: use {' or '.join(REWARDS)}")
    require(p.group_size >= 2 or p.expert_steering, f"policy.group_size={p.group_size}: a group needs >= 2 rollouts")
    require(p.updates_per_batch >= 1, f"policy.updates_per_batch={p.updates_per_batch} must be >= 1")
    require(
        not cfg.train.grad_clip,
        "train.grad_clip must be 0 for the policy (manual optimisation): use policy.max_grad_norm",
    )
    DecodeConfig(gen_length=p.gen_length, block_length=p.block_length).validate()
    policy = new_policy(p)
    items = load_items(p.source)
    checker = build_checker(p.checker, p.source, items)
    require(checker is not None, "the policy's reward needs a correctness checker: set policy.checker")
    dtype = weights_dtype(cfg.model.dtype, cfg.model.device)  # the base is frozen: bfloat16 on a GPU
    adapter = load_adapter(cfg.model.path, family=cfg.model.family, dtype=dtype, revision=cfg.model.revision)
    adapter.model.requires_grad_(False)
    rank, world = rank_world()
    n_params = sum(q.numel() for q in policy.parameters())
    print(
        f"policy: {n_params} parameters; {len(items)} prompts from {source_name(p.source)}; "
        f"{micro} prompts x G={p.group_size} rollouts per rank per batch",
        flush=True,
    )
    data = PromptBatches(micro, rank, world, start_batch // p.updates_per_batch)
    return UnmaskingPolicyModule(cfg, adapter, policy, items, checker), DataLoader(data, batch_size=None)


def save(module: UnmaskingPolicyModule, cfg: DictConfig, out) -> None:
    """RUN_DIR/model: ``policy.safetensors`` and ``dparallel.json`` (component ``policy``)."""
    from dparallel.engine.components import save_component

    p = cfg.policy
    fields = {
        "policy": {
            k: (list(p[k]) if k == "features" else p[k])
            for k in ("features", "topk", "dim", "ffn", "heads", "init_bias")
        },  # fmt: skip
        "threshold": p.threshold,
        "trained": {k: p[k] for k in ("gen_length", "block_length", "temperature", "alpha", "reward", "group_size")},
        "metrics": module.last_metrics,
    }
    decoding = {"rule": "policy", "gen_length": p.gen_length, "block_length": p.block_length}
    save_component(out, "policy", module.policy, module.adapter, cfg, fields, decoding)
