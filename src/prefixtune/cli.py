"""The ``prefixtune`` command line: subcommands that call the library, nothing more.

The flags of ``train``, ``eval``, ``generate`` and ``serve`` are generated from the config dataclasses'
fields (``PrefixConfig``, ``TrainConfig``, ``DataSpec``, ``ClassifySpec``, ``DecodeConfig``, ``EngineConfig``,
``ServerConfig``): name, type, choices, default and help (from each class's ``Attributes:`` docstring), so
every default is written once, in its dataclass. ``train --config run.yaml`` reads the same dataclasses from a
file (sections ``data``, ``prefix``, ``train``); flags given on the command line override it.

``train`` and ``eval`` run unchanged under ``torchrun`` / ``accelerate launch`` (``python -m prefixtune``);
only rank 0 prints their results. Every error a user can cause ends in one line on stderr (exit 2).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import re
import sys
import types
import typing
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from prefixtune.core.config import PrefixConfig
from prefixtune.errors import ConfigError, NonFiniteLossError, PrefixtuneError
from prefixtune.files import dataclass_from_dict
from prefixtune.serving.engine import EngineConfig
from prefixtune.tasks.classification import ClassificationTask, ClassifySpec
from prefixtune.tasks.generation import DataSpec, GenerationTask
from prefixtune.tasks.task import DecodeConfig
from prefixtune.training import distributed, pipeline
from prefixtune.training.config import TrainConfig

# field -> flag where today's flag name is not the field's (the README and scripts use these)
FLAG_NAMES = {(PrefixConfig, "dropout"): "--prefix-dropout", (ClassifySpec, "text_field"): "--source-field",
              (DecodeConfig, "batch_size"): "--batch-size"}
TASKS = {"generate": (GenerationTask, DataSpec), "classify": (ClassificationTask, ClassifySpec)}
TRAIN_SECTIONS = {"data": None, "prefix": PrefixConfig, "train": TrainConfig}  # data: the --task's spec
TRAIN_TOP = ("task", "model", "out", "resume", "fsdp")  # the other keys a --config file may hold
DEFAULT_MODELS = {"generate": "smollm2-135m", "classify": "minilm-l6"}


# ----------------------------------------------------------------------------- flags from dataclasses


def field_help(cls: type) -> dict[str, str]:
    """Each field's line of ``cls``'s ``Attributes:`` docstring section (``a / b: text`` names several)."""
    doc = inspect.getdoc(cls) or ""
    if "Attributes:" not in doc:
        return {}
    out: dict[str, str] = {}
    names: list[str] = []
    for line in doc.split("Attributes:", 1)[1].splitlines():
        match = re.match(r"^    (\w[\w /]*):\s*(.*)$", line)
        if match:
            names = [n.strip() for n in match.group(1).split("/")]
            for n in names:
                out[n] = match.group(2)
        elif line.startswith("        ") and names:
            for n in names:
                out[n] += " " + line.strip()
        elif line.strip():
            break
    return out


def flag_of(cls: type, name: str) -> str:
    return FLAG_NAMES.get((cls, name), "--" + name.replace("_", "-"))


def _converter(kind: Any, flag: str) -> tuple[Any, list[str] | None]:
    """(argparse type, choices) of a field type; ``X | None`` takes 'none' for None."""
    args = typing.get_args(kind)
    optional = type(None) in args and (typing.get_origin(kind) in (typing.Union, types.UnionType))
    if optional:
        kind = next(a for a in args if a is not type(None))
    choices = list(typing.get_args(kind)) if typing.get_origin(kind) is typing.Literal else None
    base = str if choices else kind

    def convert(text: str) -> Any:
        if optional and text.lower() == "none":
            return None
        try:
            return base(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag}: expected {base.__name__}, got {text!r}") from None

    convert.__name__ = base.__name__
    return convert, choices


def add_fields(group: Any, cls: type, section: str, skip: Sequence[str] = (),
               defaults: dict[str, str] | None = None) -> None:
    """One flag per field of dataclass ``cls`` (but ``skip``), stored as ``SECTION.FIELD`` only when given.

    Booleans that default to False are ``--flag``; those that default to True are ``--no-flag``.
    ``defaults`` overrides the default shown in the help (where several dataclasses share a flag).
    """
    hints = typing.get_type_hints(cls)
    helps = field_help(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag, shown = flag_of(cls, f.name), (defaults or {}).get(f.name, repr(f.default))
        text = helps.get(f.name, "")
        common = {"dest": f"{section}.{f.name}", "default": argparse.SUPPRESS}
        metavar = {"metavar": f.name.upper()}
        if hints[f.name] is bool:
            negated = f.default is True
            flag = "--no-" + flag[2:] if negated else flag
            text = f"{f.name} = False ({text})" if negated else text
            group.add_argument(flag, action="store_false" if negated else "store_true", help=text, **common)
            continue
        convert, choices = _converter(hints[f.name], flag)
        group.add_argument(flag, type=convert, choices=choices, help=f"{text} (default: {shown})".strip(),
                           **common, **({} if choices else metavar))


def given(args: argparse.Namespace, section: str) -> dict[str, Any]:
    """The ``section`` fields set on the command line, by field name."""
    return {k.split(".", 1)[1]: v for k, v in vars(args).items() if k.startswith(section + ".")}


def read_config(path: str) -> dict[str, Any]:
    """The mapping of a ``--config`` YAML file; keys are checked by the caller, naming the file."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"--config {path}: file not found") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
    unknown = sorted(set(data) - set(TRAIN_TOP) - set(TRAIN_SECTIONS))
    if unknown:
        raise ConfigError(f"{path}: unknown key {unknown[0]!r} (known: {', '.join([*TRAIN_TOP, *TRAIN_SECTIONS])})")
    return data


