"""The ``hymoe`` command: train, data, model, precision, demo. ``hymoe COMMAND --help`` explains each."""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from hymoe.launch.cli import cmd_launch
from hymoe.launch.plan_cli import cmd_plan
from hymoe.train.eval_cli import cmd_eval, cmd_generate


def _quiet():
    # megatron-core warns at import about every optional GPU package it cannot find.
    warnings.filterwarnings("ignore")
    os.environ.setdefault("PYTHONWARNINGS", "ignore")


def _fail(msg: str, code: int = 2):
    print(f"hymoe: error: {msg}", file=sys.stderr)
    sys.exit(code)


# -- train -------------------------------------------------------------------------------------
TRAIN_HELP = """Train a recipe. RECIPE is a file name in recipes/ (e.g. tiny, tiny_gpu); overrides are
Hydra's KEY=VALUE (e.g. train.steps=20 parallel.tp=2 precision=nvfp4). -m/--multirun sweeps
comma-separated values (optim.lr=1e-3,3e-3), one run after another. `hymoe train RECIPE --help`
lists every key with its value in that recipe and what it does."""


def _schema_help(recipe: str, overrides: list[str]) -> str:
    """Every key of the composed recipe with its value and the comment from the schema."""
    import dataclasses
    import inspect

    from omegaconf import OmegaConf

    from hymoe.train.config import HymoeConfig
    from hymoe.train.recipe import compose

    cfg = compose(recipe, overrides)

    def comments(cls) -> dict:
        out, pending = {}, []
        for line in inspect.getsource(cls).splitlines():
            s = line.strip()
            if s.startswith("#"):
                pending.append(s.lstrip("# "))
            elif ":" in s and not s.startswith(("def", "class", "@", '"')):
                out[s.split(":")[0].strip()] = " ".join(pending)
                pending = []
            else:
                pending = []
        return out

    lines = [f"hymoe train {recipe} [KEY=VALUE ...]   (groups: model parallel precision data optim logging checkpoint)", ""]
    for section in dataclasses.fields(HymoeConfig):
        sub = section.default_factory if section.default_factory is not dataclasses.MISSING else None
        if sub is None or not dataclasses.is_dataclass(sub):
            continue
        docs = comments(sub)
        lines.append(f"{section.name}:")
        node = cfg[section.name]
        for f in dataclasses.fields(sub):
            value = OmegaConf.to_container(node, resolve=False).get(f.name)
            doc = docs.get(f.name, "")
            lines.append(f"  {section.name}.{f.name} = {value!r}" + (f"    # {doc}" if doc else ""))
    return "\n".join(lines)


def cmd_train(argv: list[str]) -> int:
    """train a recipe (Hydra overrides, -m multirun)"""
    p = argparse.ArgumentParser(prog="hymoe train", description=TRAIN_HELP, add_help=False)
    p.add_argument("recipe", nargs="?")
    p.add_argument("-m", "--multirun", action="store_true", help="sweep comma-separated overrides")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("-h", "--help", action="store_true")
    args, overrides = p.parse_known_args(argv)
    _quiet()
    from hymoe.train.config import ConfigError
    from hymoe.train.recipe import list_recipes, load_recipe, to_yaml
    from hymoe.train.sweep import run_sweep, split_sweep_dir, sweep_points

    if args.recipe is None:
        p.print_help()
        print(f"\nrecipes: {', '.join(list_recipes())}")
        return 0 if args.help else 2
    try:
        if args.help:
            print(TRAIN_HELP + "\n")
            print(_schema_help(args.recipe, overrides))
            return 0
        if args.print_config:
            from hymoe.train.config import validate

            jobs = [job for _, job in sweep_points(overrides)] if args.multirun else [overrides]
            for job in jobs:
                cfg = load_recipe(args.recipe, job)
                validate(cfg, int(os.environ.get("WORLD_SIZE", "1")))
                print(to_yaml(cfg))
            return 0
        from hymoe.launch.diagnostics import print_startup

        if args.multirun:
            sweep_dir, rest = split_sweep_dir(args.recipe, overrides)
            print(f"multirun: {len(sweep_points(rest))} jobs in {sweep_dir}")
            # print_startup: rank 0's layout, rendezvous/NCCL env, GPU, versions, backend
            for _ in run_sweep(args.recipe, rest, sweep_dir,
                               before_job=lambda _, cfg: print_startup(cfg)):
                pass
        else:
            from hymoe.train.trainer import Trainer

            cfg = load_recipe(args.recipe, overrides)
            print_startup(cfg)
            Trainer(cfg).train()
    except ConfigError as e:
        _fail(str(e))
    except Exception as e:  # noqa: BLE001 - known failure kinds become one line, exit 1
        from hymoe.data import DataError
        from hymoe.train.checkpoint import CheckpointError

        if isinstance(e, (CheckpointError, DataError, FloatingPointError)):
            _fail(f"{type(e).__name__}: {e}", 1)
        raise
    return 0


