"""``python -m dparallel COMMAND [RECIPE.yaml] [key=value ...]`` (also the ``dparallel`` console script).

Bad input (a recipe key, a file, a value) prints one line ``dparallel: error: ...`` and exits with code 2.
``dparallel COMMAND RECIPE --help`` lists that recipe's keys with its own values; it imports no torch.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from dataclasses import dataclass

from dparallel.core.errors import DParallelError, describe_os_error, require
from dparallel.core.paths import recipes_dir


@dataclass(frozen=True)
class Command:
    """A recipe command: its help line and the function (a path) that runs it on the loaded recipe."""

    help: str
    run: str


COMMANDS = {
    "train": Command(
        "train the recipe's method (resumes from RUN_DIR/checkpoints/last.ckpt)", "dparallel.commands.train:train"
    ),
    "eval": Command(
        "evaluate model.path on the synthetic suite with the recipe's decoders",
        "dparallel.commands.evaluate:evaluate_recipe",
    ),
    "generate": Command(
        "decode prompts with model.path (or a folder given as MODEL) and the recipe's decode section",
        "dparallel.commands.generate:generate",
    ),
    "quickstart": Command(
        "the whole pipeline on the embedded default, under run_dir; `quickstart METHOD` (ar2diff, distill, filter, "
        "joint, policy) runs that method's chain: record -> train -> eval with the frontier -> export",
        "dparallel.commands.quickstart:quickstart",
    ),
    "sweep": Command(
        "run the recipe's sweep block: a wandb sweep, or --local to run the grid here", "dparallel.commands.sweep:sweep"
    ),
    "bench": Command(
        "time the decoder against the bandwidth floor and LLaDA's reference loop; writes bench.json",
        "dparallel.commands.bench:bench",
    ),
    "record": Command(
        "run the teacher (model, decode) over record.source and write trajectory shards + manifest.json",
        "dparallel.data.record:record",
    ),
}


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("dparallel")
    except PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dparallel", description="Train and run parallel decoders for dLLMs.")
    parser.add_argument("--version", action="version", version=f"dparallel {version()}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of any error (DPARALLEL_DEBUG=1)")
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
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.help, description=command.help, add_help=False)
        p.add_argument("-h", "--help", action="store_true", help="this help, then the recipe's keys and values")
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
            p.add_argument("--lenient", action="store_true", help="drop prompt characters the tokenizer lacks (warn)")
            p.add_argument("--show", action="store_true", help="render the canvas step by step as it is decoded")
        if name == "sweep":
            p.add_argument("--local", action="store_true", help="run every grid point here, wandb offline")
            p.add_argument("--collect", action="store_true", help="the table of the points agents have run")
    return parser


def _split(args: list[str]) -> tuple[str | None, list[str]]:
    """First positional that is not key=value is the recipe (or model folder); the rest are overrides."""
    head = args[0] if args and "=" not in args[0] else None
    return head, [a for a in args if a != head]


def _recipe_args(command: str, head: str | None, overrides: list[str]) -> tuple[str | None, list[str]]:
    """The recipe file and overrides of a command line: ``generate MODEL`` sets model.path, and its bare decoding
    options (rule=entropy) belong to the decode section; ``quickstart`` defaults to the shipped tour, and
    ``quickstart METHOD`` runs that method's chain (``dparallel.commands.chains``)."""
    if command == "quickstart":
        from dparallel.commands.chains import CHAINS, chain_recipe

        if head is None:
            return str(recipes_dir() / "tiny" / "quickstart.yaml"), overrides
        if not head.endswith((".yaml", ".yml")):
            require(head in CHAINS, f"no quickstart chain {head!r}: choose from {', '.join(CHAINS)} (or a recipe)")
            return chain_recipe(head), overrides
    if command != "generate":
        return head, overrides
    import dataclasses

    from dparallel.engine.config import DecodeConfig

    recipe = head if head and head.endswith((".yaml", ".yml")) else None
    if head and recipe is None:
        overrides = [f"model.path={head}", *overrides]
    keys = {f.name for f in dataclasses.fields(DecodeConfig)}
    return recipe, [
        o if "." in o.split("=", 1)[0] or o.split("=", 1)[0] not in keys else f"decode.{o}" for o in overrides
    ]