# ----------------------------------------------------------------------------- parsers


def _train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="prefix-tune a model on a dataset")
    p.add_argument("--config", default=None, metavar="RUN.YAML",
                   help="read task, model, out and the data/prefix/train sections from a YAML file; flags override")
    p.add_argument("--task", choices=list(TASKS), default=argparse.SUPPRESS,
                   help="generate: table-to-text with a causal LM (default); classify: P-tuning v2 on an encoder")
    p.add_argument("--model", default=argparse.SUPPRESS,
                   help=f"{DEFAULT_MODELS['generate']} (default for generate), {DEFAULT_MODELS['classify']} "
                        "(default for classify), a local HF folder, or a hub id")
    p.add_argument("--out", default=argparse.SUPPRESS, help="run directory (log, checkpoints, best/); required")
    g = p.add_argument_group("data (generate: DataSpec; classify: ClassifySpec)")
    shared = {f.name: f"generate {f.default!r}; classify {c.default!r}" if f.default != c.default else repr(f.default)
              for f in dataclasses.fields(DataSpec) for c in dataclasses.fields(ClassifySpec) if f.name == c.name}
    add_fields(g, DataSpec, "data", defaults=shared)
    add_fields(g, ClassifySpec, "cdata", skip=[*shared, "text_field"])
    add_fields(p.add_argument_group("prefix (PrefixConfig)"), PrefixConfig, "prefix")
    g = p.add_argument_group("optimization (TrainConfig)")
    add_fields(g, TrainConfig, "train")
    g.add_argument("--resume", action="store_true", default=argparse.SUPPRESS,
                   help="continue the run in --out exactly where it stopped (also on another number of ranks, "
                        "with the same batch-size × ranks)")
    g = p.add_argument_group("scaling out (under torchrun or accelerate launch)")
    g.add_argument("--fsdp", action="store_true", default=argparse.SUPPRESS,
                   help="shard the frozen base model's blocks over the ranks (FSDP2) instead of a whole copy each")


def _eval_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="predict one output per unique source (classification runs: per example) and "
                                    "print the metrics (classification: accuracy, macro F1, MCC)")
    p.add_argument("run_dir", help="a run directory (uses its best/) or a saved prefix folder with run.json")
    p.add_argument("--data", default=None, help="dataset (default: the one the run trained on)")
    p.add_argument("--split", default=None, help=f"default: {pipeline.EVAL_SPLIT}")
    p.add_argument("--limit", type=int, default=None, help="first N unique sources (or examples)")
    add_fields(p.add_argument_group("decoding (DecodeConfig)"), DecodeConfig, "decode")
    p.add_argument("--predictions", default=None, help="output file, one prediction per line in source order")