# -- data --------------------------------------------------------------------------------------
def cmd_data(argv: list[str]) -> int:
    """prepare / verify tokenized shards"""
    p = argparse.ArgumentParser(prog="hymoe data", description="Prepare and check tokenized data.")
    sub = p.add_subparsers(dest="cmd", required=True)
    prep = sub.add_parser(
        "prepare",
        help="tokenize text/jsonl/parquet files into webdataset shards + manifest.json",
        description="Tokenize text files (one document each), jsonl (a 'text' field per line) or "
        "parquet (a 'text' column) into webdataset tar shards with a manifest of counts and "
        "sha256 checksums.",
    )
    prep.add_argument("--input", nargs="+", required=True, metavar="GLOB", help="input files or globs")
    prep.add_argument("--output", required=True, help="output folder")
    tok = prep.add_mutually_exclusive_group(required=True)
    tok.add_argument("--tokenizer", help="a Hugging Face tokenizer.json to use")
    tok.add_argument("--train-tokenizer", type=int, metavar="VOCAB", help="train a byte-level BPE of this vocabulary size on the input")
    prep.add_argument("--shard-tokens", type=int, default=1_000_000, help="tokens per shard (default 1M)")
    prep.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    prep.add_argument("--valid-every", type=int, default=0, metavar="N",
                      help="hold out every N-th document for the validation loss, written to "
                           "OUTPUT/valid (data.valid_path); e.g. 100 for 1%%")
    prep.add_argument("--text-field", default="text",
                      help="the jsonl field / parquet column holding the text (default: text)")
    ver = sub.add_parser(
        "verify", help="check every shard against the manifest (exit 1 on problems)",
        description="Check every shard of a prepared directory (or remote location) against its "
        "manifest: presence, size, sha256, sample and token counts; a damaged shard is walked to "
        "name the sample. Prints one line per problem and exits 1 if there is any.")
    ver.add_argument("dir", help="a prepared directory, an http(s):// URL of one, or a pipe: command")
    ver.add_argument("--workers", type=int, default=0,
                     help="shards checked at once, in threads (default: one per CPU, at most 8)")
    demo = sub.add_parser("demo", help="prepare the embedded demo corpus (Python stdlib source)")
    demo.add_argument("--output", required=True)
    demo.add_argument("--vocab", type=int, default=2048)
    demo.add_argument("--max-bytes", type=int, default=3_000_000)
    args = p.parse_args(argv)
    from hymoe.data import DataError

    try:
        if args.cmd == "prepare":
            from hymoe.data.prepare import prepare

            kwargs = dict(tokenizer=args.tokenizer, train_tokenizer_vocab=args.train_tokenizer,
                          shard_tokens=args.shard_tokens, workers=args.workers,
                          text_field=args.text_field)
            if args.valid_every:
                from hymoe.data.prepare import prepare_split

                m, v = prepare_split(args.input, args.output, args.valid_every, **kwargs)
                print(f"held out {v['totals']['documents']:,} documents, {v['totals']['tokens']:,} "
                      f"tokens → {args.output}/valid (data.valid_path)")
            else:
                m = prepare(args.input, args.output, **kwargs)
            print(f"wrote {len(m['shards'])} shards, {m['totals']['tokens']:,} tokens → {args.output}")
        elif args.cmd == "verify":
            from hymoe.data import verify

            if args.workers < 0:
                _fail(f"--workers: must be >= 0, got {args.workers}", 2)
            problems = verify(args.dir, workers=args.workers, progress=True)
            for line in problems:
                print(line)
            if problems:
                return 1
            print(f"{args.dir}: all shards match the manifest")
        else:
            from hymoe.data.prepare import prepare_demo

            m = prepare_demo(args.output, args.vocab, args.max_bytes)
            print(f"wrote {len(m['shards'])} shards, {m['totals']['tokens']:,} tokens → {args.output}")
    except DataError as e:
        _fail(str(e), 1)
    return 0


