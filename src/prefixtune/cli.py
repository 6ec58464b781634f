"""The ``prefixtune`` command line: subcommands that call the library, nothing more.

``train`` and ``eval`` run unchanged under ``torchrun`` / ``accelerate launch`` (``python -m prefixtune``);
only rank 0 prints their results.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from collections.abc import Sequence

from prefixtune.core.config import MODES, PrefixConfig
from prefixtune.training import distributed
from prefixtune.training.loop import NonFiniteLossError, TrainConfig

DEFAULTS_TRAIN = TrainConfig()
DEFAULTS_PREFIX = PrefixConfig()


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default=None,
                   help="generate: e2e (default) | webnlg | dart | path.jsonl | path.csv | hf:NAME; "
                        "classify: sst2 (default) | rte | boolq | path.jsonl/.csv/.tsv")
    p.add_argument("--source-field", default=None, help="source column/key for a .jsonl/.csv/hf: dataset")
    p.add_argument("--target-field", default=None, help="target column/key for a .jsonl/.csv/hf: dataset")


def _train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="prefix-tune a model on a dataset")
    p.add_argument("--task", choices=["generate", "classify"], default="generate",
                   help="generate: table-to-text with a causal LM (default); classify: P-tuning v2 on an encoder")
    p.add_argument("--model", default=None,
                   help="smollm2-135m (default for generate), minilm-l6 (default for classify), a local HF folder, "
                        "or a hub id")
    _add_data_args(p)
    p.add_argument("--text-pair-field", default=None, help="classify: second text column of a file, if any")
    p.add_argument("--label-field", default=None, help="classify: label column of a file (default: label)")
    p.add_argument("--out", required=True, help="run directory (log, checkpoints, best/)")
    p.add_argument("--split", default="train")
    p.add_argument("--dev-split", default="dev", help="split for dev loss ('none' to skip)")
    p.add_argument("--dev-limit", type=int, default=200, help="dev examples for dev loss (seeded subset)")
    p.add_argument("--train-limit", type=int, default=None, help="first N training examples after a seeded shuffle")
    p.add_argument("--max-length", type=int, default=None,
                   help="longest training sequence in tokens (default 256; classify: 128, longer is truncated)")
    p.add_argument("--on-too-long", choices=["error", "truncate", "skip"], default="error",
                   help="what to do with a longer example (truncate cuts the source; both are reported)")
    p.add_argument("--separator", default="\n", help="text between source and target (default: newline)")
    g = p.add_argument_group("prefix")
    g.add_argument("--prefix-length", type=int, default=DEFAULTS_PREFIX.prefix_length)
    g.add_argument("--reparam-hidden", type=int, default=DEFAULTS_PREFIX.reparam_hidden,
                   help="hidden width h of the reparameterization MLP")
    g.add_argument("--no-reparam", action="store_true", help="train the prefix directly (P-tuning v2)")
    g.add_argument("--mode", choices=MODES, default="prefix")
    g.add_argument("--init", default="random", help='random | text:"words" (the model\'s own K/V of the words)')
    g.add_argument("--prefix-dropout", type=float, default=0.0)
    g = p.add_argument_group("optimization")
    g.add_argument("--epochs", type=float, default=DEFAULTS_TRAIN.epochs)
    g.add_argument("--max-steps", type=int, default=None)
    g.add_argument("--batch-size", type=int, default=DEFAULTS_TRAIN.batch_size,
                   help="examples per rank per micro-step; a step sees batch-size × ranks × grad-accum")
    g.add_argument("--grad-accum", type=int, default=DEFAULTS_TRAIN.grad_accum)
    g.add_argument("--lr", type=float, default=DEFAULTS_TRAIN.lr)
    g.add_argument("--warmup-steps", type=int, default=DEFAULTS_TRAIN.warmup_steps)
    g.add_argument("--weight-decay", type=float, default=DEFAULTS_TRAIN.weight_decay)
    g.add_argument("--max-grad-norm", type=float, default=DEFAULTS_TRAIN.max_grad_norm)
    g.add_argument("--seed", type=int, default=DEFAULTS_TRAIN.seed)
    g.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    g.add_argument("--gradient-checkpointing", action="store_true")
    g.add_argument("--eval-every", type=int, default=None, help="dev loss every N steps (keeps the best prefix)")
    g.add_argument("--early-stopping", type=int, default=None, metavar="PATIENCE",
                   help="stop after PATIENCE dev evaluations without improvement")
    g.add_argument("--checkpoint-every", type=int, default=DEFAULTS_TRAIN.checkpoint_every,
                   help="write the resume state every N steps (and at every evaluation)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out exactly where it stopped "
                   "(also on another number of ranks, with the same batch-size × ranks)")
    g = p.add_argument_group("scaling out (under torchrun or accelerate launch)")
    g.add_argument("--fsdp", action="store_true",
                   help="shard the frozen base model's blocks over the ranks (FSDP2) instead of a whole copy each")


def _eval_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="decode one output per unique source and print the metrics "
                                    "(classification runs: accuracy, macro F1, MCC)")
    p.add_argument("run_dir", help="a run directory (uses its best/) or a saved prefix folder with run.json")
    p.add_argument("--data", default=None, help="dataset (default: the one the run trained on)")
    p.add_argument("--split", default=None, help="default: test (classification: dev)")
    p.add_argument("--limit", type=int, default=None, help="first N unique sources")
    p.add_argument("--beams", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--predictions", default=None,
                   help="output file, one prediction per line in source order (required for generation runs)")


def _score_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("score", help="metrics for any system's outputs (one line per unique source)")
    _add_data_args(p)
    p.add_argument("--split", default="test")
    p.add_argument("--limit", type=int, default=None, help="first N unique sources")
    p.add_argument("--predictions", required=True)


def _generate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate from source texts (arguments, or stdin one per line)")
    p.add_argument("run_dir")
    p.add_argument("sources", nargs="*")
    p.add_argument("--beams", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=64)


def _demo_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="a short real run on E2E, then metrics next to the untrained model's")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--train-limit", type=int, default=300)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--eval-limit", type=int, default=40, help="first N test MRs to score")


def _serve_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server for a base model and many prefixes")
    p.add_argument("--model", default="smollm2-135m", help="smollm2-135m (default), a local HF folder, or a hub id")
    p.add_argument("--prefixes", default=None, help="folder of save_pretrained prefix folders (their names are "
                   "the model ids); the admin endpoint loads more from it when $PREFIXTUNE_ADMIN_TOKEN is set")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch-size", type=int, default=32, help="most requests decoded together")
    p.add_argument("--max-waiting", type=int, default=256, help="queue bound; beyond it requests get 503")
    p.add_argument("--max-tokens", type=int, default=1024, help="largest max_tokens a request may ask for")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prefixtune", description="Prefix tuning for transformers models.")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_train_parser, _eval_parser, _score_parser, _generate_parser, _demo_parser, _serve_parser):
        add(sub)
    return parser


def _cmd_train(a: argparse.Namespace) -> int:
    from prefixtune.training.pipeline import ClassifySpec, DataSpec, train_classifier_run, train_run

    dev_split = None if a.dev_split == "none" else a.dev_split
    prefix = PrefixConfig(prefix_length=a.prefix_length, reparam=not a.no_reparam, reparam_hidden=a.reparam_hidden,
                          mode=a.mode, init=a.init, dropout=a.prefix_dropout)
    train = TrainConfig(epochs=a.epochs, max_steps=a.max_steps, batch_size=a.batch_size, grad_accum=a.grad_accum,
                        lr=a.lr, warmup_steps=a.warmup_steps, weight_decay=a.weight_decay,
                        max_grad_norm=a.max_grad_norm, seed=a.seed, precision=a.precision,
                        gradient_checkpointing=a.gradient_checkpointing, eval_every=a.eval_every,
                        early_stopping=a.early_stopping, checkpoint_every=a.checkpoint_every)
    if a.task == "classify":
        cdata = ClassifySpec(data=a.data or "sst2", split=a.split, dev_split=dev_split, train_limit=a.train_limit,
                             text_field=a.source_field, text_pair_field=a.text_pair_field, label_field=a.label_field,
                             max_length=a.max_length or 128)
        summary = train_classifier_run(a.out, a.model or "minilm-l6", cdata, prefix, train, resume=a.resume,
                                       fsdp=a.fsdp)
    else:
        data = DataSpec(data=a.data or "e2e", split=a.split, dev_split=dev_split, dev_limit=a.dev_limit,
                        train_limit=a.train_limit, source_field=a.source_field, target_field=a.target_field,
                        max_length=a.max_length or 256, on_too_long=a.on_too_long, separator=a.separator)
        summary = train_run(a.out, a.model or "smollm2-135m", data, prefix, train, resume=a.resume, fsdp=a.fsdp)
    if distributed.is_main():
        print(json.dumps(summary, indent=2))
    return 0


def _cmd_eval(a: argparse.Namespace) -> int:
    from prefixtune.training.pipeline import evaluate_classifier_run, evaluate_run, run_task

    if run_task(a.run_dir) == "classify":
        result = evaluate_classifier_run(a.run_dir, a.data, a.split or "dev", a.limit, a.predictions)
    else:
        if not a.predictions:
            raise ValueError("--predictions FILE is required to evaluate a generation run")
        result = evaluate_run(a.run_dir, a.data, a.split or "test", a.predictions, limit=a.limit,
                              num_beams=a.beams, max_new_tokens=a.max_new_tokens, batch_size=a.batch_size)
    if distributed.is_main():
        print(json.dumps(result, indent=2))
    return 0


def _cmd_score(a: argparse.Namespace) -> int:
    from prefixtune.tasks.metrics import read_predictions
    from prefixtune.training.pipeline import metrics_for, reference_groups

    data = a.data or "e2e"
    sources, refs = reference_groups(data, a.split, a.limit, a.source_field, a.target_field)
    preds = read_predictions(a.predictions)
    if len(preds) != len(refs):
        raise ValueError(f"{a.predictions}: {len(preds)} predictions, but {data} {a.split} has {len(refs)} "
                         "unique sources" + (f" (first {a.limit})" if a.limit else ""))
    print(json.dumps({"data": data, "split": a.split, "sources": len(sources), **metrics_for(data, preds, refs)},
                     indent=2))
    return 0


def _cmd_generate(a: argparse.Namespace) -> int:
    from prefixtune.tasks.decode import generate_texts
    from prefixtune.training.pipeline import DataSpec, load_trained

    sources = a.sources or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not sources:
        raise ValueError("no source text given (as arguments or on stdin)")
    pm, tokenizer, record = load_trained(a.run_dir)
    fmt = DataSpec(**record["data"]).format
    for out in generate_texts(pm, tokenizer, sources, fmt, num_beams=a.beams, max_new_tokens=a.max_new_tokens,
                              progress=False):
        print(out)
    return 0


def _cmd_demo(a: argparse.Namespace) -> int:
    from prefixtune.training.pipeline import demo

    demo(a.out, train_limit=a.train_limit, epochs=a.epochs, eval_limit=a.eval_limit)
    return 0


def _cmd_serve(a: argparse.Namespace) -> int:
    from prefixtune.server.app import serve

    serve(a.model, a.prefixes, host=a.host, port=a.port, max_batch_size=a.max_batch_size,
          max_waiting=a.max_waiting, max_tokens=a.max_tokens)
    return 0


COMMANDS = {"train": _cmd_train, "eval": _cmd_eval, "score": _cmd_score, "generate": _cmd_generate,
            "demo": _cmd_demo, "serve": _cmd_serve}


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    args = build_parser().parse_args(argv)
    try:
        if args.command in ("train", "eval"):
            distributed.init_from_env()  # several ranks under torchrun / accelerate launch
        return COMMANDS[args.command](args)
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        print(f"prefixtune {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except NonFiniteLossError as exc:
        print(f"prefixtune {args.command}: stopped: {exc}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print(f"prefixtune {args.command}: interrupted; `--resume` continues a training run", file=sys.stderr)
        return 130
    finally:
        distributed.close()


if __name__ == "__main__":
    sys.exit(main())

