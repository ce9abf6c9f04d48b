"""`adapt` command line: a thin layer over adapt.api (the notebooks call the same functions).

    adapt run --domain driving --general-ratio 0.25      # the demo when no --data is given
    adapt format KIND --input SRC --output OUT [--opt key=value] [--strict] [--num-proc N]
    adapt filter INPUT... --output OUT [--eval SET] [--heldout SET] [--set key=value] [--config YAML]
    adapt eval RUN_DIR [--model DIR] [--judge MODEL] [--out REPORT.json]
    adapt export RUN_DIR --out DIR
    adapt convert SRC DST
    adapt sweep --domain driving --ratios 0 0.25 0.5 [--seeds 0 1 2] [--parallel N] [--name NAME]   (or --fractions / --modes)
    adapt dpo --model DIR (--pairs PAIRS.jsonl | --from-records DATA) --out DIR [--opt loss=mpo]
    adapt grpo --model DIR --data DATA --out DIR [--opt key=value]

User errors print one clear message (file, row, what to do) and exit with code 2; a bug in adapt
prints a short message, saves the traceback to a file (ADAPT_CRASH_DIR, default the temp folder)
and exits with code 3.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from adapt.errors import AdaptError, os_error_message, save_traceback


def _options(pairs: list[str] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs or []:
        key, eq, value = pair.partition("=")
        if not eq:
            raise AdaptError(f"--opt {pair!r} is not key=value")
        out[key] = value
    return out


# `adapt run` flags that set a training option: their argparse dest is the option's name
# (TrainConfig / TrainingArguments), so no table translates between the two.
TRAIN_FLAGS = ("mode", "partial", "learning_rate", "num_train_epochs", "max_steps", "gradient_accumulation_steps",
               "max_tiles", "max_length", "loss_reduction", "precision", "save_steps", "lora_r", "lora_alpha",
               "lora_vision", "dataloader_num_workers", "system", "pack", "gradient_checkpointing")


def cmd_run(args: argparse.Namespace) -> int:
    from adapt import api
    from domains import DataSource

    if args.resume:
        api.run(resume=args.resume, progress=not args.quiet)
        return 0
    config = api.load_config_file(args.config) if args.config else api.RunConfig()
    for attr in ("domain", "general_ratio", "model", "mix_by", "seed", "runs_dir", "name", "num_proc"):
        if getattr(args, attr) is not None:  # flags override the config file, checked as it is
            setattr(config, attr, getattr(args, attr))
    if args.data:
        config.data = [DataSource.parse(d).to_dict() for d in args.data]
    if args.general:
        config.general = [DataSource.parse(g if "=" in g else f"general={g}", where="--general").to_dict()
                          for g in args.general]
    config.upsample = config.upsample or args.upsample
    config.strict = config.strict or args.strict
    flags = {name: getattr(args, name) for name in TRAIN_FLAGS if getattr(args, name) is not None}
    config.train = {**config.train, **flags, **_options(args.train_opt)}
    if args.blind:
        config.eval = {**config.eval, "blind": True}
    result = api.run(config, export=not args.no_export, progress=not args.quiet)
    if api.is_main_process():  # under torchrun / accelerate launch every rank returns the same result
        print(json.dumps({"run_dir": str(result.run_dir), "export": str(result.export_dir), **result.scores()},
                         indent=2))
    return 0


def cmd_format(args: argparse.Namespace) -> int:
    import formatters
    from formatters.base import run

    report = run(formatters.get(args.kind), args.input, args.output, strict=args.strict, overwrite=args.overwrite,
                 num_proc=args.num_proc, **_options(args.opt))
    print(report.summary())
    for skip in report.skips[:20]:
        print(f"  skipped {skip}")
    for warning in report.warnings:
        print(f"adapt: warning: {warning}", file=sys.stderr)
    print(f"wrote {Path(args.output) / 'records.jsonl'} and {Path(args.output) / 'meta.json'}")
    return 0


def cmd_filter(args: argparse.Namespace) -> int:
    from adapt import api
    from adapt.data import filtering

    settings = dict(api.load_config_file(args.config).filter if args.config else {})
    settings.update({key: _setting(value) for key, value in _options(args.set).items()})
    settings["contamination"] = list(settings.get("contamination") or []) + list(args.eval or [])
    settings["remove_contaminated"] = settings.get("remove_contaminated", False) or args.remove_contaminated
    report = filtering.filter_files(args.inputs, args.output, filtering.FilterConfig.from_dict(settings),
                                    heldout=args.heldout or [], strict=args.strict)
    print(report.summary())
    print(f"wrote {Path(args.output) / 'meta.json'} and {Path(args.output) / 'filter_report.json'}")
    return 0


NUM_PROC_HELP = ("processes that format the data (default: the cores available); any number writes the same "
                 "bytes")


def _positive(text: str) -> int:
    """An argparse type: a whole number of at least 1 (a process count)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def _setting(text: str) -> Any:
    """A --set value as YAML reads it (3 -> int, 0.5 -> float, false -> bool, [a, b] -> list)."""
    import yaml

    return yaml.safe_load(text)