# -- model / precision -------------------------------------------------------------------------
def cmd_model(argv: list[str]) -> int:
    """model info: layer pattern and parameter counts"""
    p = argparse.ArgumentParser(prog="hymoe model", description="Inspect a recipe's model.")
    sub = p.add_subparsers(dest="cmd", required=True)
    info = sub.add_parser("info", help="layer pattern and parameter counts")
    info.add_argument("recipe")
    info.add_argument("overrides", nargs="*")
    info.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    _quiet()
    from hymoe.train.config import ConfigError
    from hymoe.train.inspect import model_info

    try:
        print(model_info(args.recipe, args.overrides, as_json=args.json))
    except ConfigError as e:
        _fail(str(e))
    return 0


def cmd_precision(argv: list[str]) -> int:
    """precision show: each linear layer's format and the rule that chose it"""
    p = argparse.ArgumentParser(prog="hymoe precision", description="Inspect precision policies.")
    sub = p.add_subparsers(dest="cmd", required=True)
    show = sub.add_parser("show", help="every linear layer with its format and the rule that chose it")
    show.add_argument("recipe")
    show.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    _quiet()
    from hymoe.train.config import ConfigError
    from hymoe.train.inspect import precision_table

    try:
        print(precision_table(args.recipe, args.overrides))
    except ConfigError as e:
        _fail(str(e))
    return 0


def cmd_demo(argv: list[str]) -> int:
    """the tiny model in BF16 and NVFP4 with a loss-curve comparison"""
    p = argparse.ArgumentParser(
        prog="hymoe demo",
        description="Train the tiny hybrid MoE on the demo corpus in BF16 and in emulated NVFP4 and "
        "write the loss-curve comparison to runs/demo/.",
    )
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--steps", type=int, default=None, help="override train.steps")
    args = p.parse_args(argv)
    _quiet()
    from hymoe.train.demo import run_demo

    run_demo(args.out, args.steps)
    return 0


