"""The CLI's verbs: HTTP clients of the daemon (Ollama's wire format), plus the local
`import` into the registry."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx

from .modelfile import ModelfileError, parse_modelfile
from .registry.blobs import sha256_file
from .registry.errors import RegistryError
from .settings import Settings
from .units import human_size


class CommandError(Exception):
    pass


# ------------------------------------------------------------------------------ HTTP client


class Client:
    def __init__(self, settings: Settings) -> None:
        self.base = settings.address.client_url
        headers = {}
        if settings.api_key is not None:
            headers["Authorization"] = f"Bearer {settings.api_key.get_secret_value()}"
        self.http = httpx.Client(
            base_url=self.base, headers=headers, timeout=httpx.Timeout(30.0, read=None)
        )

    def _check(self, response: httpx.Response) -> None:
        if response.status_code >= 400:
            response.read()
            try:
                message = response.json().get("error", response.text)
            except (json.JSONDecodeError, AttributeError):
                message = response.text or response.reason_phrase
            raise CommandError(str(message))

    def request(self, method: str, path: str, body: Any = None) -> httpx.Response:
        try:
            response = self.http.request(method, path, json=body)
        except httpx.ConnectError:
            raise CommandError(
                f"could not connect to the daemon at {self.base}: "
                "is `ollama-compact serve` running?"
            ) from None
        self._check(response)
        return response

    def stream(self, path: str, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        try:
            with self.http.stream("POST", path, json=body) as response:
                self._check(response)
                for line in response.iter_lines():
                    if not line.strip():
                        continue
                    item = json.loads(line)
                    if item.get("error"):
                        raise CommandError(str(item["error"]))
                    yield item
        except httpx.ConnectError:
            raise CommandError(
                f"could not connect to the daemon at {self.base}: "
                "is `ollama-compact serve` running?"
            ) from None

    def upload(self, path: Path) -> str:
        digest = sha256_file(path)
        with open(path, "rb") as handle:
            try:
                response = self.http.post(f"/api/blobs/{digest}", content=handle)
            except httpx.ConnectError:
                raise CommandError(f"could not connect to the daemon at {self.base}") from None
        self._check(response)
        return digest


# ------------------------------------------------------------------------------ formatting


def human_ago(stamp: str) -> str:
    try:
        moment = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    except ValueError:
        return stamp
    seconds = (datetime.now(timezone.utc) - moment).total_seconds()
    for unit, length in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= length:
            count = int(seconds // length)
            return f"{count} {unit}{'s' if count != 1 else ''} ago"
    return "Less than a minute ago"


def table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "    ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows
    )


# ------------------------------------------------------------------------------ verbs


def cmd_list(client: Client, args: argparse.Namespace) -> None:
    models = client.request("GET", "/api/tags").json().get("models", [])
    rows = [["NAME", "ID", "SIZE", "MODIFIED"]]
    for m in models:
        rows.append(
            [m["name"], m["digest"][:12], human_size(m["size"]), human_ago(m["modified_at"])]
        )
    print(table(rows))


def cmd_ps(client: Client, args: argparse.Namespace) -> None:
    models = client.request("GET", "/api/ps").json().get("models", [])
    rows = [["NAME", "ID", "SIZE", "PROCESSOR", "CONTEXT", "UNTIL"]]
    for m in models:
        vram = m.get("size_vram", 0)
        processor = "100% GPU" if vram and vram >= m.get("size", 0) else "100% CPU"
        rows.append(
            [
                m["name"],
                m["digest"][:12],
                human_size(m.get("size", 0)),
                processor,
                str(m.get("context_length", "")),
                m.get("expires_at", ""),
            ]
        )
    print(table(rows))


def cmd_show(client: Client, args: argparse.Namespace) -> None:
    info = client.request("POST", "/api/show", {"model": args.model}).json()
    for what in ("license", "modelfile", "parameters", "system", "template"):
        if getattr(args, what):
            print(info.get(what, ""))
            return
    details = info.get("details", {})
    model_info = info.get("model_info", {})
    arch = model_info.get("general.architecture", details.get("family", ""))
    print("  Model")
    for label, value in (
        ("architecture", arch),
        ("parameters", details.get("parameter_size", "")),
        ("context length", model_info.get(f"{arch}.context_length", "")),
        ("embedding length", model_info.get(f"{arch}.embedding_length", "")),
        ("quantization", details.get("quantization_level", "")),
        ("parent model", details.get("parent_model", "")),
    ):
        if value not in ("", None):
            print(f"    {label:<20}{value}")
    if info.get("capabilities"):
        print("\n  Capabilities")
        for cap in info["capabilities"]:
            print(f"    {cap}")
    if "ocs.eval.perplexity" in model_info:
        print("\n  Evaluation")
        change = model_info.get("ocs.eval.perplexity_change")
        ppl = f"{model_info['ocs.eval.perplexity']:.3f}"
        if isinstance(change, (int, float)):
            ppl += f" ({100 * change:+.1f}% vs {model_info.get('ocs.eval.parent_model', '')})"
        for label, value in (
            ("perplexity", ppl),
            ("size on disk", human_size(int(model_info.get("ocs.eval.size_bytes", 0)))),
            ("resident memory", human_size(int(model_info.get("ocs.eval.resident_bytes", 0)))),
            ("tokens/s, 1 stream", model_info.get("ocs.eval.tokens_per_second_1", "")),
            ("tokens/s, 16 streams", model_info.get("ocs.eval.tokens_per_second_16", "")),
        ):
            print(f"    {label:<20}{value}")
    training = info.get("training")
    if isinstance(training, dict):
        from .jobs.finetune import format_report

        print("\n  Training")
        for line in format_report(training).splitlines():
            print(f"    {line}")
    if info.get("parameters"):
        print("\n  Parameters")
        for line in str(info["parameters"]).splitlines():
            print(f"    {line}")
    if info.get("license"):
        print("\n  License")
        print("    " + str(info["license"]).splitlines()[0])


def _progress_lines(items: Iterator[dict[str, Any]]) -> None:
    last = ""
    for item in items:
        status = str(item.get("status", ""))
        total, completed = item.get("total"), item.get("completed")
        line = status
        if total:
            line = f"{status} {100 * (completed or 0) // total:3d}%"
        if line != last:
            print(line, file=sys.stderr)
            last = line


def cmd_pull(client: Client, args: argparse.Namespace) -> None:
    _progress_lines(client.stream("/api/pull", {"model": args.model}))


def cmd_create(client: Client, args: argparse.Namespace) -> None:
    path = Path(args.file)
    try:
        modelfile = parse_modelfile(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise CommandError(f"cannot read {path}: {exc.strerror}") from None
    except ModelfileError as exc:
        raise CommandError(f"{path}: {exc}") from None
    request: dict[str, Any] = {"model": args.model}
    base_dir = path.parent

    def upload_files(ref: str) -> dict[str, str]:
        target = (base_dir / Path(ref).expanduser()).resolve()
        files = [target] if target.is_file() else sorted(p for p in target.iterdir() if p.is_file())
        uploaded = {}
        for file in files:
            print(f"copying file {file.name}", file=sys.stderr)
            uploaded[file.name] = client.upload(file)
        return uploaded

    source = base_dir / Path(modelfile.from_).expanduser()
    if modelfile.from_.startswith((".", "/", "~")) or source.exists():
        request["files"] = upload_files(modelfile.from_)
    else:
        request["from"] = modelfile.from_
    if modelfile.adapters:
        adapters: dict[str, str] = {}
        for ref in modelfile.adapters:
            adapters.update(upload_files(ref))
        request["adapters"] = adapters
    if modelfile.template is not None:
        request["template"] = modelfile.template
    if modelfile.system is not None:
        request["system"] = modelfile.system
    if modelfile.parameters:
        request["parameters"] = modelfile.parameters
    if modelfile.messages:
        request["messages"] = modelfile.messages
    if modelfile.licenses:
        request["license"] = modelfile.licenses
    if args.quantize:
        request["quantize"] = args.quantize
    _progress_lines(client.stream("/api/create", request))


COMPRESS_FLAGS = (
    "group_size",
    "embedding",
    "rank",
    "energy",
    "method",
    "pattern",
    "sparsity",
    "bits",
    "target",
    "calibration_tokens",
)


def compress_options(args: argparse.Namespace) -> dict[str, Any]:
    """The scheme options given as flags and as repeated ``-o key=value``."""
    options: dict[str, Any] = {}
    for key in COMPRESS_FLAGS:
        value = getattr(args, f"compress_{key}", None)
        if value is not None:
            options[key] = value
    for pair in args.compress_option or []:
        key, sep, value = pair.partition("=")
        if not sep:
            raise CommandError(f"-o expects key=value, got {pair!r}")
        options[key.strip().replace("-", "_")] = _scalar(value.strip())
    return options


def _scalar(text: str) -> Any:
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def cmd_compress(client: Client, args: argparse.Namespace) -> None:
    request: dict[str, Any] = {"model": args.name, "from": args.model, "quantize": args.scheme}
    options = compress_options(args)
    if options:
        request["quantize_options"] = options
    _progress_lines(client.stream("/api/create", request))
    print(f"created '{args.name}' from '{args.model}' ({args.scheme})")


def cmd_rm(client: Client, args: argparse.Namespace) -> None:
    for model in args.names:
        client.request("DELETE", "/api/delete", {"model": model})
        print(f"deleted '{model}'")


def cmd_cp(client: Client, args: argparse.Namespace) -> None:
    client.request("POST", "/api/copy", {"source": args.source, "destination": args.destination})
    print(f"copied '{args.source}' to '{args.destination}'")


def cmd_stop(client: Client, args: argparse.Namespace) -> None:
    client.request("POST", "/api/generate", {"model": args.model, "keep_alive": 0, "stream": False})


def _print_stream(items: Iterator[dict[str, Any]], key: str) -> dict[str, Any]:
    final: dict[str, Any] = {}
    for item in items:
        piece = (
            item.get("message", {}).get("content", "")
            if key == "message"
            else item.get("response", "")
        )
        print(piece, end="", flush=True)
        if item.get("done"):
            final = item
    print()
    return final


def _print_stats(final: dict[str, Any]) -> None:
    if not final:
        return
    eval_s = final.get("eval_duration", 0) / 1e9
    print(
        f"total duration: {final.get('total_duration', 0) / 1e9:.2f}s  "
        f"prompt tokens: {final.get('prompt_eval_count', 0)}  "
        f"tokens: {final.get('eval_count', 0)}  "
        f"rate: {final.get('eval_count', 0) / eval_s if eval_s else 0:.1f} tokens/s",
        file=sys.stderr,
    )


def cmd_run(client: Client, args: argparse.Namespace) -> None:
    extra: dict[str, Any] = {}
    if args.keepalive is not None:
        extra["keep_alive"] = args.keepalive
    client.request("POST", "/api/show", {"model": args.model})
    prompt = " ".join(args.prompt)
    if not prompt and not sys.stdin.isatty():
        prompt = sys.stdin.read()
    if prompt:
        final = _print_stream(
            client.stream("/api/generate", {"model": args.model, "prompt": prompt, **extra}),
            "response",
        )
        if args.verbose:
            _print_stats(final)
        return
    client.request("POST", "/api/generate", {"model": args.model, "stream": False, **extra})
    history: list[dict[str, str]] = []
    while True:
        try:
            line = input(">>> ")
        except EOFError:
            print()
            return
        if line.strip() in ("/bye", "/exit"):
            return
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        pieces: list[str] = []
        final = {}
        for item in client.stream("/api/chat", {"model": args.model, "messages": history, **extra}):
            piece = item.get("message", {}).get("content", "")
            pieces.append(piece)
            print(piece, end="", flush=True)
            if item.get("done"):
                final = item
        print("\n")
        history.append({"role": "assistant", "content": "".join(pieces)})
        if args.verbose:
            _print_stats(final)


VERBS = {
    "list": cmd_list,
    "ls": cmd_list,
    "ps": cmd_ps,
    "show": cmd_show,
    "pull": cmd_pull,
    "create": cmd_create,
    "rm": cmd_rm,
    "cp": cmd_cp,
    "compress": cmd_compress,
    "stop": cmd_stop,
    "run": cmd_run,
}


def client_command(settings: Settings, args: argparse.Namespace) -> int:
    client = Client(settings)
    try:
        VERBS[args.command](client, args)
    except CommandError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    return 0


def import_command(settings: Settings, args: argparse.Namespace) -> int:
    from .jobs.importing import import_path
    from .logs import setup_logging
    from .registry.store import Registry
    from .server import _ProgressPrinter

    setup_logging("warning")
    registry = Registry(settings.models)
    try:
        extra = {"dequantize": True} if getattr(args, "dequantize", False) else {}
        record = import_path(
            registry, args.path, args.name, base=args.base, progress=_ProgressPrinter(), **extra
        )
    except RegistryError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    print(f"imported {record.name.display()} ({human_size(record.size)}) into {registry.root}")
    return 0


def merge_command(settings: Settings, args: argparse.Namespace) -> int:
    """`ollama-compact merge ADAPTER NEW_NAME`: an adapter folded into its base."""
    from .jobs.merge import merge_adapter
    from .logs import setup_logging
    from .registry.store import Registry
    from .server import _ProgressPrinter

    setup_logging("warning")
    registry = Registry(settings.models)
    try:
        record = merge_adapter(registry, args.adapter, args.new_name, progress=_ProgressPrinter())
    except RegistryError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    print(f"merged {args.adapter} into {record.name.display()} ({human_size(record.size)})")
    return 0


def plan_command(settings: Settings, args: argparse.Namespace) -> int:
    """`ollama-compact plan`: the memory planner for a registry model or a config.json, with
    the inputs the engine uses when it loads the model (:func:`serving_plan`)."""
    from .engine.device import planned_dtype
    from .engine.planner import PlanError, default_budget, format_plan, serving_plan
    from .registry.store import Registry
    from .units import parse_size

    try:
        dtype = planned_dtype(settings.dtype, args.plan_device)
        num_parallel = args.plan_parallel or settings.num_parallel
        context_length = args.context or settings.context_length
        adapters, rank = args.plan_adapters or 0, args.adapter_rank
        weight_format = args.quantize
        path = Path(args.model)
        if path.suffix == ".json" and path.is_file():
            config = json.loads(path.read_text())
            name = path.parent.name or path.name
            dtype = planned_dtype(settings.dtype, args.plan_device, weight_format)
        else:
            from .engine.provider import RegistrySizing

            registry = Registry(settings.models)
            record = registry.get(args.model)
            if record.is_adapter and record.config.base_model:  # it runs on its base
                record = registry.get(record.config.base_model)
            sizing = RegistrySizing(
                registry,
                dtype=dtype,
                num_parallel=num_parallel,
                context_length=context_length,
                max_loras=settings.max_loras,
                integer_dtype=planned_dtype(settings.dtype, args.plan_device, "int8"),
            )
            name = record.name.display()
            dtype = sizing.serving_dtype(name)
            config = sizing.hf_config(name)
            weight_format = weight_format or sizing.weight_format(name)
            if args.plan_adapters is None:  # the adapter slots the engine would reserve
                adapters, rank = sizing.adapters_of(name)
        if args.budget:
            budget = parse_size(args.budget)
        elif settings.memory_budget_bytes:
            budget = settings.memory_budget_bytes
        elif args.plan_device.startswith("cuda"):
            budget = default_budget("cuda", total_device_memory=16 * 10**9)
        else:
            budget = default_budget("cpu")
        plan = serving_plan(
            config,
            budget=budget,
            dtype=dtype,
            weight_format=weight_format,
            num_parallel=num_parallel,
            context_length=context_length,
            adapters=adapters,
            adapter_rank=rank,
        )
    except (RegistryError, PlanError, ValueError, OSError, KeyError) as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    print(format_plan(plan, name))
    return 0 if plan.fits else 3


def eval_command(settings: Settings, args: argparse.Namespace) -> int:
    """`ollama-compact eval`: measures a registry model and records the report."""
    from .engine.types import EngineError
    from .evaluation import EvalError, Options, evaluate, format_report
    from .logs import setup_logging
    from .registry.store import Registry

    setup_logging("warning")
    if args.eval_max_tokens is not None and args.eval_max_tokens < 2:
        print("Error: --max-tokens must be at least 2", file=sys.stderr)
        return 2
    registry = Registry(settings.models)
    options = Options(max_tokens=args.eval_max_tokens, text=args.eval_text)
    try:
        reports = evaluate(settings, registry, args.model, options, args.eval_with_parent)
    except (RegistryError, EvalError, EngineError) as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    print("\n\n".join(format_report(report) for report in reports))
    return 0


# ------------------------------------------------------------------------------ finetune

FINETUNE_FLAGS = {
    "rank": "rank",
    "alpha": "alpha",
    "dropout": "dropout",
    "target_modules": "target_modules",
    "epochs": "epochs",
    "max_steps": "max_steps",
    "lr": "learning_rate",
    "batch_size": "batch_size",
    "grad_accum": "grad_accum",
    "max_length": "max_length",
    "eval_split": "eval_split",
    "seed": "seed",
    "save_steps": "save_steps",
}


class TrainingBar:
    """Training progress on one terminal line (a line every 10% when not a terminal):
    step, a bar, loss, tokens/s and the time left; other statuses on lines of their own."""

    def __init__(self, stream: Any = None) -> None:
        self.out = stream or sys.stderr
        self.tty = bool(getattr(self.out, "isatty", lambda: False)())
        self.open = False  # a bar line is on screen without its newline
        self.shown = -1
        self.report: dict[str, Any] | None = None

    def __call__(self, item: dict[str, Any]) -> None:
        status = str(item.get("status", ""))
        if status == "training":
            self._bar(item)
            return
        if status == "trained" and isinstance(item.get("report"), dict):
            self.report = item["report"]
            return
        self.end()
        print(status, file=self.out, flush=True)

    def _bar(self, item: dict[str, Any]) -> None:
        step, total = int(item.get("completed") or 0), int(item.get("total") or 1)
        fraction = step / max(total, 1)
        width = 24
        filled = int(width * fraction)
        eta = int(float(item.get("eta_seconds") or 0))
        line = (
            f"training {step}/{total} [{'#' * filled}{'.' * (width - filled)}] "
            f"{100 * fraction:3.0f}%  loss {float(item.get('loss') or 0):.4f}  "
            f"{float(item.get('tokens_per_second') or 0):,.0f} tok/s  "
            f"ETA {eta // 3600}:{eta // 60 % 60:02d}:{eta % 60:02d}"
        )
        if self.tty:
            print("\r" + line.ljust(100), end="", file=self.out, flush=True)
            self.open = True
            if step >= total:
                self.end()
        elif int(10 * fraction) != self.shown or step >= total:
            self.shown = int(10 * fraction)
            print(line, file=self.out, flush=True)

    def end(self) -> None:
        if self.open:
            print(file=self.out, flush=True)
            self.open = False


def finetune_options(args: argparse.Namespace) -> dict[str, Any]:
    options: dict[str, Any] = {"method": args.method}
    for flag, key in FINETUNE_FLAGS.items():
        value = getattr(args, flag, None)
        if value is not None:
            options[key] = value
    return options


def _columns(text: str | None) -> dict[str, str]:
    columns: dict[str, str] = {}
    for pair in (text or "").split(","):
        if not pair.strip():
            continue
        key, sep, value = pair.partition("=")
        if not sep:
            raise CommandError(f"--columns expects field=column pairs, got {pair!r}")
        columns[key.strip()] = value.strip()
    return columns


def _daemon_answers(client: Client) -> bool:
    try:
        return client.http.get("/api/version", timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


def finetune_command(settings: Settings, args: argparse.Namespace) -> int:
    """`ollama-compact finetune BASE NEW_NAME --data FILE`: in the daemon when one answers
    (the data uploaded as a blob), else in this process on the local registry."""
    from .jobs.finetune import format_report

    bar = TrainingBar()
    try:
        columns = _columns(args.columns)
        if not args.data.is_file():
            raise CommandError(f"{args.data} is not a file")
        client = Client(settings)
        if not args.local and _daemon_answers(client):
            print(f"uploading {args.data.name}", file=sys.stderr)
            request = {
                "model": args.new_name,
                "from": args.base,
                "data": {args.data.name: client.upload(args.data)},
                "format": args.format,
                "columns": columns,
                "parameters": finetune_options(args),
                "resume": bool(args.resume),
            }
            for item in client.stream("/api/finetune", request):
                bar(item)
        else:
            _finetune_here(settings, args, columns, bar)
    except CommandError as exc:
        bar.end()
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        bar.end()
        print(
            "stopped: the registry is unchanged; `--resume` continues from the last checkpoint",
            file=sys.stderr,
        )
        return 130
    bar.end()
    if bar.report is not None:
        print(format_report(bar.report))
    print(f"created '{args.new_name}' on '{args.base}'")
    return 0


def _finetune_here(
    settings: Settings, args: argparse.Namespace, columns: dict[str, str], bar: TrainingBar
) -> None:
    from .jobs.finetune import FinetuneSpec, Stopped, finetune
    from .logs import setup_logging
    from .registry.store import Registry
    from .training.params import TrainingError, check_params

    setup_logging("warning")
    try:
        params = check_params(finetune_options(args))
    except TrainingError as exc:
        raise CommandError(str(exc)) from None
    spec = FinetuneSpec(
        base=args.base,
        name=args.new_name,
        data=args.data,
        format=args.format,
        columns=columns,
        params=params,
        resume=bool(args.resume),
    )
    try:
        finetune(
            Registry(settings.models), spec, bar, device=settings.device, precision=settings.dtype
        )
    except Stopped:
        raise KeyboardInterrupt from None
    except RegistryError as exc:
        raise CommandError(str(exc)) from None
