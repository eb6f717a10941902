"""The ``mmkd`` command: fit, cache, eval, export, data and demo.

Imports are lazy so that ``mmkd --help`` and bad-input errors answer without loading the training stack.
Errors a user can cause end with one line on stderr and exit code 2; a failed stage ends with exit code 1.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from mmkd.console import VERBOSE_ENV, quiet_third_party

__all__ = ["main"]

USAGE = """usage: mmkd [-h] [--verbose] {fit,cache,eval,export,report,data,demo} ...

Distill large vision-language teachers into small multimodal students.

subcommands:
  fit       Run (or resume) every stage of a recipe:  mmkd fit RECIPE.yaml [--stage S] [--KEY VALUE ...]
  cache     Run a stage's teacher once and store its top-k log-probs:  mmkd cache RECIPE.yaml --stage S
            Re-check a cache:  mmkd cache --verify DIR
  eval      Score a student or teacher on a ScienceQA-style benchmark:  mmkd eval MODEL --data sqa:DIR
            Score an answer file from any tool:  mmkd eval score ANSWERS.jsonl --data sqa:DIR
  export    Write a run's student as a plain Hugging Face folder:  mmkd export RUN_DIR --out DIR
            A LoRA stage's adapters alone (peft's format):  mmkd export RUN_DIR --out DIR --adapter-only
  report    An HTML page with plots of a run, or runs side by side:  mmkd report RUN_DIR [--compare RUN_DIR ...]
  demo      The offline demo: synthetic world, tiny teacher, tiny LLaVA-KD vs. no distillation, evaluation
  data      Data tools:  mmkd data synth-sqa --out DIR | tokenizer --out DIR | tiny-assets --out DIR

Run 'mmkd SUBCOMMAND --help' for the options of each. --verbose (anywhere on the line) shows every third-party
message that mmkd filters by default (docs/quickstart.md).
"""


class UsageError(Exception):
    """Bad input on the command line (exit code 2)."""


def _user_errors() -> tuple[type[BaseException], ...]:
    from mmkd.train.recipe import RecipeError

    kinds: list[type[BaseException]] = [RecipeError, UsageError, FileNotFoundError, NotADirectoryError]
    try:
        from mmkd.models.errors import ModelNotFoundError

        kinds.append(ModelNotFoundError)
    except ImportError:
        pass
    try:
        from mmkd.data.records import BadRecord

        kinds.append(BadRecord)
    except ImportError:
        pass
    return tuple(kinds)


def _fail(message: str, code: int = 2) -> int:
    print(f"mmkd: error: {message}", file=sys.stderr)
    return code


# ---- fit -------------------------------------------------------------------------------------------------------
FIT_HELP = """usage: mmkd fit RECIPE.yaml [--run-dir DIR] [--stage NAME] [--restart-from NAME] [--print-config]
                [--KEY.PATH VALUE ...]

Run every stage of a recipe in order, in its run directory; run it again after a crash or a kill and it resumes
where it stopped (done stages are skipped, an interrupted stage resumes from its last checkpoint).

positional arguments:
  RECIPE                The recipe YAML file (same as --config RECIPE).

