"""``hymoe eval``: long-context evaluations of a trained checkpoint, and ``hymoe generate``: text
from it; in one process.

    hymoe eval passkey CKPT --lengths 4k,16k,64k [--depths 0,0.25,0.5,0.75,1] [--trials 5] [--out DIR]
    hymoe eval position-loss CKPT --data DIR --length 16k [--docs 8] [--packed] [--out DIR]
    hymoe generate CKPT --prompt TEXT [--prompt TEXT ...] [--max-new-tokens 64] [--temperature 0.8]

CKPT: a step_* folder, a checkpoints or run folder (its latest), or a folder of runs (the newest).
Imports nothing heavy until a command runs (``hymoe --help`` stays fast).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

CKPT_HELP = ("a step_* folder, a checkpoints or run folder (its latest), a folder of runs "
             "(the newest), or a Hugging Face nemotron_h folder (read in place)")
PASSKEY_HELP = """Passkey retrieval (RULER-style needle in a haystack): a random number hidden at
several depths of filler text, asked for at the end. Score: exact greedy retrieval of its tokens,
checked in one forward pass per trial (hymoe.train.eval_passkey explains why that is exact).
Writes passkey.json and a length × depth heat map (passkey.png) to --out."""
POSITION_HELP = """Per-position negative log-likelihood over long documents of prepared data (each
from its start), in bins and cumulatively; writes position_loss.json and position_loss.png to
--out."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hymoe eval", description="Long-context evaluations of a checkpoint.")
    sub = p.add_subparsers(dest="cmd", required=True)
    pk = sub.add_parser("passkey", help="passkey retrieval vs context length and depth",
                        description=PASSKEY_HELP)
    pk.add_argument("checkpoint", help=CKPT_HELP)
    pk.add_argument("--lengths", required=True, help="comma-separated, e.g. 4k,16k,128k,1M")
    pk.add_argument("--depths", default="0,0.25,0.5,0.75,1",
                    help="needle depths as fractions of the filler (default 0,0.25,0.5,0.75,1)")
    pk.add_argument("--trials", type=int, default=5, help="passkeys per length and depth (default 5)")
    pk.add_argument("--digits", type=int, default=5, help="passkey digits (default 5)")
    pk.add_argument("--seed", type=int, default=0)
    pk.add_argument("--tokenizer", help="tokenizer.json (default: the one in the run's data.path)")
    pk.add_argument("--out", help="folder for passkey.json and passkey.png (default: print only)")
    pl = sub.add_parser("position-loss", help="loss vs position over long documents",
                        description=POSITION_HELP)
    pl.add_argument("checkpoint", help=CKPT_HELP)
    pl.add_argument("--data", required=True, help="a folder written by `hymoe data prepare`")
    pl.add_argument("--length", required=True, help="tokens per sequence, e.g. 16k")
    pl.add_argument("--docs", type=int, default=8, help="documents (or rows) to average (default 8)")
    pl.add_argument("--packed", action="store_true",
                    help="rows of concatenated documents instead of documents from their start")
    pl.add_argument("--bins", type=int, default=32, help="position bins (default 32)")
    pl.add_argument("--seed", type=int, default=0, help="stream seed with --packed")
    pl.add_argument("--out", help="folder for position_loss.json and .png (default: print only)")
    return p


def _fail(msg: str, code: int = 2):
    print(f"hymoe: error: {msg}", file=sys.stderr)
    sys.exit(code)


def cmd_eval(argv: list[str]) -> int:
    """long-context evals of a checkpoint: passkey retrieval, loss vs position"""
    args = _parser().parse_args(argv)
    import warnings

    warnings.filterwarnings("ignore")
    from hymoe.data import DataError
    from hymoe.train.checkpoint import CheckpointError
    from hymoe.train.eval_model import parse_length

    try:
        if args.cmd == "passkey":
            lengths = [parse_length(x) for x in args.lengths.split(",")]
            depths = [float(x) for x in args.depths.split(",")]
            if not all(0 <= d <= 1 for d in depths):
                raise ValueError(f"--depths: fractions in [0, 1], got {args.depths}")
            if args.trials < 1 or args.digits < 1:
                raise ValueError("--trials and --digits must be ≥ 1")
        else:
            length = parse_length(args.length)
            if not Path(args.data, "manifest.json").exists():
                raise ValueError(f"--data: {args.data} has no manifest.json (a `hymoe data prepare` output)")
    except ValueError as e:
        _fail(str(e))
    try:
        return _passkey(args, lengths, depths) if args.cmd == "passkey" else _position(args, length)
    except (CheckpointError, DataError, FileNotFoundError, ValueError) as e:
        _fail(f"{type(e).__name__}: {e}", 1)


