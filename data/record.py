"""``dparallel record``: run a teacher with any decoding rule over a prompt source and write trajectory shards.

Work is split into shards of ``record.shard_size`` prompts (in source order, after dedup); under ``torchrun``
rank r records shards r, r + W, ... into its own shard folders, each in batches of ``record.batch_size``. A shard's
batches, and so its records, do not depend on the world size or on interruptions: a killed run resumes by
skipping finished shards and ends with the same dataset. Rank 0 writes ``manifest.json`` once every shard is done.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from dparallel.core.errors import DParallelError, require
from dparallel.core.io import atomic_dir
from dparallel.core.runtime import rank_world
from dparallel.data.sources import Item, build_checker, load_items, source_name


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def record(cfg: DictConfig) -> Path:
    """Record the recipe's teacher (``model``) with its ``decode`` rule over ``record.source`` into ``record.out``."""
    from dparallel.data import trajectory as T
    from dparallel.engine.config import DecodeConfig

    rc = cfg.record
    require(rc.keep in ("all", "correct"), f"record.keep={rc.keep!r}: use all or correct")
    require(rc.shard_size > 0 and rc.batch_size > 0, "record.shard_size and record.batch_size must be positive")
    decode = DecodeConfig(**OmegaConf.to_container(cfg.decode))
    decode.validate()  # fail before loading any weights
    items = load_items(rc.source, dedup=rc.dedup)
    checker = build_checker(rc.checker, rc.source, items)
    require(checker is not None or rc.keep == "all", "record.keep=correct needs a checker: set record.checker")
    spec = _spec(cfg, decode, items)
    config_hash = _hash(spec)
    out, rank, world = Path(rc.out), *rank_world()
    n_shards = math.ceil(len(items) / rc.shard_size)
    if (out / T.MANIFEST).is_file():
        manifest = T.read_manifest(out)
        require(
            manifest.get("config_hash") == config_hash,
            f"{out / T.MANIFEST} was recorded with another recipe: choose another record.out or delete the folder",
        )
        if not any(T.damaged_shard(out, i, config_hash) for i in range(n_shards)):
            if rank == 0:
                print(f"{out} is already recorded ({manifest['counts']['records']} records): nothing to do", flush=True)
            return out
    _repair(out, [i for i in range(rank, n_shards, world)], config_hash)
    if rank == 0:
        from dparallel.core.io import save_recipe

        save_recipe(cfg, cfg.run_dir)
    mine = list(range(rank, n_shards, world))
    todo = [i for i in mine if T.finished_shard(out, i, config_hash) is None]
    if len(todo) < len(mine):
        print(f"rank {rank}: resuming, {len(mine) - len(todo)} of {len(mine)} shards already recorded", flush=True)
    stopped = False
    if todo:
        stopped = _record_shards(cfg, decode, items, checker, todo, out, config_hash, rank)
    synced = _wait_for_ranks(world, rc.wait_timeout_s)
    if rank != 0:
        return out
    infos = [T.finished_shard(out, i, config_hash, verify=False) for i in range(n_shards)]
    missing = [T.shard_name(i) for i, info in enumerate(infos) if info is None]
    if missing and not stopped and world > 1 and not synced:
        infos, missing = _poll(out, n_shards, config_hash, rc.wait_timeout_s)
    if missing:
        print(f"{len(missing)} of {n_shards} shards still to record (stopped early): rerun to resume", flush=True)
        return out
    manifest = _manifest(out, config_hash, spec, infos, len(items))
    T.write_manifest(out, manifest)
    c = manifest["counts"]
    rate = f", {c['correct']}/{c['checked']} correct" if c["checked"] else ""
    dropped = c["prompts"] - c["records"]
    kept = f" (keep=correct: dropped {dropped} the checker marked wrong)" if rc.keep == "correct" else ""
    print(f"recorded {c['records']} trajectories of {c['prompts']} prompts{rate}{kept} in {out}", flush=True)
    return out


# Decoding options added after recordings existed: they enter the hash only when set, so those recordings keep it.
LATER_DECODE_KEYS = ("entropy_budget", "kl_budget")