options:
  --run-dir DIR         Run directory (overrides the recipe's run_dir).
  --stage NAME          Run only this stage; earlier stages must be done.
  --restart-from NAME   Rerun this stage and every later one (old outputs are moved to RUN_DIR/archive/).
  --print-config        Print the resolved recipe and exit.
  --KEY.PATH VALUE      Override any recipe value, e.g. --stages.sft.optimizer.lr 1e-5, --trainer.devices 2,
                        or a shared value (--data_root DIR) that every stage referencing ${data_root} sees.
"""


def _split_recipe_path(argv: list[str]) -> tuple[str | None, list[str]]:
    """jsonargparse cannot declare a positional config file: the first bare argument is the recipe."""
    rest = list(argv)
    if "--config" in rest:
        i = rest.index("--config")
        if i + 1 >= len(rest):
            raise UsageError("--config: expected a recipe file")
        path = rest[i + 1]
        del rest[i:i + 2]
        return path, rest
    for i, arg in enumerate(rest):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1], rest[:i] + rest[i + 1:]
        if not arg.startswith("-"):
            if i > 0 and rest[i - 1].startswith("--") and "=" not in rest[i - 1] and "print" not in rest[i - 1]:
                continue  # the value of an option
            return arg, rest[:i] + rest[i + 1:]
    return None, rest


def _fit(argv: list[str], echo: Callable[[str], None]) -> int:
    if argv and argv[0] in ("-h", "--help"):
        print(FIT_HELP)
        return 0
    path, rest = _split_recipe_path(argv)
    if path is None:
        raise UsageError("fit: expected a recipe file: mmkd fit RECIPE.yaml (see mmkd fit --help)")
    for dashed in ("--run-dir", "--restart-from", "--print-config"):  # documented spelling -> parser's key
        rest = [a.replace(dashed, dashed.replace("-", "_").replace("__", "--", 1), 1) if a.startswith(dashed) else a
                for a in rest]
    if any(a in ("-h", "--help") for a in rest):
        from mmkd.train.recipe import build_parser, read_yaml

        raw = read_yaml(path)
        build_parser(list(raw.get("stages") or {}), {}).print_help()
        return 0

    def fit_options(parser: Any) -> None:
        parser.add_argument("--stage", type=str | None, default=None, help="Run only this stage.")
        parser.add_argument("--restart_from", type=str | None, default=None, help="Rerun from this stage.")

    from mmkd.train.recipe import load_recipe

    try:
        recipe = load_recipe(path, rest, extra_arguments=fit_options)
    except SystemExit as done:  # jsonargparse's --print_config prints the resolved recipe and exits
        return int(done.code or 0)
    from mmkd.train.runner import RunError, Runner, summary_rows

    runner = Runner(recipe, only_stage=recipe.options.get("stage"),
                    restart_from=recipe.options.get("restart_from"), echo=echo)
    try:
        manifest = runner.run()
    except RunError as err:
        return _fail(str(err), code=1)
    from mmkd.train.rundir import is_rank_zero

    if is_rank_zero():  # every rank runs the command under DDP; the table is printed once
        _print_summary(summary_rows(manifest), recipe.run_dir)
    return 0


CACHE_HELP = """usage: mmkd cache RECIPE.yaml --stage NAME [--out DIR] [--top-k K] [--batch-size N] [--codec packed|raw]
                  [--KEY.PATH VALUE ...]
       mmkd cache --verify DIR

Run the stage's teacher once over the stage's data, with the stage's collator (same prompts, images and answer
tokens), under the stage's strategy and precision, and store per record what its losses read: the teacher's top-k
log-probs at the answer positions (distillation stages) or its log-probs of both answers (preference stages).
Kill it and run it again: it continues after the last complete shard. A stage reads the cache with
task_args.teacher_cache (docs/cache.md).