def _which(meta: dict) -> str:
    if meta["step"] is not None:
        return f"step {meta['step']}"
    return "Hugging Face folder" if meta.get("hf") else "converted weights"


def _passkey(args, lengths, depths) -> int:
    from hymoe.data import load_tokenizer
    from hymoe.train.eval_model import load_model, tokenizer_path
    from hymoe.train.eval_passkey import run_passkey, write_outputs

    model, meta, path = load_model(args.checkpoint)
    tok = load_tokenizer(tokenizer_path(path, args.tokenizer))
    if tok.get_vocab_size() > meta["vocab_size"]:
        raise ValueError(f"--tokenizer: {tok.get_vocab_size()} tokens, more than the model's "
                         f"vocabulary ({meta['vocab_size']}); pass the tokenizer it was trained with")
    print(f"passkey: {path} ({_which(meta)}), lengths {lengths}, depths {depths}, "
          f"{args.trials} trials each", flush=True)
    result = run_passkey(model, tok, lengths, depths, args.trials, args.digits, args.seed)
    result.update(checkpoint=str(path), step=meta["step"],
                  max_sequence_length=meta["model"].get("max_sequence_length"))
    for L, acc in result["accuracy_by_length"].items():
        cells = [c for c in result["cells"] if c["length"] == int(L)]
        per_depth = "  ".join(f"{c['depth']:.2f}:{c['accuracy']:.2f}" for c in cells)
        print(f"  length {int(L):>8,}: accuracy {acc:.2f}   by depth {per_depth}")
    print(f"accuracy {result['accuracy']:.3f} ({result['method']})")
    if args.out:
        for f in write_outputs(result, Path(args.out)):
            print(f"wrote {f}")
    return 0


def _position(args, length) -> int:
    from hymoe.data import load_manifest
    from hymoe.train.eval_model import load_model
    from hymoe.train.eval_position import long_documents, packed_rows, run_position_loss, write_outputs

    model, meta, path = load_model(args.checkpoint)
    data_vocab = load_manifest(args.data)["tokenizer"]["vocab_size"]
    if data_vocab > meta["vocab_size"]:
        raise ValueError(f"--data: its tokenizer has {data_vocab} tokens, more than the model's "
                         f"vocabulary ({meta['vocab_size']}); use data prepared with its tokenizer")
    if args.packed:
        seqs = packed_rows(args.data, length, args.docs, args.seed)
    else:
        seqs = long_documents(args.data, length, args.docs)
        if not seqs:
            raise ValueError(f"--length: no document in {args.data} has {length + 1} tokens; use a "
                             "shorter --length, data with longer documents, or --packed")
    print(f"position-loss: {path} ({_which(meta)}), {len(seqs)} "
          f"{'rows' if args.packed else 'documents'} of {length:,} tokens", flush=True)
    result = run_position_loss(model, seqs, args.bins)
    result.update(checkpoint=str(path), step=meta["step"], data=str(args.data), packed=args.packed)
    for b in result["bins"]:
        print(f"  positions {b['start']:>8,}–{b['end']:<8,} NLL {b['mean_nll']:.4f}")
    print(f"mean NLL {result['mean_nll']:.4f} over {length:,} positions")
    if args.out:
        for f in write_outputs(result, Path(args.out)):
            print(f"wrote {f}")
    return 0


GENERATE_HELP = """Continue one or more prompts with a checkpoint's model, streaming the text as it
comes: greedy by default (--temperature 0), or sampled with --temperature, --top-k and --top-p from
a seeded generator (the same seed gives the same text). Stops at the end-of-document token, at
--max-new-tokens, or at the model's max_sequence_length. Each new token re-runs the whole sequence
(exact, O(n²)): a check of what a run learned, not a serving engine."""


def _generate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hymoe generate", description=GENERATE_HELP)
    p.add_argument("checkpoint", help=CKPT_HELP + "; or `hymoe convert from-hf` output")
    p.add_argument("--prompt", action="append", required=True,
                   help="text to continue; repeat for several prompts")
    p.add_argument("--max-new-tokens", type=int, default=64, help="per prompt (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); e.g. 0.8")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest (default 0: all)")
    p.add_argument("--top-p", type=float, default=1.0,
                   help="sample within the smallest set of tokens holding this much probability "
                        "(default 1: all)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (prompt i uses seed + i)")
    p.add_argument("--tokenizer", help="tokenizer.json (default: the one beside the weights, else "
                                       "the one in the run's data.path)")
    p.add_argument("--out", help="write the prompts and continuations here as JSON lines")
    return p