def _spec(cfg: DictConfig, decode, items: list[Item]) -> dict:
    """What makes a recording what it is (its hash names the folder's recipe): teacher, decoding, source, prompts."""
    rc = cfg.record
    return {
        "teacher": {k: cfg.model[k] for k in ("path", "family", "revision", "dtype")},
        "decode": {k: v for k, v in dataclasses.asdict(decode).items() if v is not None or k not in LATER_DECODE_KEYS},
        "source": {**OmegaConf.to_container(rc.source), "name": source_name(rc.source)},
        "record": {
            **{k: rc[k] for k in ("shard_size", "features", "keep", "checker", "dedup")},
            **({"oracle": True} if rc.oracle else {}),  # only when set: earlier recordings keep their hash
        },
        "prompts_sha256": _hash([(it.id, it.prompt, it.answer) for it in items]),
    }


def _repair(out: Path, mine: list[int], config_hash: str) -> None:
    """Forget this rank's damaged shards (a folder deleted, truncated or edited since it was recorded) so they are
    recorded again: each shard is a function of the recipe and its prompts, so the new one is the old one."""
    from dparallel.data import trajectory as T

    damaged = [i for i in mine if T.damaged_shard(out, i, config_hash)]
    if damaged:
        names = ", ".join(T.shard_name(i) for i in damaged)
        print(f"{len(damaged)} recorded shard(s) of {out} are damaged ({names}): recording them again", flush=True)
        T.forget_shards(out, damaged)


def _manifest(out: Path, config_hash: str, spec: dict, infos: list[dict], prompts: int) -> dict:
    """The folder's manifest.json from the recording spec and every shard's sidecar."""
    from dparallel.data.trajectory import TOKENIZER_DIR

    counts = {k: sum(info[k] for info in infos) for k in ("records", "checked", "correct")}
    return {
        "config_hash": config_hash,
        **spec,
        "teacher": {**spec["teacher"], **infos[0]["teacher"]},
        "ids": infos[0]["ids"],
        "tokenizer": TOKENIZER_DIR if (out / TOKENIZER_DIR).is_dir() else None,
        "counts": {"prompts": prompts, **counts},
        "shards": [{"name": info["shard"], **{k: info[k] for k in ("prompts", "records", "sha256")}} for info in infos],
    }


def _device(cfg: DictConfig) -> str:
    from dparallel.core.runtime import pick_device

    device = pick_device(cfg.model.device)
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        device = f"cuda:{os.environ['LOCAL_RANK']}"
    return device


def _record_shards(cfg, decode, items, checker, todo, out, config_hash, rank) -> bool:
    """Record this rank's unfinished shards. Returns True when record.max_shards stopped it early."""
    from tqdm import tqdm

    from dparallel.adapters.load import load_adapter
    from dparallel.data import trajectory as T

    rc = cfg.record
    device = _device(cfg)
    dtype = None if cfg.model.dtype == "auto" else cfg.model.dtype
    dtype = dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    adapter = load_adapter(
        cfg.model.path, family=cfg.model.family, dtype=dtype, device=device, revision=cfg.model.revision
    )
    if rank == 0:
        _save_tokenizer(adapter, out)
    config = getattr(adapter.model, "config", None)
    teacher = {
        "name": adapter.name,
        "family": adapter.family,
        "revision": cfg.model.revision or getattr(config, "_commit_hash", None) or "",
    }
    shard_items = {i: items[i * rc.shard_size : (i + 1) * rc.shard_size] for i in todo}
    bar = tqdm(
        total=sum(len(v) for v in shard_items.values()),
        unit="prompt",
        desc=f"record (rank {rank})" if int(os.environ.get("WORLD_SIZE", 1)) > 1 else "record",
        mininterval=1.0,
        dynamic_ncols=True,
    )
    written = 0
    try:
        for i in todo:
            T.clean_temp(out, i)
            records = []
            for b in range(0, len(shard_items[i]), rc.batch_size):
                batch = shard_items[i][b : b + rc.batch_size]
                seed = decode.seed + i * rc.shard_size + b  # per batch, fixed by the shard layout
                records += record_batch(adapter, dataclasses.replace(decode, seed=seed), batch, rc, checker, cfg)
                bar.update(len(batch))
            if rc.keep == "correct":
                records = [r for r in records if r["meta"]["correct"]]
            info = {"config_hash": config_hash, "prompts": len(shard_items[i]), "teacher": teacher}
            T.write_shard(out, i, records, rc.features, {**info, "ids": adapter.ids.__dict__})
            written += 1
            if rc.max_shards is not None and written >= rc.max_shards and i != todo[-1]:
                return True
    finally:
        bar.close()
    return False


