"""The ``epmq`` command line: thin wrappers that parse arguments and call :mod:`epmq_jax.pipeline`.

Subcommands: ``run`` (the whole benchmark job), ``merge``, ``quantize``, ``eval``, ``report``,
``export`` (a checkpoint as a Hugging Face GPTQ directory).
Every error the user can cause (a missing file, a bad override, a bad value) ends in one line
``epmq <cmd>: error: ...`` on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from epmq_jax.config import ConfigError, config_name, load_with_overrides, split_override_args

PROG = "epmq"
OVERRIDES_HELP = ("Any config value can be overridden with --config.SECTION.KEY=VALUE "
                  "(type-checked against the config file), e.g. --config.quant.bits=3.")

EXAMPLES = {
    "run": """examples:
  epmq run --config configs/offline_8task.py
  epmq run --config configs/offline_8task.py --workdir /tmp/epmq --config.quant.bits=4,3,2
  epmq run --config configs/offline_8task.py:tiny            # the tiny CI size
  epmq run --config configs/offline_8task.py --config.run.companions=    # narrow regime only
""",
    "merge": """examples:
  epmq merge --config configs/offline_8task.py --method ta
  epmq merge --config configs/offline_8task.py --method ties --scaling 0.5
  epmq merge --mergekit recipe.yml --out merged/ --max-shard-size 5GB    # a mergekit recipe, streamed
""",
    "quantize": """examples:
  epmq quantize --config configs/offline_8task.py --merge ta --method epmq --bits 4
  epmq quantize --config configs/offline_8task.py --merge ties --method gptq --bits 3 --out /tmp/q
""",
    "eval": """examples:
  epmq eval --checkpoint runs/offline_8task/checkpoints/ta_epmq_w4
  epmq eval --checkpoint runs/clip_vit_b32_ta8/checkpoints/ta_epmq_w4    # a Hugging Face run's checkpoint
""",
    "export": """examples:
  epmq export --checkpoint runs/offline_8task/checkpoints/ta_epmq_w4 --out /tmp/ta_epmq_w4-gptq
  epmq export --checkpoint runs/llama/checkpoints/ta_epmq_w4 --out llama-gptq --format gptq_v2 --overwrite
""",
    "report": """examples:
  epmq report --workdir runs/offline_8task
  epmq report --results runs/offline_8task/results.json --plots
""",
}


class UsageError(Exception):
    """A bad command line (reported in one line, exit status 2)."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``epmq run: error: ... (see epmq run --help)``."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: error: {message} (see {self.prog} --help)")


def _add_config_args(p: argparse.ArgumentParser, *, required: bool = True,
                     group: Any = None) -> None:
    (group or p).add_argument("--config", required=required, metavar="FILE[:ARG]",
                   help="config file with get_config() (ml_collections); FILE:ARG passes ARG to get_config")
    p.add_argument("--workdir", metavar="DIR",
                   help="run directory for outputs and the training cache (default ./runs/<config name>)")


