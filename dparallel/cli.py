"""``python -m dparallel COMMAND [RECIPE.yaml] [key=value ...]`` (also the ``dparallel`` console script).

Bad input (a recipe key, a file, a value) prints one line ``dparallel: error: ...`` and exits with code 2.
"""

from __future__ import annotations

import argparse
import os
import sys

from dparallel.errors import DParallelError
from dparallel.paths import recipes_dir

COMMANDS = {
    "train": "train the recipe's method (resumes from RUN_DIR/checkpoints/last.ckpt)",
    "eval": "evaluate model.path on the synthetic suite with the recipe's decoders",
    "generate": "decode prompts with model.path (or a folder given as MODEL) and the recipe's decode section",
    "quickstart": "the whole pipeline on the embedded default, under run_dir",
    "sweep": "run the recipe's sweep block: a wandb sweep, or --local to run the grid here",
    "bench": "time the sampler against the bandwidth floor and LLaDA's reference loop; writes bench.json",
    "record": "run the teacher (model, decode) over record.source and write trajectory shards + manifest.json",
}


def _keys_help() -> str:
    import dparallel.methods  # noqa: F401  (registers the method sections)
    from dparallel.config import describe_keys

    lines = ["recipe keys (override any with key=value):"]
    for key, default, doc in describe_keys():
        lines.append(f"  {key:<34} {default:<22} {doc}")
    return "\n".join(lines)


class _KeysHelp(argparse.HelpFormatter):
    def format_help(self) -> str:
        return super().format_help() + "\n" + _keys_help() + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dparallel", description="Train and run parallel decoders for dLLMs.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    export = sub.add_parser(
        "export",
        help="write RUN_DIR/model as a Hub-ready folder (and push it)",
        description="write RUN_DIR/model as a Hugging Face folder with dparallel.json and a model card",
    )
    export.add_argument("run_dir", help="a training run directory (holds model/ and config.yaml)")
    export.add_argument("--to", help="output folder (default RUN_DIR/export)")
    export.add_argument("--push-to-hub", metavar="ORG/NAME", help="upload the folder to this Hub repo")
    export.add_argument("--private", action="store_true", help="create the Hub repo as private")
    export.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    data = sub.add_parser("data", help="inspect recorded trajectories", description="inspect recorded trajectories")
    inspect = data.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND").add_parser(
        "inspect", help="counts, correctness, step/TPF histograms and samples with their unmasking order"
    )
    inspect.add_argument("dir", help="a trajectory folder written by `dparallel record` (holds manifest.json)")
    inspect.add_argument("--samples", type=int, default=1, help="records to render (default 1)")
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=_KeysHelp)
        p.add_argument(
            "args",
            nargs="*",
            metavar="[RECIPE.yaml|MODEL] key=value",
            help="a recipe file (or, for generate, a model folder) then dotted overrides",
        )
        if name == "generate":
            p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
            p.add_argument("--prompts-file", help="a text file, one prompt per line")
            p.add_argument("--json", action="store_true", help="print one JSON object per answer, with stats")
        if name == "sweep":
            p.add_argument("--local", action="store_true", help="run every grid point here, wandb offline")
    return parser


def _split(args: list[str]) -> tuple[str | None, list[str]]:
    """First positional that is not key=value is the recipe (or model folder); the rest are overrides."""
    head = args[0] if args and "=" not in args[0] else None
    return head, [a for a in args if a != head]


def run(argv: list[str]) -> int:
    parser = build_parser()
    # key=value overrides may come after --prompt options: collect the positionals argparse left over.
    ns, extra = parser.parse_known_args(argv)
    if ns.command == "export":
        return _export(ns, extra, parser)
    if ns.command == "data":
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        from dparallel.commands import inspect_data

        inspect_data(ns.dir, samples=ns.samples)
        return 0
    unknown = [e for e in extra if e.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    head, overrides = _split(ns.args + extra)
    from dparallel import commands
    from dparallel.config import load_recipe

    if ns.command == "generate":
        recipe = head if head and head.endswith((".yaml", ".yml")) else None
        if head and recipe is None:
            overrides = [f"model.path={head}", *overrides]
        from dparallel.generator import DECODE_KEYS

        # Bare decoding options (rule=entropy threshold=0.5) belong to the decode section.
        overrides = [
            o if "." in o.split("=", 1)[0] or o.split("=", 1)[0] not in DECODE_KEYS else f"decode.{o}"
            for o in overrides
        ]
        cfg = load_recipe(recipe, overrides)
        prompts = list(ns.prompt)
        if ns.prompts_file:
            if not os.path.isfile(ns.prompts_file):
                raise DParallelError(f"prompts file {ns.prompts_file} not found")
            prompts += [line.rstrip("\n") for line in open(ns.prompts_file) if line.strip()]
        commands.generate(cfg, [p.replace("\\n", "\n") for p in prompts], as_json=ns.json)
        return 0
    if ns.command == "quickstart":
        from dparallel.quickstart import quickstart

        quickstart(load_recipe(head or str(recipes_dir() / "tiny" / "quickstart.yaml"), overrides))
        return 0
    if head is None:
        raise DParallelError(f"{ns.command} needs a recipe: dparallel {ns.command} recipes/tiny/<recipe>.yaml")
    cfg = load_recipe(head, overrides)
    if ns.command == "train":
        commands.train(cfg)
    elif ns.command == "eval":
        commands.evaluate_recipe(cfg)
    elif ns.command == "bench":
        commands.bench(cfg)
    elif ns.command == "sweep":
        commands.sweep(cfg, head, overrides, local=ns.local)
    elif ns.command == "record":
        commands.record(cfg)
    return 0


def _export(ns: argparse.Namespace, extra: list[str], parser: argparse.ArgumentParser) -> int:
    from dparallel.export import export_run, push_to_hub

    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    out = export_run(ns.run_dir, ns.to, overwrite=ns.overwrite)
    print(f"exported to {out}")
    if ns.push_to_hub:
        print(f"pushed to {push_to_hub(out, ns.push_to_hub, private=ns.private)}")
    return 0


def main(argv: list[str] | None = None) -> None:
    import logging

    # Lightning's info lines (accelerator summary, cloud-logging tips) drown our own progress output.
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-tensor load/save bars
    try:
        code = run(sys.argv[1:] if argv is None else argv)
    except DParallelError as e:
        print(f"dparallel: error: {e}", file=sys.stderr)
        code = e.exit_code
    except KeyboardInterrupt:
        print("dparallel: interrupted (a rerun resumes from the last checkpoint or shard)", file=sys.stderr)
        code = 130
    sys.exit(code)