def record_batch(adapter, decode, batch: list[Item], rc, checker, cfg=None) -> list[dict]:
    """Decode one batch of items and return its records (with dense features when ``rc.features``)."""
    import numpy as np
    import torch

    from dparallel.engine.decoder import Decoder

    ids = adapter.encode([it.prompt for it in batch], rc.source.chat_template)
    steps_log: list[tuple] = []

    def on_step(call, row_steps, tokens, stats):
        steps_log.append((row_steps, tokens.to(torch.int32), {k: v.to(torch.float16) for k, v in stats.items()}))

    rule = None
    if rc.oracle:  # Learn2PD: decode, then replay that output committing every position whose argmax matches it
        from dparallel.engine.oracle import OracleRule

        rule = OracleRule(Decoder(adapter, decode).run(ids)[0])
    tokens, order, stats = Decoder(adapter, decode, rule=rule).run(ids, on_step=on_step if rc.features else None)
    tokens, order = tokens.cpu().numpy().astype(np.int32), order.cpu().numpy().astype(np.int32)
    if rc.features:
        rows = torch.stack([s[0] for s in steps_log]).cpu().numpy()  # [calls, B]
        dense = {"pred": torch.stack([s[1] for s in steps_log]).cpu().numpy()}  # [calls, B, G]
        for name in steps_log[0][2]:  # conf, entropy, margin: [calls, B, G] float16
            dense[name] = torch.stack([s[2][name] for s in steps_log]).cpu().numpy()
    name = source_name(rc.source)
    records = []
    for b, item in enumerate(batch):
        steps = int(stats[b].nfe)
        if (order[b] < 0).any():
            raise DParallelError(f"decode.rule={decode.rule} left positions uncommitted: record with another rule")
        output = adapter.decode(tokens[b].tolist())
        correct = None if checker is None else bool(checker(item, output))
        meta = {"source": name, "id": item.id, "task": item.task, "prompt": item.prompt}
        r = {
            "prompt_ids": np.asarray(ids[b], dtype=np.int32),
            "tokens": tokens[b],
            "order": order[b],
            "steps": steps,
            "meta": {**meta, "answer": item.answer, "output": output, "correct": correct},
        }
        if rc.features:
            calls = np.flatnonzero(rows[:, b] >= 0)
            assert len(calls) == steps and (rows[calls, b] == np.arange(steps)).all()
            r.update({name: value[calls, b] for name, value in dense.items()})
        records.append(r)
    return records


def _save_tokenizer(adapter, out: Path) -> None:
    """The teacher's tokenizer under OUT/tokenizer (so ``data inspect`` renders text without the model)."""
    from dparallel.data.trajectory import TOKENIZER_DIR

    target = out / TOKENIZER_DIR
    if target.is_dir():
        return
    try:
        with atomic_dir(target) as tmp:
            adapter.tokenizer.save_pretrained(str(tmp))
    except OSError:
        pass  # only a convenience for rendering: never fail a recording over it


def _wait_for_ranks(world: int, timeout: float) -> bool:
    """A barrier across ranks: the existing process group, or a gloo one made from torchrun's environment.
    Returns False when there is none (rank 0 then polls the shard sidecars)."""
    if world <= 1:
        return True
    import datetime

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        return True
    if not (dist.is_available() and "MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ):
        return False
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout))
    try:
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return True


def _poll(out: Path, n_shards: int, config_hash: str, timeout: float) -> tuple[list, list]:
    """Rank 0 without a process group: wait until every shard's sidecar appears (or time out)."""
    from dparallel.data import trajectory as T

    deadline = time.monotonic() + timeout
    while True:
        infos = [T.finished_shard(out, i, config_hash, verify=False) for i in range(n_shards)]
        missing = [T.shard_name(i) for i, info in enumerate(infos) if info is None]
        if not missing or time.monotonic() > deadline:
            if missing:
                raise DParallelError(
                    f"{out}: {len(missing)} shard(s) ({missing[0]} ...) not finished by the other ranks after "
                    f"{timeout:.0f}s: rerun `dparallel record` to resume"
                )
            return infos, missing
        time.sleep(2.0)