def _score_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("score", help="metrics for any system's outputs (one line per unique source)")
    add_fields(p, DataSpec, "data", skip=[f.name for f in dataclasses.fields(DataSpec)
                                          if f.name not in ("data", "source_field", "target_field")])
    p.add_argument("--split", default=pipeline.EVAL_SPLIT["generate"])
    p.add_argument("--limit", type=int, default=None, help="first N unique sources")
    p.add_argument("--predictions", required=True)


def _generate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate from source texts (arguments, or stdin one per line)")
    p.add_argument("run_dir")
    p.add_argument("sources", nargs="*")
    add_fields(p.add_argument_group("decoding (DecodeConfig)"), DecodeConfig, "decode")


def _demo_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="a short real run on E2E, then metrics next to the untrained model's")
    defaults = inspect.signature(pipeline.demo).parameters  # the demo's settings, written once there
    p.add_argument("--out", default=defaults["out_dir"].default)
    p.add_argument("--train-limit", type=int, default=defaults["train_limit"].default)
    p.add_argument("--epochs", type=float, default=defaults["epochs"].default)
    p.add_argument("--eval-limit", type=int, default=defaults["eval_limit"].default, help="first N test MRs to score")


def _serve_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server for a base model and many prefixes")
    p.add_argument("--model", default=DEFAULT_MODELS["generate"],
                   help=f"{DEFAULT_MODELS['generate']} (default), a local HF folder, or a hub id")
    p.add_argument("--prefixes", default=None, help="folder of save_pretrained prefix folders (their names are "
                   "the model ids); the admin endpoint loads more from it when $PREFIXTUNE_ADMIN_TOKEN is set")
    try:  # the server needs the [serve] extra (fastapi); the other commands do not
        from prefixtune.server.app import ServerConfig, serve
    except ImportError:
        return
    params = inspect.signature(serve).parameters  # the settings serve() takes, by their dataclass field names
    add_fields(p.add_argument_group("engine (EngineConfig)"), EngineConfig, "engine",
               skip=[f.name for f in dataclasses.fields(EngineConfig) if f.name not in params])
    for name in ("host", "port"):
        default = params[name].default
        p.add_argument(f"--{name}", type=type(default), default=default, help=f"(default: {default!r})")
    add_fields(p.add_argument_group("server (ServerConfig)"), ServerConfig, "server",
               skip=[f.name for f in dataclasses.fields(ServerConfig) if f.name not in params])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prefixtune", description="Prefix tuning for transformers models.")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_train_parser, _eval_parser, _score_parser, _generate_parser, _demo_parser, _serve_parser):
        add(sub)
    return parser


# ----------------------------------------------------------------------------- commands


def train_settings(a: argparse.Namespace) -> dict[str, Any]:
    """The train job's arguments: the ``--config`` file's values, overridden by the flags given."""
    file = read_config(a.config) if a.config else {}
    where = a.config or "command line"
    top = {k: file[k] for k in TRAIN_TOP if k in file} | {k: getattr(a, k) for k in TRAIN_TOP if hasattr(a, k)}
    kind = top.get("task", "generate")
    if kind not in TASKS:
        raise ConfigError(f"{where}: task {kind!r} (one of {list(TASKS)})")
    if "out" not in top:
        raise ConfigError("--out is required (on the command line or as 'out' in --config)")
    task_cls, spec_cls = TASKS[kind]
    flags = given(a, "data") | given(a, "cdata")
    if spec_cls is ClassifySpec and "source_field" in flags:
        flags["text_field"] = flags.pop("source_field")
    other_task = sorted(set(flags) - {f.name for f in dataclasses.fields(spec_cls)})
    if other_task:
        raise ConfigError(f"{flag_of(DataSpec, other_task[0])}: does not apply to --task {kind}")
    configs = {}
    for section, cls in (("data", spec_cls), ("prefix", PrefixConfig), ("train", TrainConfig)):
        values = file.get(section) or {}
        if isinstance(values, dict):  # else dataclass_from_dict names the section that is not a mapping
            values = _numbers(cls, values, f"{where}: section {section!r}")
            values = values | (flags if section == "data" else given(a, section))
        configs[section] = dataclass_from_dict(cls, values, f"{where}: section {section!r}")
    return {"out_dir": top["out"], "model_name": top.get("model", DEFAULT_MODELS[kind]),
            "task": task_cls(configs["data"]), "prefix": configs["prefix"], "train": configs["train"],
            "resume": bool(top.get("resume", False)), "fsdp": bool(top.get("fsdp", False))}