options:
  --stage NAME          The stage to cache (required).
  --out DIR             Cache folder (default: the stage's task_args.teacher_cache, else RUN_DIR/caches/NAME).
  --top-k K             Entries per position (default: the stage's topk_kl k, else 64).
  --batch-size N        Records per teacher forward (default: the stage's micro-batch).
  --codec C             packed (about 2 bytes per entry, default) or raw (exact float32).
  --shard-records N     Records per shard (default 4096).
  --verify DIR          Re-check every shard's checksum and the index of the cache in DIR, and exit.
  --KEY.PATH VALUE      Override any recipe value, as for mmkd fit.
"""


def _cache(argv: list[str], echo: Callable[[str], None]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(CACHE_HELP)
        return 0 if argv else 2
    if argv[0] == "--verify" or argv[0].startswith("--verify="):
        folder = argv[0].split("=", 1)[1] if "=" in argv[0] else (argv[1] if len(argv) > 1 else None)
        if folder is None:
            raise UsageError("cache --verify: expected a cache folder")
        from mmkd.train.cache import verify_command

        verify_command(folder)
        return 0
    path, rest = _split_recipe_path(argv)
    if path is None:
        raise UsageError("cache: expected a recipe file: mmkd cache RECIPE.yaml --stage NAME (see mmkd cache --help)")
    for dashed in ("--top-k", "--batch-size", "--shard-records"):
        rest = [a.replace(dashed, dashed.replace("-", "_").replace("__", "--", 1), 1) if a.startswith(dashed) else a
                for a in rest]

    def cache_options(parser: Any) -> None:
        parser.add_argument("--stage", type=str | None, default=None, help="The stage to cache.")
        parser.add_argument("--out", type=str | None, default=None, help="Cache folder.")
        parser.add_argument("--top_k", type=int | None, default=None, help="Entries per position.")
        parser.add_argument("--batch_size", type=int | None, default=None, help="Records per teacher forward.")
        parser.add_argument("--codec", type=str, default="packed", help="packed or raw.")
        parser.add_argument("--shard_records", type=int | None, default=None, help="Records per shard.")

    from mmkd.train.recipe import load_recipe

    recipe = load_recipe(path, rest, extra_arguments=cache_options)
    stage = recipe.options.get("stage")
    if not stage:
        raise UsageError("cache: --stage NAME is required (the stage whose teacher is cached)")
    from mmkd.train.cache import cache_stage

    cache_stage(recipe, stage, out=recipe.options.get("out"), top_k=recipe.options.get("top_k"),
                batch_size=recipe.options.get("batch_size"), codec=recipe.options.get("codec") or "packed",
                shard_records=recipe.options.get("shard_records"), echo=echo)
    return 0


def _print_summary(rows: list[dict[str, Any]], run_dir: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"mmkd fit: {run_dir}")
    for col in ("stage", "status", "steps", "wall time", "final losses"):
        table.add_column(col)
    table.add_column("student", overflow="fold")  # a path wraps onto more lines rather than being cut short
    for r in rows:
        losses = "  ".join(f"{k}={v:.4g}" for k, v in sorted(r["losses"].items()))
        wall = f"{r['wall_time_s']:.1f}s" if r["wall_time_s"] is not None else "-"
        table.add_row(r["stage"], str(r["status"]), str(r["steps"] or 0), wall, losses or "-",
                      str(run_dir / r["student"]) if r["student"] else "-")
    Console().print(table)


# ---- eval / export / data: typed functions, parsed by jsonargparse ----------------------------------------------
def _function_command(func: Callable[..., Any], argv: list[str], prog: str) -> Any:
    from jsonargparse import ArgumentError, ArgumentParser

    parser = ArgumentParser(prog=prog, description=(func.__doc__ or "").strip().split("\n\n")[0],
                            exit_on_error=False)
    # The first parameter is the command's positional argument (mmkd eval MODEL, mmkd export RUN_DIR); every
    # other parameter is an option, required or not (--data, --out).
    import inspect

    first = next(iter(inspect.signature(func).parameters))
    parser.add_function_arguments(func, as_positional=False)
    if any(a in ("-h", "--help") for a in argv):
        parser.print_help()
        return None
    args = [_dashes(a) for a in argv]
    if args and not args[0].startswith("-"):
        args = [f"--{first}", args[0], *args[1:]]
    try:
        cfg = parser.parse_args(args)
    except ArgumentError as err:
        from mmkd.train.recipe import format_parse_error

        raise UsageError(format_parse_error(str(err))) from None
    kwargs = {k: v for k, v in vars(cfg).items() if not k.startswith("__")}
    return func(**kwargs)


def _dashes(arg: str) -> str:
    """Accept ``--max-new-tokens`` for the ``max_new_tokens`` parameter."""
    if arg.startswith("--"):
        name, eq, value = arg[2:].partition("=")
        return "--" + name.replace("-", "_") + eq + value
    return arg


def _eval(argv: list[str]) -> int:
    from mmkd.eval.commands import score_command
    from mmkd.train.evaluate import evaluate_command

    if argv and argv[0] == "score":
        _function_command(score_command, argv[1:], "mmkd eval score")
    else:
        _function_command(evaluate_command, argv, "mmkd eval")
    return 0


def _export(argv: list[str]) -> int:
    from mmkd.train.export import export_command

    # --adapter-only is a flag: without a value it means true
    flags = ("--adapter-only", "--adapter_only")
    argv = [a for i, a in enumerate(argv) for a in ([a, "true"] if a in flags and (
        i + 1 == len(argv) or argv[i + 1].startswith("-")) else [a])]
    _function_command(export_command, argv, "mmkd export")
    return 0


def _data(argv: list[str]) -> int:
    from mmkd.assets import tiny_assets_command
    from mmkd.data import commands

    table = {"synth-sqa": commands.synth_sqa_command, "tokenizer": commands.tokenizer_command,
             "tiny-assets": tiny_assets_command}
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: mmkd data {synth-sqa,tokenizer} ...\n")
        for name, func in table.items():
            print(f"  {name:10s} {(func.__doc__ or '').strip().splitlines()[0]}")
        return 0
    if argv[0] not in table:
        raise UsageError(f"data: unknown subcommand {argv[0]!r} (expected one of {', '.join(table)})")
    result = _function_command(table[argv[0]], argv[1:], f"mmkd data {argv[0]}")
    if isinstance(result, dict) and argv[0] != "tiny-assets":  # tiny-assets prints its own listing
        import json

        print(json.dumps(result, indent=2, default=str))
    return 0


REPORT_HELP = """usage: mmkd report RUN_DIR [--compare RUN_DIR ...] [--names NAME ...] [--out DIR]

Write an HTML page (self-contained) and its PNGs for a run: each stage's loss terms, learning rate and throughput
against step, the evaluation tables (overall and per category), the data summary per stage. With --compare, the
runs side by side (e.g. a teacher and two students). Default output: RUN_DIR/report/ (RUN_DIR/report/compare/
with --compare).
"""


def _report(argv: list[str]) -> int:
    import argparse

    if any(a in ("-h", "--help") for a in argv):
        print(REPORT_HELP)
        return 0
    parser = argparse.ArgumentParser(prog="mmkd report", add_help=False, exit_on_error=False)
    parser.add_argument("run_dir")
    parser.add_argument("--compare", nargs="+", default=[])
    parser.add_argument("--names", nargs="+", default=None)
    parser.add_argument("--out", default=None)
    try:
        args = parser.parse_args(argv)
    except (argparse.ArgumentError, SystemExit) as err:
        raise UsageError(f"report: {err} (see mmkd report --help)") from None
    from pathlib import Path

    runs = [args.run_dir, *args.compare]
    for run in runs:
        if not Path(run).is_dir():
            raise UsageError(f"report: {run}: not a folder (expected a run directory)")
    from mmkd.report import write_report

    print(f"wrote {write_report(runs, out=args.out, names=args.names)}")
    return 0


def _demo(argv: list[str]) -> int:
    from mmkd.demo import demo_command

    _function_command(demo_command, argv, "mmkd demo")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mmkd`` command; returns the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if args else 2
    if args[0] == "--version":
        from mmkd import __version__

        print(f"mmkd {__version__}")
        return 0
    if "--verbose" in args:  # every third-party message too (the filters of mmkd.console are not installed)
        args = [a for a in args if a != "--verbose"]
        os.environ[VERBOSE_ENV] = "1"  # the processes Lightning starts for the other ranks see it too
    if not args:
        print(USAGE)
        return 2
    command, rest = args[0], args[1:]
    if command in ("fit", "cache", "eval", "export", "demo", "report"):
        quiet_third_party()
    commands = {"fit": lambda: _fit(rest, echo=print), "cache": lambda: _cache(rest, echo=print),
                "eval": lambda: _eval(rest),
                "export": lambda: _export(rest), "data": lambda: _data(rest), "demo": lambda: _demo(rest),
                "report": lambda: _report(rest)}
    if command not in commands:
        return _fail(f"unknown subcommand {command!r} (expected one of fit, cache, eval, export, report, data, demo)")
    try:
        return commands[command]()
    except _user_errors() as err:
        return _fail(_one_line(err))
    except ValueError as err:  # readers, models and scorers signal bad input with ValueError
        return _fail(_one_line(err))


def _one_line(err: BaseException) -> str:
    text = str(err.args[0]) if isinstance(err, (KeyError,)) and err.args else str(err)
    return " ".join(text.split()) or type(err).__name__


if __name__ == "__main__":
    sys.exit(main())
