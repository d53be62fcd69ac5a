"""``dparallel export RUN_DIR``: a Hugging Face folder with ``dparallel.json`` and a model card, optionally pushed
to the Hub. The folder is written to a temporary sibling and renamed into place, so a failed export leaves
nothing behind; an existing non-empty target is refused unless ``--overwrite``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from omegaconf import OmegaConf

from dparallel.adapters.folder import ADAPTER_DIR, MANIFEST
from dparallel.commands.config import decode_options
from dparallel.core.errors import DParallelError, first_line, require
from dparallel.core.io import atomic_dir, atomic_write_json, atomic_write_text
from dparallel.core.registry import component_of


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DParallelError(f"cannot read {path}: {e}") from None


def export_run(run_dir: str | Path, to: str | Path | None = None, overwrite: bool = False) -> Path:
    """Export RUN_DIR/model (+ config.yaml, eval.json) to ``to`` (default RUN_DIR/export); return the folder."""
    run_dir = Path(run_dir)
    model_dir, config = run_dir / "model", run_dir / "config.yaml"
    require(model_dir.is_dir(), f"{model_dir} not found: train the run first (dparallel train RECIPE run_dir=...)")
    require(config.is_file(), f"{config} not found: {run_dir} is not a dparallel run directory")
    out = Path(to) if to else run_dir / "export"
    require(
        overwrite or not out.exists() or not any(out.iterdir()),
        f"{out} exists and is not empty: pass --overwrite or choose another --to",
    )
    cfg = OmegaConf.load(config)
    manifest = _read_json(model_dir / MANIFEST)
    eval_report = _read_json(run_dir / "eval.json") if (run_dir / "eval.json").is_file() else None
    manifest.update(
        component=component_of(cfg.get("method", ""), manifest.get("component", "base")),
        method=cfg.get("method", ""),
        base_model={"path": cfg.model.path, "revision": cfg.model.revision},
        # a component's own decoding defaults (its rule, its threshold) win over the recipe's decode section, and
        # the decoder its eval found best wins over both
        decoding={
            **OmegaConf.to_container(cfg.decode),
            **(manifest.get("decoding") or {}),
            **best_decoder(cfg, eval_report),
        },
        eval=eval_report,
        recipe=OmegaConf.to_container(cfg),
    )
    with atomic_dir(out) as tmp:
        copy_tree(model_dir, tmp)
        atomic_write_json(tmp / MANIFEST, manifest)
        atomic_write_text(tmp / "README.md", model_card(manifest, run_dir))
    return out


def copy_tree(src: Path, dst: Path) -> None:
    """Copy the files under ``src`` into ``dst`` with a byte progress bar on a terminal's stderr (an 8B model is
    16 GB)."""
    from tqdm import tqdm

    files = [f for f in sorted(src.rglob("*")) if f.is_file()]
    with tqdm(
        total=sum(f.stat().st_size for f in files), unit="B", unit_scale=True, desc="export", leave=False, disable=None
    ) as bar:
        for f in files:
            target = dst / f.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(f, "rb") as r, open(target, "wb") as w:
                for chunk in iter(lambda: r.read(1 << 24), b""):
                    w.write(chunk)
                    bar.update(len(chunk))
            shutil.copymode(f, target)


def best_decoder(cfg, report: dict | None, margin: float = 0.01) -> dict:
    """The decoding options of the run's evaluated decoder with the fewest forwards among those within ``margin``
    of the best macro accuracy ({} without an eval): what a user of the export should decode with. Candidates are
    the decoders on this model; the component's own rule (kind ``method``) when it was evaluated, and never an
    ``oracle`` (it replays a reference answer: a ceiling, not a rule a user can run)."""
    from dparallel.commands.frontier import decoder_kind

    if not report or "eval" not in cfg:
        return {}
    macro = {r["decoder"]: r for r in report.get("results", []) if r.get("task") == "macro"}
    own = [d for d in cfg.eval.decoders if d.name in macro and not d.get("model") and not d.get("component")]
    reference = cfg.eval.get("reference")
    kind = {d.name: decoder_kind(d.name, d.get("rule") or "topk", reference, d.get("kind")) for d in own}
    runnable = [d for d in own if kind[d.name] != "oracle"]
    candidates = [d for d in runnable if kind[d.name] == "method"] or runnable
    specs = {d.name: OmegaConf.to_container(d) for d in candidates}
    if not specs:
        return {}
    best = max(macro[name]["accuracy"] for name in specs)
    pick = min((n for n in specs if macro[n]["accuracy"] >= best - margin), key=lambda n: macro[n]["nfe"])
    return decode_options(specs[pick])


def card_data(manifest: dict, name: str, base: str):
    """Hub metadata (``huggingface_hub.ModelCardData``): base model (Hub ids only), license, library, tags, and
    the eval's macro rows as model-index results (not an oracle's: it replays a reference, a ceiling, not a
    result anyone can decode)."""
    from huggingface_hub import EvalResult, ModelCardData

    report = manifest.get("eval") or {}
    families = ((report.get("frontier") or {}).get("families") or {}).values()
    oracles = {p["decoder"] for f in families if f.get("kind") == "oracle" for p in f.get("points", [])}
    rows = [r for r in report.get("results") or [] if r.get("task") == "macro" and r["decoder"] not in oracles]
    results = [
        EvalResult(
            task_type="text-generation",
            dataset_type="dparallel/suite-v2",
            dataset_name=f"dparallel {(manifest.get('eval') or {}).get('suite', 'suite/test')} (v2)",
            metric_type="accuracy",
            metric_value=round(float(r["accuracy"]), 4),
            metric_name=f"accuracy ({r['decoder']}, NFE {r['nfe']:.1f})",
        )
        for r in rows
    ]
    return ModelCardData(
        base_model=base if base and not base.startswith(("builtin:", "/", ".")) else None,
        license="apache-2.0",
        library_name="dparallel",
        tags=["diffusion-language-model", "parallel-decoding", manifest.get("method") or "base"],
        model_name=name,
        eval_results=results or None,
    )


def model_card(manifest: dict, run_dir: Path) -> str:
    """The README: Hub metadata (:func:`card_data`), what the model is, its eval table and how to load it."""
    from huggingface_hub import ModelCard

    name = manifest.get("name", run_dir.name)
    base = (manifest.get("base_model") or {}).get("path") or ""
    data = card_data(manifest, name, base)
    table = (run_dir / "eval.md").read_text() if (run_dir / "eval.md").is_file() else "(no eval in this run)\n"
    settings = ", ".join(f"{k}={v}" for k, v in (manifest.get("decoding") or {}).items())
    adapter = (
        ""
        if not (run_dir / "model" / ADAPTER_DIR).is_dir()
        else (
            f"\nThe LoRA adapter alone is in `{ADAPTER_DIR}/` (peft: `PeftModel.from_pretrained(base, "
            f'"{ADAPTER_DIR}")` onto `{base}`).\n'
        )
    )
    body = f"""
# {name}

A `{manifest.get("component")}` for the `{manifest.get("family")}` family, trained by dparallel's
`{manifest.get("method")}` method from `{base}`.
{adapter}
## Eval

{table}
## Decoding defaults

`{settings}` (what `dparallel.load` and `dparallel generate FOLDER` apply unless told otherwise)

## Load

```python
import dparallel
gen = dparallel.load("{name}")  # this folder, or its Hub id once pushed
print(gen.generate(["your prompt"])[0].text)
```

The recipe that produced it is in `dparallel.json` (`recipe`).
"""
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n{body}"))


def push_to_hub(folder: Path, repo_id: str, private: bool = False) -> str:
    """Upload an exported folder with huggingface_hub; returns the repo URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message="dparallel export")
    except Exception as e:  # network, auth, offline mode: one line, the folder stays on disk
        first = first_line(e)
        raise DParallelError(f"cannot push to {repo_id}: {first} (the export is kept at {folder})") from None
    return str(url)
