"""The `ollama-compact` command: `serve` runs the daemon; the other verbs mirror Ollama's CLI as
HTTP clients of the daemon at OLLAMA_HOST; `import` writes straight into the local registry."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from . import __version__
from .settings import Settings, SettingsError, env_name, load_settings


def _describe_default(field: str) -> str:
    info = Settings.model_fields[field]
    if info.default_factory is not None:
        value: Any = info.default_factory()  # type: ignore[call-arg]
    else:
        value = info.default
    if value is None or value == "":
        return "unset"
    if isinstance(value, SecretStr):
        return "unset"
    return str(value)


def add_settings_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per setting; the help lists its environment variable and default."""
    group = parser.add_argument_group(
        "settings", "each flag overrides its environment variable; values are validated at startup"
    )
    for field, info in Settings.model_fields.items():
        flag = "--" + field.replace("_", "-")
        description = info.description or ""
        help_text = f"{description} [env {env_name(field)}; default: {_describe_default(field)}]"
        if info.annotation is bool:
            group.add_argument(
                flag,
                dest=field,
                default=None,
                action=argparse.BooleanOptionalAction,
                help=help_text,
            )
        else:
            group.add_argument(
                flag, dest=field, default=None, metavar=field.upper(), help=help_text
            )


def settings_from(args: argparse.Namespace) -> Settings:
    overrides = {
        field: getattr(args, field) for field in Settings.model_fields if hasattr(args, field)
    }
    return load_settings(**overrides)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ollama-compact",
        description="Serve compressed language models and LoRA adapters through the Ollama and "
        "OpenAI APIs. Client commands talk to the daemon at OLLAMA_HOST.",
    )
    parser.add_argument("--version", action="version", version=f"ollama-compact {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = sub.add_parser("serve", help="start the daemon", description="Start the daemon.")
    add_settings_flags(serve)
    serve.add_argument(
        "--ray",
        action="store_true",
        help="run as replicas on Ray Serve behind one ingress routed by model (needs the `ray` "
        "extra; a local Ray cluster unless RAY_ADDRESS names one)",
    )
    serve.add_argument(
        "--replicas", type=int, default=1, help="with --ray: how many daemon replicas [1]"
    )

    run = sub.add_parser("run", help="chat with a model, or answer one prompt")
    run.add_argument("model")
    run.add_argument("prompt", nargs="*", help="one-shot prompt; without it, an interactive chat")
    run.add_argument("--keepalive", default=None, help="how long the model stays loaded")
    run.add_argument("--verbose", action="store_true", help="print timings after each answer")
    run.add_argument(
        "--image",
        action="append",
        type=Path,
        default=[],
        metavar="FILE",
        help="an image the question is about (repeat for several)",
    )
    run.add_argument(
        "--images-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="batch: ask about each image of DIR (.jpg .png .bmp .tiff .gif .webp, by name)",
    )
    run.add_argument(
        "--questions",
        type=Path,
        default=None,
        metavar="FILE",
        help="batch: the questions, one a line, each asked about each image",
    )
    run.add_argument(
        "--format",
        choices=["text", "json"],
        default=None,
        help="batch: print 'name: answer' lines (text) or JSON lines",
    )

    sub.add_parser("list", aliases=["ls"], help="list models")
    sub.add_parser("ps", help="list loaded models")

    show = sub.add_parser("show", help="show a model's information")
    show.add_argument("model")
    for what in ("license", "modelfile", "parameters", "system", "template"):
        show.add_argument(f"--{what}", action="store_true", help=f"show only the {what}")

    pull = sub.add_parser("pull", help="pull a model (hf.co/ORG/REPO[:revision])")
    pull.add_argument("model")

    create = sub.add_parser("create", help="create a model from a Modelfile")
    create.add_argument("model")
    create.add_argument("-f", "--file", default="Modelfile", help="Modelfile path")
    create.add_argument("-q", "--quantize", default=None, help="compression scheme")

    compress = sub.add_parser(
        "compress",
        help="compress a model into a new one (quantize, factor or prune)",
        description="Compress a registry model into a new registry model through the daemon "
        "(POST /api/create with from + quantize). Schemes: int8, int4, int2, nf4, lowrank, "
        "prune, mixed, and Ollama's q8_0, q4_0, q4_1, q4_K_S, q4_K_M.",
    )
    compress.add_argument("model", help="the float model to compress")
    compress.add_argument("name", help="name of the new model")
    compress.add_argument("--scheme", "-s", required=True, help="compression scheme")
    # dest names carry a prefix so they never collide with a settings field
    for flag, kind, text in (
        ("group-size", int, "quantization group size (int4, int2, nf4, mixed)"),
        ("embedding", str, "embedding / head storage: keep, int8, int4, nf4"),
        ("rank", int, "lowrank: rank of every factorised layer"),
        ("energy", float, "lowrank: retained singular-value energy (0-1)"),
        ("method", str, "prune: magnitude or wanda"),
        ("pattern", str, "prune: unstructured or 2:4"),
        ("sparsity", float, "prune: fraction of weights removed (unstructured)"),
        ("bits", int, "prune: storage of pruned weights, 8 or 32"),
        ("target", float, "mixed: target size as a fraction of float32"),
        ("calibration-tokens", int, "calibration tokens (0: none)"),
    ):
        compress.add_argument(
            f"--{flag}", dest="compress_" + flag.replace("-", "_"), type=kind, help=text
        )
    compress.add_argument(
        "-o",
        "--option",
        dest="compress_option",
        action="append",
        metavar="KEY=VALUE",
        help="any scheme option (repeatable)",
    )

    rm = sub.add_parser("rm", help="remove models")
    rm.add_argument("names", nargs="+", metavar="MODEL")

    cp = sub.add_parser("cp", help="copy a model")
    cp.add_argument("source")
    cp.add_argument("destination")

    stop = sub.add_parser("stop", help="unload a running model")
    stop.add_argument("model")

    plan = sub.add_parser(
        "plan",
        help="show how a model fits a memory budget",
        description="Print the memory plan for a registry model (or a config.json): weight "
        "bytes, KV bytes per token, and how many sequences of what context fit the budget.",
    )
    plan.add_argument("model", help="registry model name, or a path to a config.json")
    plan.add_argument(
        "--budget", default=None, help="e.g. 16GiB [default: OCS_MEMORY_BUDGET or auto]"
    )
    plan.add_argument(
        "--quantize", default=None, help="weight format: float32, bfloat16, int8, int4, nf4, int2"
    )
    plan.add_argument(
        "--adapters",
        dest="plan_adapters",
        type=int,
        default=None,
        help="LoRA adapters resident beside it [default: the OCS_MAX_LORAS slots the "
        "engine reserves when the registry holds adapters for the model, else none]",
    )
    plan.add_argument("--adapter-rank", type=int, default=16)
    plan.add_argument(
        "--device", dest="plan_device", default="cuda", help="cuda or cpu (for the auto budget)"
    )
    plan.add_argument("--context", type=int, default=None, help="tokens per sequence")
    plan.add_argument("--num-parallel", dest="plan_parallel", type=int, default=None)
    plan.add_argument("--models", default=None, help="registry root [env OCS_MODELS]")

    ev = sub.add_parser(
        "eval",
        help="measure a model: perplexity, size, memory, tokens/s",
        description="Measure a registry model through the engine: perplexity on held-out "
        "public-domain text (compared with its parent model's), size on disk, resident memory "
        "and tokens/s at 1 and 16 streams. The report is recorded in the registry and shown by "
        "/api/show. Works on the registry at OCS_MODELS directly (no daemon needed).",
    )
    ev.add_argument("model")
    ev.add_argument(
        "--with-parent",
        dest="eval_with_parent",
        action="store_true",
        help="measure the parent model too (else its recorded report is used)",
    )
    ev.add_argument(
        "--max-tokens",
        dest="eval_max_tokens",
        metavar="N",
        type=int,
        default=None,
        help="score at most N tokens of the text (faster, less precise)",
    )
    ev.add_argument(
        "--text",
        dest="eval_text",
        metavar="FILE",
        type=Path,
        default=None,
        help="a UTF-8 text file to score instead of the shipped held-out text",
    )
    ev.add_argument("--models", default=None, help="registry root [env OCS_MODELS]")
    ev.add_argument("--device", default=None, help="cpu, cuda or cuda:N [env OCS_DEVICE]")
    ev.add_argument("--dtype", default=None, help="float32, bfloat16 ... [env OCS_DTYPE]")

    imp = sub.add_parser(
        "import",
        help="import a local model directory, GGUF file or PEFT adapter into the registry",
        description="Import a Hugging Face model directory (safetensors), a GGUF file or a PEFT "
        "adapter directory (with --base) into the registry at OCS_MODELS.",
    )
    imp.add_argument("path", type=Path)
    imp.add_argument("name")
    imp.add_argument("--base", default=None, help="base model of a PEFT adapter")
    imp.add_argument(
        "--dequantize",
        action="store_true",
        help="GGUF: expand every weight to float32 (default: keep them near the file's own "
        "quantization, as int8 / int4)",
    )
    imp.add_argument("--models", default=None, help="registry root [env OCS_MODELS]")

    merge = sub.add_parser(
        "merge",
        help="fold a LoRA adapter model into a standalone model",
        description="Write NEW_NAME: the adapter model's LoRA weights merged into a copy of its "
        "base model, recorded as derived from both.",
    )
    merge.add_argument("adapter", help="an adapter model in the registry")
    merge.add_argument("new_name")
    merge.add_argument("--models", default=None, help="registry root [env OCS_MODELS]")

    tune = sub.add_parser(
        "finetune",
        help="train a LoRA, DoRA or IA3 adapter on a model with your data",
        description="Train an adapter on BASE with the examples in --data and add it to the "
        "registry as NEW_NAME (an adapter model on BASE), only once training has finished. "
        "Runs in the daemon when one answers at OLLAMA_HOST (/api/finetune), else here on "
        "the registry at OCS_MODELS. Data: JSONL chat (messages), prompt/completion, Alpaca, "
        "ShareGPT, plain text or CSV. Ctrl-C stops it and keeps a checkpoint: --resume "
        "continues.",
    )
    tune.add_argument("base", help="the registry model to train on (may be compressed: QLoRA)")
    tune.add_argument("new_name", help="the adapter model to create")
    tune.add_argument("--data", required=True, type=Path, help="the training file")
    tune.add_argument(
        "--format",
        default="auto",
        choices=["auto", "chat", "completion", "alpaca", "sharegpt", "text", "csv"],
        help="the data format (default: from the file name and its first record)",
    )
    tune.add_argument(
        "--columns",
        default=None,
        help="CSV columns for the fields, e.g. prompt=question,completion=answer",
    )
    tune.add_argument("--method", default="lora", choices=["lora", "dora", "ia3"])
    for flag, kind, text in (
        ("rank", int, "LoRA / DoRA rank (16)"),
        ("alpha", int, "LoRA / DoRA alpha (32)"),
        ("dropout", float, "LoRA / DoRA dropout (0.05)"),
        ("target-modules", str, "comma-separated module names (all projections; IA3: k,v,down)"),
        ("epochs", float, "passes over the data (1)"),
        ("max-steps", int, "optimizer steps; overrides --epochs"),
        ("lr", float, "peak learning rate (2e-4; IA3 3e-3)"),
        ("batch-size", int, "examples per micro-batch (4)"),
        ("grad-accum", int, "micro-batches per optimizer step (1)"),
        ("max-length", int, "tokens per example, longer ones cut (512)"),
        ("eval-split", float, "fraction held out to measure the loss before and after (0.1)"),
        ("seed", int, "shuffling and held-out split seed (0)"),
        ("save-steps", int, "a checkpoint every this many steps (50)"),
    ):
        tune.add_argument(f"--{flag}", type=kind, default=None, help=text)
    tune.add_argument("--resume", action="store_true", help="continue a stopped run")
    tune.add_argument(
        "--local",
        action="store_true",
        help="train in this process on OCS_MODELS even when a daemon answers",
    )
    tune.add_argument("--models", default=None, help="registry root [env OCS_MODELS]")
    tune.add_argument("--device", default=None, help="cpu, cuda or cuda:N [env OCS_DEVICE]")
    tune.add_argument(
        "--dtype",
        default=None,
        help="compute precision: auto (bfloat16 where native), float32, bfloat16 [env OCS_DTYPE]",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        if args.command == "serve" and args.ray:
            from .serve_ray import serve_ray

            if args.replicas < 1:
                parser.error("--replicas must be at least 1")

            overrides = {
                field: getattr(args, field)
                for field in Settings.model_fields
                if getattr(args, field, None) is not None
            }
            return serve_ray(settings_from(args), args.replicas, overrides)
        if args.command == "serve":
            from .server import serve

            return serve(settings_from(args))
        if args.command == "import":
            from .commands import import_command

            return import_command(settings_from(args), args)
        if args.command == "merge":
            from .commands import merge_command

            return merge_command(settings_from(args), args)
        if args.command == "finetune":
            from .commands import finetune_command

            return finetune_command(settings_from(args), args)
        if args.command == "eval":
            from .commands import eval_command

            return eval_command(settings_from(args), args)
        if args.command == "plan":
            from .commands import plan_command

            return plan_command(settings_from(args), args)
        if args.command == "run":
            from .run_images import run_images_command, wants_images

            if wants_images(args):
                return run_images_command(load_settings(), args)
        from .commands import client_command

        return client_command(load_settings(), args)
    except SettingsError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