def build_parser() -> argparse.ArgumentParser:
    """The ``epmq`` argument parser (config overrides are split off before it runs)."""
    parser = _Parser(prog=PROG, description="Post-merge quantization of expert models: merge, quantize "
                     "with RTN/GPTQ/AWQ/E-PMQ, evaluate, report.",
                     epilog="Run 'epmq COMMAND --help' for a command's options and examples.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    fmt = argparse.RawDescriptionHelpFormatter

    p = sub.add_parser("run", help="the whole job: train (cached), merge, quantize, evaluate, write the report",
                       description="Trains (or loads from the cache) the experts, merges them, quantizes every "
                       "merge with RTN, GPTQ, AWQ and E-PMQ, evaluates every variant on every task's test split "
                       "(choices made on validation) and writes results.json/.md/.csv, plots, solver stats and "
                       "the packed 4-bit E-PMQ checkpoint; then the same for each companion config "
                       "(run.companions) into WORKDIR/<its name>/, whose tables the report and printout "
                       "gain. " + OVERRIDES_HELP + " --config.run.* overrides reach the companions too; "
                       "--config.run.companions= (empty) runs the config alone.",
                       epilog=EXAMPLES["run"], formatter_class=fmt)
    _add_config_args(p)
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")

    p = sub.add_parser("merge", help="merge the experts with one method and evaluate the FP merge",
                       description="Merges the config's experts (training them first if the pool trains) with "
                       "one method, chooses the merge coefficient (or RegMean's alpha) on validation unless "
                       "the config or --scaling fixes it, evaluates on the reported split and saves the merged "
                       "parameters. " + OVERRIDES_HELP + " With --mergekit instead: runs a mergekit YAML "
                       "recipe (task_arithmetic, ties, dare_ties, dare_linear, linear) on Hugging Face "
                       "checkpoints tensor by tensor and writes the merged checkpoint to --out.",
                       epilog=EXAMPLES["merge"], formatter_class=fmt)
    source = p.add_mutually_exclusive_group(required=True)
    _add_config_args(p, required=False, group=source)
    source.add_argument("--mergekit", metavar="RECIPE.yaml", help="a mergekit recipe to run, streamed")
    p.add_argument("--method", choices=("ta", "ties", "regmean"), help="merge method (with --config)")
    p.add_argument("--scaling", type=float, help="merge coefficient (default: chosen on validation)")
    p.add_argument("--out", metavar="DIR", help="with --mergekit: the merged checkpoint directory")
    p.add_argument("--max-shard-size", default="5GB", metavar="SIZE",
                   help="with --mergekit: shard model.safetensors above this size (default 5GB)")
    p.add_argument("--overwrite", action="store_true", help="with --mergekit: replace an existing --out")

    p = sub.add_parser("quantize", help="quantize one merge with one method, evaluate it and save it packed",
                       description="Merges (as 'epmq merge'), quantizes with one method and bit width, "
                       "evaluates on the reported split and saves the packed checkpoint, which 'epmq eval "
                       "--checkpoint' reloads. " + OVERRIDES_HELP,
                       epilog=EXAMPLES["quantize"], formatter_class=fmt)
    _add_config_args(p)
    p.add_argument("--merge", default="ta", choices=("ta", "ties", "regmean"), help="merge method (default ta)")
    p.add_argument("--method", default="epmq", choices=("rtn", "gptq", "awq", "epmq"),
                   help="quantizer (default epmq, with the config's calib switches)")
    p.add_argument("--bits", type=int, default=4, choices=range(2, 9), metavar="{2..8}", help="weight bits (default 4)")
    p.add_argument("--out", metavar="DIR", help="checkpoint directory (default WORKDIR/checkpoints/MERGE_METHOD_wBITS)")

    p = sub.add_parser("eval", help="reload a packed checkpoint and evaluate it on every task",
                       description="Reloads a checkpoint written by 'epmq run' or 'epmq quantize' (offline or "
                       "Hugging Face run), evaluates it on every task's evaluation split and compares with the "
                       "row recorded when it was saved.",
                       epilog=EXAMPLES["eval"], formatter_class=fmt)
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="checkpoint directory")

    p = sub.add_parser("export", help="write a packed checkpoint as a Hugging Face GPTQ model directory",
                       description="Writes the model of a checkpoint from 'epmq run' or 'epmq quantize' as a "
                       "Hugging Face directory (config.json with quantization_config, model.safetensors with "
                       "GPTQ-packed linears, tokenizer files) that transformers, GPTQModel and vLLM load and "
                       "epmq_jax.models.from_pretrained reads back. CLIP runs give the vision tower "
                       "(CLIPVisionModelWithProjection).",
                       epilog=EXAMPLES["export"], formatter_class=fmt)
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="checkpoint directory")
    p.add_argument("--out", required=True, metavar="DIR", help="model directory to write")
    p.add_argument("--format", default="gptq", choices=("gptq", "gptq_v2"),
                   help="checkpoint_format: gptq (v1, zero points minus one; AutoGPTQ, transformers, "
                   "vLLM) or gptq_v2 (GPTQModel); default gptq")
    p.add_argument("--overwrite", action="store_true", help="replace an existing model directory at --out")

    p = sub.add_parser("report", help="print the table of a finished run and rewrite its report files",
                       description="Prints the table from results.json and rewrites results.md, results.csv "
                       "(and, with --plots, the PNG plots) next to it; a run with companion configs prints "
                       "and writes their tables too (from its results.json; plots and CSV: its own rows).",
                       epilog=EXAMPLES["report"], formatter_class=fmt)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--workdir", metavar="DIR", help="run directory holding results.json")
    g.add_argument("--results", metavar="FILE", help="a results.json file")
    p.add_argument("--plots", action="store_true", help="also redraw the plots")
    return parser