def cmd_compare(argv: list[str]) -> int:
    """compare loss curves of runs (plot + gap)"""
    p = argparse.ArgumentParser(
        prog="hymoe compare",
        description="Compare the loss curves of runs (metrics.jsonl, or wandb's local run files); "
                    "write a plot and a summary.",
    )
    p.add_argument("runs", nargs="+", help="run directories or wandb run folders (the first is the "
                                           "baseline)")
    p.add_argument("--out", default=None, help="folder for loss_curves.png and compare.json")
    p.add_argument("--max-gap", type=float, default=None, metavar="PCT",
                   help="exit 1 if the final loss gap to the baseline exceeds PCT percent")
    p.add_argument("--max-val-gap", type=float, default=None, metavar="PCT",
                   help="exit 1 if the last validation loss's gap to the baseline exceeds PCT "
                        "percent (runs with train.eval_interval)")
    args = p.parse_args(argv)
    _quiet()
    from hymoe.train.compare import compare_runs

    try:
        summary = compare_runs(args.runs, args.out or args.runs[0])
    except (FileNotFoundError, ValueError) as e:
        _fail(str(e), 1)
    for line in summary["lines"]:
        print(line)
    if args.max_gap is not None and summary["max_gap_pct"] > args.max_gap:
        _fail(f"final loss gap {summary['max_gap_pct']:.2f}% exceeds --max-gap {args.max_gap}%", 1)
    if args.max_val_gap is not None:
        gap = summary["max_val_gap_pct"]
        if gap is None:
            _fail("--max-val-gap: not every run has a validation loss; train them with "
                  "data.valid_path and train.eval_interval", 2)
        if gap > args.max_val_gap:
            _fail(f"validation loss gap {gap:.2f}% exceeds --max-val-gap {args.max_val_gap}%", 1)
    return 0


def cmd_convert(argv: list[str]) -> int:
    """Hugging Face nemotron_h <-> hymoe checkpoints"""
    p = argparse.ArgumentParser(prog="hymoe convert", description="Convert checkpoints.")
    sub = p.add_subparsers(dest="cmd", required=True)
    to = sub.add_parser("to-hf", help="a training checkpoint (any layout) -> HF nemotron_h folder",
                        description="Reads the checkpoint one layer at a time and writes 5 GiB "
                                    "safetensors shards as they fill: memory holds a layer and a "
                                    "shard, not the model.")
    to.add_argument("checkpoint", help="a step_* folder, a checkpoints or run folder (its latest), "
                    "a folder of runs (the newest), or `convert from-hf` output")
    to.add_argument("out")
    to.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    fr = sub.add_parser("from-hf", help="an HF nemotron_h folder -> model weights + model.yaml")
    fr.add_argument("hf_dir")
    fr.add_argument("out")
    fr.add_argument("--mtp-depths", type=int, default=None, metavar="N",
                    help="run the shared MTP block at N depths (default: the config's "
                         "mtp_num_layers, else one per block). Nemotron 3 Super's config.json "
                         "records one shared MTP layer but it was trained with 2 depths: "
                         "--mtp-depths 2")
    args = p.parse_args(argv)
    if getattr(args, "mtp_depths", None) is not None and args.mtp_depths < 1:
        p.error(f"--mtp-depths {args.mtp_depths}: N must be at least 1")
    _quiet()
    from hymoe.train import convert
    from hymoe.train.checkpoint import CheckpointError

    try:
        if args.cmd == "to-hf":
            print(f"wrote {convert.to_hf(args.checkpoint, args.out, args.dtype, progress=True)}")
        else:
            out = convert.from_hf(args.hf_dir, args.out, mtp_depths=args.mtp_depths)
            print(f"wrote {out} (train from it: checkpoint.init_weights={out}; model keys in {out}/model.yaml)")
    except (CheckpointError, ValueError, FileNotFoundError) as e:
        _fail(f"{type(e).__name__}: {e}", 1)
    return 0


COMMANDS = {
    "train": cmd_train, "data": cmd_data, "model": cmd_model, "precision": cmd_precision,
    "demo": cmd_demo, "compare": cmd_compare, "convert": cmd_convert,
    "launch": cmd_launch,
    "plan": cmd_plan,
    "eval": cmd_eval,
    "generate": cmd_generate,
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: hymoe COMMAND ...\n\ncommands:")
        for name, fn in COMMANDS.items():
            print(f"  {name:10s} {(fn.__doc__ or '').strip()}")
        print("\n`hymoe COMMAND --help` for each; docs/getting_started.md for a walk-through.")
        return 0
    if argv[0] not in COMMANDS:
        _fail(f"unknown command {argv[0]!r}; one of {', '.join(COMMANDS)}")
    return COMMANDS[argv[0]](argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