def _prompts(ns: argparse.Namespace) -> list[str]:
    prompts = list(ns.prompt)
    if ns.prompts_file:
        if not os.path.isfile(ns.prompts_file):
            raise DParallelError(f"prompts file {ns.prompts_file} not found")
        prompts += [line.rstrip("\n") for line in open(ns.prompts_file) if line.strip()]
    return [p.replace("\\n", "\n") for p in prompts]


def _help(parser: argparse.ArgumentParser, command: str, recipe: str | None, overrides: list[str]) -> int:
    """The command's usage, then every key of the recipe's sections with the recipe's value and its help."""
    from dparallel.commands.recipe import describe_keys, load_recipe

    sub = parser._subparsers._group_actions[0].choices[command]  # argparse keeps subparsers there
    print(sub.format_help())
    cfg = load_recipe(recipe, overrides, command=command)
    print(f"recipe keys{f' of {recipe}' if recipe else ''} (override any with key=value):")
    for key, value, doc in describe_keys(cfg):
        print(f"  {key:<36} {value:<24} {doc}")
    return 0


def run(argv: list[str]) -> int:
    parser = build_parser()
    # key=value overrides may come after --prompt options: collect the positionals argparse left over.
    ns, extra = parser.parse_known_args(argv)
    if ns.command == "export":
        return _export(ns, extra, parser)
    if ns.command == "data":
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        from dparallel.data.inspect import inspect

        print(inspect(ns.dir, samples=ns.samples), flush=True)
        return 0
    unknown = [e for e in extra if e.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    recipe, overrides = _recipe_args(ns.command, *_split(ns.args + extra))
    if ns.help:
        return _help(parser, ns.command, recipe, overrides)
    if recipe is None and ns.command != "generate":
        raise DParallelError(f"{ns.command} needs a recipe: dparallel {ns.command} recipes/tiny/<recipe>.yaml")
    from dparallel.commands.recipe import load_recipe
    from dparallel.core.registry import resolve

    cfg = load_recipe(recipe, overrides, command=ns.command)
    function = resolve(COMMANDS[ns.command].run)
    if ns.command == "generate":
        function(cfg, _prompts(ns), as_json=ns.json, lenient=ns.lenient, show_steps=ns.show)
    elif ns.command == "sweep":
        function(cfg, recipe, overrides, local=ns.local, collect_only=ns.collect)
    else:
        function(cfg)
    return 0


def _export(ns: argparse.Namespace, extra: list[str], parser: argparse.ArgumentParser) -> int:
    from dparallel.commands.export import export_run, push_to_hub

    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    out = export_run(ns.run_dir, ns.to, overwrite=ns.overwrite)
    print(f"exported to {out}")
    if ns.push_to_hub:
        print(f"pushed to {push_to_hub(out, ns.push_to_hub, private=ns.private)}")
    return 0


def main(argv: list[str] | None = None) -> None:
    """Run a command. A user's mistake (a DParallelError, or an OS failure they can mend: permission, disk full,
    a path of the wrong kind) is one line and exit 2; ``--debug`` (or DPARALLEL_DEBUG=1) keeps the traceback."""
    import logging

    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv or os.environ.get("DPARALLEL_DEBUG") == "1"
    argv = [a for a in argv if a != "--debug"]
    # Lightning's info lines (accelerator summary, cloud-logging tips) drown our own progress output.
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    # The one warning we cannot fix: Lightning's own code calling a torch API torch has deprecated.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    # The policy steps its optimizer by hand (two GRPO updates per rollout batch); its checkpoint is meant to hold
    # the state after the step, the one a resume continues from, which is what Lightning saves while it warns so.
    warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
    try:
        code = run(argv)
    except DParallelError as e:
        if debug:
            raise
        print(f"dparallel: error: {e}", file=sys.stderr)
        code = e.exit_code
    except OSError as e:
        message = describe_os_error(e)
        if debug or message is None:
            raise
        print(f"dparallel: error: {message}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("dparallel: interrupted (a rerun resumes from the last checkpoint or shard)", file=sys.stderr)
        code = 130
    sys.exit(code)