def _workdir(args: argparse.Namespace) -> Path:
    return Path(args.workdir) if args.workdir else Path("runs") / config_name(args.config)


def _merge_recipe(args: argparse.Namespace, overrides: list[tuple[str, str]]) -> int:
    """``epmq merge --mergekit``: no config, no pipeline; the streaming merge of a recipe."""
    usage = f"{PROG} merge: error: %s (see {PROG} merge --help)"
    given = [f"--{k}" for k in ("method", "scaling", "workdir") if getattr(args, k) is not None]
    if given or overrides:
        raise UsageError(usage % f"{(given or ['--config.*'])[0]} applies to --config merges, not --mergekit")
    if not args.out:
        raise UsageError(usage % "--mergekit needs --out DIR")
    from epmq_jax.merge import merge_recipe

    summary = merge_recipe(args.mergekit, args.out, max_shard_size=args.max_shard_size,
                           overwrite=args.overwrite, progress=True)
    print(f"wrote {summary.out_dir}: {summary.merged} tensors merged, {summary.copied} copied "
          f"({', '.join(summary.files)})")
    return 0


def _dispatch(args: argparse.Namespace, overrides: list[tuple[str, str]]) -> int:
    # Check everything the user gave before importing the pipeline (and jax): errors come fast.
    if args.command == "merge":
        if args.mergekit is not None:
            return _merge_recipe(args, overrides)
        stray = [f"--{k}" for k in ("out", "overwrite") if getattr(args, k)]
        stray += ["--max-shard-size"] if args.max_shard_size != "5GB" else []
        if stray:
            raise UsageError(f"{PROG} merge: error: {stray[0]} applies to --mergekit merges "
                             f"(see {PROG} merge --help)")
        if args.method is None:
            raise UsageError(f"{PROG} merge: error: the following arguments are required: --method "
                             f"(see {PROG} merge --help)")
    if args.command in ("eval", "report", "export"):
        if overrides:
            raise UsageError(f"{PROG} {args.command}: error: --config.* overrides only apply to "
                             "run, merge and quantize")
        if args.command in ("eval", "export") and not Path(args.checkpoint).is_dir():
            raise UsageError(f"{PROG} {args.command}: error: no checkpoint directory at {args.checkpoint}")
        results = Path(args.results) if args.command == "report" and args.results else None
        if args.command == "report":
            results = results or Path(args.workdir) / "results.json"
            if not results.is_file():
                raise UsageError(f"{PROG} report: error: no results file at {results}")
    else:
        cfg = load_with_overrides(args.config, overrides)
        workdir = _workdir(args)
        from epmq_jax.pipeline.validate import check_companions, check_config

        check_config(cfg)   # the whole config, before jax starts or anything is built
        if args.command == "run":
            check_companions(cfg)   # and every companion config `run` runs after it

    from epmq_jax import pipeline, report

    if args.command == "report":
        pipeline.write_report(report.read_json(results), results.parent, plots=args.plots)
    elif args.command == "export":
        from epmq_jax.pipeline.checkpoints import export_checkpoint

        export_checkpoint(args.checkpoint, args.out, checkpoint_format=args.format, overwrite=args.overwrite)
    elif args.command == "eval":
        result = pipeline.eval_checkpoint(Path(args.checkpoint))
        return 0 if result["matches_recorded"] in (True, None) else 1
    elif args.command == "run":
        pipeline.run(cfg, workdir, plots=not args.no_plots)
    elif args.command == "merge":
        pipeline.merge_command(cfg, workdir, args.method, scaling=args.scaling)
    elif args.command == "quantize":
        pipeline.quantize_command(cfg, workdir, args.merge, args.method, args.bits,
                                  out=Path(args.out) if args.out else None)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``epmq`` script.

    Returns:
      The exit status: 0 ok, 1 ``eval`` did not reproduce the recorded row, 2 usage or input
      error, 130 interrupted. Set ``EPMQ_DEBUG=1`` to get tracebacks instead of one-line errors.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    prog = f"{PROG} {command}" if command in EXAMPLES else PROG
    try:
        overrides, rest = split_override_args(argv)
        return _dispatch(build_parser().parse_args(rest), overrides)
    except UsageError as e:
        print(e, file=sys.stderr)
        return 2
    except (ConfigError, OSError, ValueError, ImportError) as e:
        if os.environ.get("EPMQ_DEBUG"):
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"{prog}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