def cmd_generate(argv: list[str]) -> int:
    """continue prompts with a checkpoint (greedy or sampled), streaming the text"""
    args = _generate_parser().parse_args(argv)
    import warnings

    warnings.filterwarnings("ignore")
    from hymoe.data import DataError
    from hymoe.train.checkpoint import CheckpointError
    from hymoe.train.generate import Sampling

    sampling = Sampling(args.temperature, args.top_k, args.top_p)
    try:
        sampling.check()
        if args.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens: must be ≥ 1, got {args.max_new_tokens}")
        if not all(args.prompt):
            raise ValueError("--prompt: empty; give some text to continue")
    except ValueError as e:
        _fail(str(e))
    try:
        return _generate(args, sampling)
    except (CheckpointError, DataError, FileNotFoundError, ValueError) as e:
        _fail(f"{type(e).__name__}: {e}", 1)


def _generate(args, sampling) -> int:
    import json
    import time

    from hymoe.data import load_tokenizer
    from hymoe.train.eval_model import load_model, tokenizer_path
    from hymoe.train.generate import generate

    model, meta, path = load_model(args.checkpoint)
    tok = load_tokenizer(tokenizer_path(path, args.tokenizer))
    if tok.get_vocab_size() > meta["vocab_size"]:
        raise ValueError(f"--tokenizer: {tok.get_vocab_size()} tokens, more than the model's "
                         f"vocabulary ({meta['vocab_size']}); pass the tokenizer it was trained with")
    how = ("greedy" if sampling.temperature == 0 else
           f"temperature {sampling.temperature}, top-k {sampling.top_k or 'all'}, "
           f"top-p {sampling.top_p}, seed {args.seed}")
    print(f"generate: {path} ({_which(meta)}), {how}, up to {args.max_new_tokens} new tokens",
          flush=True)
    stop_ids = _stop_ids(tok, path, meta)
    records, total, start = [], 0, time.perf_counter()
    for i, text in enumerate(args.prompt):
        prompt = tok.encode(text).ids
        print(f"\n[{i + 1}] {text}", end="", flush=True)
        shown = [""]

        def stream(new):  # print what the decoded text gained
            now = tok.decode(new)
            if now.startswith(shown[0]) and not now.endswith("\ufffd"):  # not mid-character
                print(now[len(shown[0]):], end="", flush=True)
                shown[0] = now

        max_length = meta["model"].get("max_sequence_length")
        new = generate(model, prompt, args.max_new_tokens, sampling, seed=args.seed + i,
                       stop=stop_ids, max_length=max_length, on_token=stream)
        completion = tok.decode(new)
        rest = completion[len(shown[0]):] if completion.startswith(shown[0]) else f"\n{completion}"
        print(rest, flush=True)
        limit = args.max_new_tokens if max_length is None else min(
            args.max_new_tokens, max_length - len(prompt))
        stop = "eod" if len(new) < limit else (
            "max_new_tokens" if limit == args.max_new_tokens else "max_sequence_length")
        total += len(new)
        records.append({"prompt": text, "completion": completion, "prompt_tokens": prompt,
                        "tokens": new, "stop": stop})
    seconds = time.perf_counter() - start
    print(f"\n{total} tokens in {seconds:.1f} s ({total / max(seconds, 1e-9):.1f} tokens/s)")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("w") as f:
            for r in records:
                f.write(json.dumps({**r, "checkpoint": str(path), "step": meta["step"],
                                    "temperature": sampling.temperature, "top_k": sampling.top_k,
                                    "top_p": sampling.top_p}) + "\n")
        print(f"wrote {out}")
    return 0


def _stop_ids(tok, path: Path, meta: dict) -> set[int]:
    """Where a continuation ends: hymoe's end-of-document token, or for a Hugging Face folder
    whose tokenizer has none, the ``eos_token_id`` of its config.json."""
    import json

    from hymoe.data import DataError
    from hymoe.data.tokenizer import eod_id

    try:
        return {eod_id(tok)}
    except DataError:
        if not meta.get("hf"):
            raise
    eos = json.loads((path / "config.json").read_text()).get("eos_token_id")
    return set(eos) if isinstance(eos, list) else {eos} if isinstance(eos, int) else set()