def cmd_eval(args: argparse.Namespace) -> int:
    from adapt import api

    report = api.evaluate_run(args.run_dir, model=args.model, judge=args.judge, out=args.out,
                              blind=args.blind or None)
    print(json.dumps({name: section.get("score") for name, section in report.items()}, indent=2))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from adapt import api

    out = api.export_run(args.run_dir, args.out, overwrite=args.overwrite)
    print(f"exported to {out}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from adapt.checkpoints.convert import convert_checkpoint

    out = convert_checkpoint(args.src, args.dst, overwrite=args.overwrite)
    print(f"converted to {out}; train it with: adapt run --model {out} ...")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from adapt import api, experiments

    axis = "mode" if args.modes else "domain_fraction" if args.fractions else "general_ratio"  # argparse allows one
    points = (experiments.mode_points(args.modes) if axis == "mode"
              else experiments.fraction_points(args.fractions) if axis == "domain_fraction"
              else experiments.ratio_points(args.ratios or [0, 0.125, 0.25, 0.5, 0.75]))
    base = api.RunConfig(domain=args.domain, general_ratio=args.general_ratio,
                         **({"model": args.model} if args.model else {}))
    stamp = f"sweep-{axis}-{Path(args.domain).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    folder = Path(args.runs_dir or "runs") / (args.name or api.agreed(stamp))
    rows = experiments.run_sweep(folder, points, base=base, seeds=args.seeds, progress=not args.quiet,
                                 parallel=args.parallel)
    choice = experiments.best(rows, tolerance=args.tolerance)
    if api.is_main_process():
        print(json.dumps({"sweep": str(folder), "runs": rows, "summary": choice.summary, "best": choice.message},
                         indent=2, default=str))
    return 0


def cmd_dpo(args: argparse.Namespace) -> int:
    from adapt import api

    summary = api.preference(args.model, args.out, pairs=args.pairs, records=args.from_records,
                             heldout_pairs=args.heldout_pairs, heldout_records=args.heldout_records,
                             options=_options(args.opt), samples=args.samples, resume=args.resume,
                             progress=not args.quiet)
    print(json.dumps({"before": summary["before"]["preference"], "after": summary["after"]["preference"]}, indent=2))
    return 0


def cmd_grpo(args: argparse.Namespace) -> int:
    from adapt import api

    summary = api.grpo(args.model, args.data, args.out, heldout_records=args.heldout, options=_options(args.opt),
                       resume=args.resume, progress=not args.quiet)
    print(json.dumps({"before": summary["before"]["greedy"], "after": summary["after"]["greedy"]}, indent=2))
    return 0


def _posttrain_parsers(sub) -> None:
    dpo = sub.add_parser("dpo", help="preference optimisation (DPO, or the MPO loss mix) on TRL")
    dpo.add_argument("--model", required=True, help="the model to start from (an adapt export, or a preset)")
    dpo.add_argument("--pairs", help="preference JSONL: prompt, chosen, rejected, image (relative to its folder)")
    dpo.add_argument("--from-records", help="labelled records: pairs from the model's own answers, scored")
    dpo.add_argument("--samples", type=int, default=4, help="answers sampled per record with --from-records")
    dpo.add_argument("--heldout-pairs", help="held-out preference JSONL (default: 10%% of the pairs)")
    dpo.add_argument("--heldout-records", help="labelled records for task metrics before/after")
    dpo.add_argument("--out", required=True)
    dpo.add_argument("--opt", action="append", help="PreferenceConfig key=value, e.g. loss=mpo mode=lora beta=0.1")
    dpo.add_argument("--resume", action="store_true")
    dpo.add_argument("--quiet", action="store_true")
    dpo.set_defaults(func=cmd_dpo)

    grpo = sub.add_parser("grpo", help="GRPO with adapt's task metrics as rewards, on TRL")
    grpo.add_argument("--model", required=True)
    grpo.add_argument("--data", required=True, help="labelled records (formatted folder, meta file or JSONL)")
    grpo.add_argument("--heldout", help="held-out labelled records (default: 10%% of --data)")
    grpo.add_argument("--out", required=True)
    grpo.add_argument("--opt", action="append", help="RLConfig key=value, e.g. generations=8 mode=lora")
    grpo.add_argument("--resume", action="store_true")
    grpo.add_argument("--quiet", action="store_true")
    grpo.set_defaults(func=cmd_grpo)


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="adapt", description="Adapt small InternVL models to a domain.")
    sub = top.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="format, mix, train, evaluate and export in one run directory")
    run.add_argument("--domain", help="driving | medical | remote_sensing | path/to/recipe.yaml")
    run.add_argument("--general-ratio", type=float, help="share of general samples in training, in [0, 1)")
    run.add_argument("--mix-by", choices=["samples", "tokens"])
    run.add_argument("--model", help="native InternVL folder or hub id, or a preset (tiny, mini-internvl2-1b, ...)")
    run.add_argument("--data", action="append", help="KIND=PATH[?key=value&...] (repeatable); none: the demo")
    run.add_argument("--general", action="append", help="general data: meta .json / .jsonl / formatted folder")
    run.add_argument("--config", help="a run config YAML (configs/<domain>/<model>.yaml); flags override it")
    run.add_argument("--resume", help="continue the run in this run directory from its last complete checkpoint")
    run.add_argument("--mode", choices=["full", "partial", "lora"])
    run.add_argument("--partial", help="mlp | mlp+llm | vit-last-N")
    run.add_argument("--lr", "--learning-rate", dest="learning_rate", type=float)
    run.add_argument("--epochs", "--num-train-epochs", dest="num_train_epochs", type=float)
    run.add_argument("--max-steps", type=int)
    run.add_argument("--grad-accum", "--gradient-accumulation-steps", dest="gradient_accumulation_steps", type=int)
    run.add_argument("--max-tiles", type=int)
    run.add_argument("--max-length", type=int)
    run.add_argument("--loss-reduction", choices=["token", "sample", "square"])
    run.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"])
    run.add_argument("--save-steps", type=int)
    run.add_argument("--lora-r", type=int)
    run.add_argument("--lora-alpha", type=int)
    run.add_argument("--lora-vision", action="store_const", const=True)
    run.add_argument("--workers", "--dataloader-num-workers", dest="dataloader_num_workers", type=int)
    run.add_argument("--system", help="system message: default (the template's official one, the default), none, or your own text")
    run.add_argument("--no-pack", dest="pack", action="store_const", const=False)
    run.add_argument("--gradient-checkpointing", action="store_const", const="all")
    run.add_argument("--train-opt", action="append",
                     help="any TrainConfig option or transformers.TrainingArguments field, key=value")
    run.add_argument("--seed", type=int)
    run.add_argument("--upsample", action="store_true", help="allow repeating general sources that are too small")
    run.add_argument("--strict", action="store_true", help="fail on the first bad row instead of skipping it")
    run.add_argument("--num-proc", type=_positive, help=NUM_PROC_HELP)
    run.add_argument("--runs-dir")
    run.add_argument("--name")
    run.add_argument("--no-export", action="store_true")
    run.add_argument("--blind", action="store_true", help="also score the trained model on grey images (on in demos)")
    run.add_argument("--quiet", action="store_true", help="print warnings, errors and the final table only; progress goes to RUN_DIR/logs/run.log")
    run.set_defaults(func=cmd_run)

    fmt = sub.add_parser("format", help="turn a source dataset into records (JSONL + meta + report)")
    fmt.add_argument("kind")
    fmt.add_argument("--input", required=True)
    fmt.add_argument("--output", required=True)
    fmt.add_argument("--opt", action="append", help="formatter option key=value (repeatable)")
    fmt.add_argument("--strict", action="store_true")
    fmt.add_argument("--overwrite", action="store_true")
    fmt.add_argument("--num-proc", type=_positive, help=NUM_PROC_HELP)
    fmt.set_defaults(func=cmd_format)

    flt = sub.add_parser("filter", help="drop duplicate, looping, broken or contaminated samples (a report says which)")
    flt.add_argument("inputs", nargs="+", help="formatted folders, InternVL meta .json or .jsonl files")
    flt.add_argument("--output", required=True, help="folder for the kept records, meta.json and filter_report.json")
    flt.add_argument("--eval", action="append", help="an evaluation set to check for contamination (repeatable)")
    flt.add_argument("--remove-contaminated", action="store_true", help="remove contaminated samples, not just report")
    flt.add_argument("--heldout", action="append", help="a held-out set: training copies of it are removed")
    flt.add_argument("--set", action="append", help="a filter setting key=value (repeatable), e.g. perceptual=false")
    flt.add_argument("--config", help="a run config YAML whose filter: section to use (--set overrides it)")
    flt.add_argument("--strict", action="store_true", help="fail on the first invalid row instead of skipping it")
    flt.set_defaults(func=cmd_filter)

    ev = sub.add_parser("eval", help="evaluate a run's model on its held-out sets")
    ev.add_argument("run_dir")
    ev.add_argument("--model", help="model folder to evaluate (default: the run's export)")
    ev.add_argument("--judge", help="local chat model that rates DriveLM answers with the official GPT-score "
                                    "prompt (off by default; the report names it)")
    ev.add_argument("--out", help="save the full report (JSON) here; the run directory is never written")
    ev.add_argument("--blind", action="store_true", help="also score the model with every image replaced by grey")
    ev.set_defaults(func=cmd_eval)

    ex = sub.add_parser("export", help="write a run's model in the HF-native layout")
    ex.add_argument("run_dir")
    ex.add_argument("--out", required=True)
    ex.add_argument("--overwrite", action="store_true")
    ex.set_defaults(func=cmd_export)

    cv = sub.add_parser("convert", help="convert an original OpenGVLab InternVL checkpoint to the HF-native layout")
    cv.add_argument("src")
    cv.add_argument("dst")
    cv.add_argument("--overwrite", action="store_true")
    cv.set_defaults(func=cmd_convert)

    sw = sub.add_parser("sweep", help="one run per setting and seed, same data (general ratio, domain data share or "
                                      "tuning mode); a named sweep reuses its finished runs")
    sw.add_argument("--domain", default="driving")
    axis = sw.add_mutually_exclusive_group()
    axis.add_argument("--ratios", type=float, nargs="+", help="general ratios (default 0 0.125 0.25 0.5 0.75)")
    axis.add_argument("--fractions", type=float, nargs="+", help="shares of the domain training set, e.g. 0.125 0.25 0.5 1")
    axis.add_argument("--modes", nargs="+", help="tuning modes: full lora partial:mlp partial:mlp+llm partial:vit-last-N")
    sw.add_argument("--general-ratio", type=float, default=0.25, help="the mix of --fractions / --modes sweeps")
    sw.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="each setting runs once per seed")
    sw.add_argument("--tolerance", type=float, default=0.1,
                    help="general answer loss within this share of the lowest keeps general skill")
    sw.add_argument("--parallel", type=int, default=1,
                    help="runs at once, each in its own process: one per GPU, or the CPU cores shared out (default 1)")
    sw.add_argument("--model")
    sw.add_argument("--runs-dir")
    sw.add_argument("--name", help="the sweep folder under --runs-dir; run again with the same name to reuse "
                                   "finished runs and resume an interrupted one (default: a new timestamped folder)")
    sw.add_argument("--quiet", action="store_true", help="no progress bar over the runs (each run logs to RUN_DIR/logs/run.log)")
    sw.set_defaults(func=cmd_sweep)
    _posttrain_parsers(sub)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except AdaptError as err:
        print(f"adapt: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # the machine, not adapt: disk full, name too long, permission
        print(f"adapt: error: {os_error_message(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("adapt: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # a bug in adapt: a short message and a report to file, never a bare traceback
        saved = save_traceback(sys.argv[1:] if argv is None else list(argv))
        print(f"adapt: internal error ({type(err).__name__}: {str(err)[:300]})\n"
              f"  this is a bug in adapt; the traceback is saved in {saved}: please file it with the command",
              file=sys.stderr)
        return 3
    finally:
        _leave_process_group()


def _leave_process_group() -> None:
    """Under a launcher, leave the process group before exit: a rank exiting with it alive can abort."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