def _numbers(cls: type, values: dict[str, Any], where: str) -> dict[str, Any]:
    """YAML values of numeric fields written as strings (YAML 1.1 reads ``5e-4`` as one) → numbers."""
    hints = typing.get_type_hints(cls)
    out = dict(values)
    for name, value in values.items():
        kind = hints.get(name)
        if isinstance(value, str) and kind is not None and (int in typing.get_args(kind) or float in
                                                            typing.get_args(kind) or kind in (int, float)):
            try:
                out[name] = _converter(kind, name)[0](value)
            except argparse.ArgumentTypeError:
                raise ConfigError(f"{where}: field {name!r}: expected a number, got {value!r}") from None
    return out


def _decode(a: argparse.Namespace) -> DecodeConfig:
    return dataclass_from_dict(DecodeConfig, given(a, "decode"), "command line")


def _cmd_train(a: argparse.Namespace) -> int:
    summary = pipeline.train_run(**train_settings(a))
    if distributed.is_main():
        print(json.dumps(summary, indent=2))
    return 0


def _cmd_eval(a: argparse.Namespace) -> int:
    result = pipeline.evaluate_run(a.run_dir, a.data, a.split, a.predictions, limit=a.limit, decode=_decode(a))
    if distributed.is_main():
        print(json.dumps(result, indent=2))
    return 0


def _cmd_score(a: argparse.Namespace) -> int:
    task = GenerationTask(dataclass_from_dict(DataSpec, given(a, "data"), "command line"))
    print(json.dumps(pipeline.score_outputs(task, a.split, a.predictions, a.limit), indent=2))
    return 0


def _cmd_generate(a: argparse.Namespace) -> int:
    sources = a.sources or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not sources:
        raise ConfigError("no source text given (as arguments or on stdin)")
    for out in pipeline.generate_outputs(a.run_dir, sources, _decode(a)):
        print(out)
    return 0


def _cmd_demo(a: argparse.Namespace) -> int:
    pipeline.demo(a.out, train_limit=a.train_limit, epochs=a.epochs, eval_limit=a.eval_limit)
    return 0


def _cmd_serve(a: argparse.Namespace) -> int:
    from prefixtune.server.app import serve  # needs the [serve] extra; the parser checked it is there

    settings = given(a, "engine") | given(a, "server")
    serve(a.model, a.prefixes, host=a.host, port=a.port, **settings)
    return 0


COMMANDS = {"train": _cmd_train, "eval": _cmd_eval, "score": _cmd_score, "generate": _cmd_generate,
            "demo": _cmd_demo, "serve": _cmd_serve}
# what a user can cause: our errors, bad values, and files (missing, existing, unreadable: OSError)
USER_ERRORS = (PrefixtuneError, ValueError, OSError)


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    args = build_parser().parse_args(argv)
    try:
        if args.command in ("train", "eval"):
            distributed.init_from_env()  # several ranks under torchrun / accelerate launch
        return COMMANDS[args.command](args)
    except NonFiniteLossError as exc:
        print(f"prefixtune {args.command}: stopped: {exc}", file=sys.stderr)
        return 3
    except USER_ERRORS as exc:
        print(f"prefixtune {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"prefixtune {args.command}: interrupted; `--resume` continues a training run", file=sys.stderr)
        return 130
    finally:
        distributed.close()


def _one_line(exc: BaseException) -> str:
    """The message on one line (a message that spans lines is joined; an empty one gives the type's name)."""
    return " ".join(str(exc).split()) or type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())
