"""The ``chatkv`` command: parse arguments, build settings, hand off to the part that does the work.

Each subcommand's module is imported only when it runs, so ``chatkv --help`` stays instant.
"""

from __future__ import annotations

import argparse
import os
import sys

from chatkv import __version__
from chatkv.config import ConfigError, Settings, load_settings, parse_size
from chatkv.context import Context
from chatkv.paths import Paths


def _size(value: str) -> int:
    try:
        return parse_size(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _non_negative(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {value!r}") from None
    if number < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {number}")
    return number


_DEFAULTS = Settings()


def _default(value: object, config_key: str) -> str:
    return f"default: {value}, or {config_key} in config.toml"


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", metavar="DIR",
                        help="keep conversations, caches and config under this folder (default: CHATKV_HOME if set, "
                             "else your platform's user folders)")
    parser.add_argument("--config", metavar="FILE", help="config file (default: config.toml in the config folder)")


def _add_model(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    defaults = _DEFAULTS.model
    group.add_argument("--model", help="model: smollm2, a transformers folder, a .gguf file or a hub id "
                                       f"({_default(defaults.model, 'model.model')})")
    group.add_argument("--dtype", choices=["auto", "bfloat16", "float32"],
                       help=f"auto: bf16 where the CPU has native bf16, else fp32 ({_default(defaults.dtype, 'model.dtype')})")
    group.add_argument("--device", choices=["auto", "cpu", "cuda"],
                       help=f"auto: cuda when torch sees a GPU, else cpu ({_default(defaults.device, 'model.device')})")
    group.add_argument("--threads", type=int,
                       help="torch threads (default: one per core, one on a machine of two cores or fewer; or model.threads in config.toml)")
    group.add_argument("--quant", choices=["auto", "none", "int8", "int4"],
                       help="weight quantization (default auto: int4 in bf16 on CPU; float32 runs unquantized, the exact mode)")


def _add_engine(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("engine")
    kv, batching, snapshot, generation = _DEFAULTS.kv, _DEFAULTS.batching, _DEFAULTS.snapshot, _DEFAULTS.generation
    group.add_argument("--no-cache", action="store_true", help="disable KV reuse: every turn recomputes the whole conversation")
    group.add_argument("--max-tokens-per-session", type=int, metavar="N",
                       help=f"longer conversations drop their oldest turns ({_default(kv.max_tokens_per_session, 'kv.max_tokens_per_session')})")
    group.add_argument("--max-sessions", type=int, metavar="N",
                       help=f"resident sessions before the least recently used is evicted ({_default(kv.max_sessions, 'kv.max_sessions')})")
    group.add_argument("--max-kv-bytes", type=_size, metavar="SIZE",
                       help=f"KV memory budget, e.g. 512MiB ({_default('1GiB', 'kv.max_bytes_total')})")
    group.add_argument("--max-batch-size", type=int, metavar="N",
                       help=f"turns served together ({_default(batching.max_batch_size, 'batching.max_batch_size')})")
    group.add_argument("--max-batch-wait-ms", type=int, metavar="MS",
                       help=f"how long a lone new turn waits for company ({_default(batching.max_batch_wait_ms, 'batching.max_batch_wait_ms')})")
    group.add_argument("--max-queued", type=int, metavar="N",
                       help=f"turns waiting in the queue before new ones are refused ({_default(batching.max_total_queued_requests, 'batching.max_total_queued_requests')})")
    group.add_argument("--prefill-only", action="store_true", help="batch prefill only, decode one session at a time")
    group.add_argument("--draft-tokens", type=_non_negative, metavar="N",
                       help="speculative decoding of greedy replies (temperature 0): guess up to N next tokens from the "
                            "conversation and check them in one forward pass; the reply is the same token for token "
                            "as without guesses (in bf16 with quantized weights it may still change when more than 8 "
                            "rows share a step with other tabs; --dtype float32 --quant none never does), "
                            f"0 is off ({_default(_DEFAULTS.speculative.draft_tokens, 'speculative.draft_tokens')})")
    group.add_argument("--no-snapshot", action="store_true", help="do not save KV caches to disk")
    group.add_argument("--max-snapshot-bytes", type=_size, metavar="SIZE",
                       help=f"disk budget for KV snapshots, e.g. 2GiB ({_default('2GiB', 'snapshot.max_disk_bytes')})")
    group.add_argument("--max-new-tokens", type=int, metavar="N",
                       help=f"longest reply, in tokens ({_default(generation.max_new_tokens, 'generation.max_new_tokens')})")
    group.add_argument("--temperature", type=float, metavar="T",
                       help="0 is greedy decoding (default: the model's generation config, "
                            "or generation.temperature in config.toml)")


HEADLESS_ONLY = ("script", "stream", "trace", "ephemeral")


def _add_backend(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("remote server (instead of the local model)")
    group.add_argument("--backend", metavar="URL",
                       help="an OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1 (vLLM, SGLang, llama.cpp's server); "
                            "--model then names the server's model (default: none, the local model; or backend.url in config.toml)")
    group.add_argument("--api-key-env", metavar="NAME", help="environment variable holding the server's API key (default: OPENAI_API_KEY)")


def build_parser() -> argparse.ArgumentParser:
    """The whole command line. Abbreviated flags are refused (``--headles`` is a typo, not ``--headless``)."""
    parser = argparse.ArgumentParser(prog="chatkv", description="Terminal chat for local language models, with KV reuse and batching.",
                                     allow_abbrev=False)
    parser.add_argument("--version", action="version", version=f"chatkv {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_StrictParser)

    launch = commands.add_parser("launch", help="open the chat (or run a script with --headless)")
    _add_common(launch)
    _add_model(launch)
    _add_engine(launch)
    _add_backend(launch)
    launch.add_argument("--theme", help=f"theme name; the command palette lists them ({_default(_DEFAULTS.ui.theme, 'ui.theme')}; "
                                        "the last one picked is remembered)")
    launch.add_argument("--new", action="store_true", help="open a fresh tab beside the saved ones")
    headless = launch.add_argument_group("headless mode")
    headless.add_argument("--headless", action="store_true", help="no terminal UI: drive the app from --script")
    headless.add_argument("--script", metavar="FILE", help="JSON Lines script file, or - for stdin (needs --headless, which needs it: no default)")
    headless.add_argument("--stream", action="store_true", help="also emit token events (needs --headless)")
    headless.add_argument("--trace", action="store_true", help="add prompt_ids and reply_ids to turn events (needs --headless)")
    headless.add_argument("--ephemeral", action="store_true", help="do not save the tabs opened by the script (needs --headless)")

    model = commands.add_parser("model", help="fetch or inspect the model")
    model_commands = model.add_subparsers(dest="model_command", metavar="ACTION", required=True, parser_class=_StrictParser)
    pull = model_commands.add_parser("pull", help="download and convert the model now")
    _add_common(pull)
    pull.add_argument("--model", help="model to fetch (default: smollm2, or model.model in config.toml)")
    info = model_commands.add_parser("info", help="load the model and print its fingerprint and load time")
    _add_common(info)
    _add_model(info)

    sessions = commands.add_parser("sessions", help="list, show, export or delete saved conversations")
    session_commands = sessions.add_subparsers(dest="sessions_command", metavar="ACTION", required=True, parser_class=_StrictParser)
    for name, help_text in (("list", "list saved conversations"), ("show", "print one conversation"),
                            ("export", "export a conversation to Markdown or JSON"), ("delete", "delete a conversation and its KV snapshot")):
        sub = session_commands.add_parser(name, help=help_text)
        _add_common(sub)
        if name != "list":
            sub.add_argument("session", help="session id, a unique start of one (as git takes commit ids), or a name")
        if name == "export":
            sub.add_argument("--format", choices=["md", "json"], default="md", help="default: md")
            sub.add_argument("-o", "--output", metavar="FILE", help="file to write (default: stdout)")
        if name == "delete":
            sub.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")

    bench = commands.add_parser("bench", help="measure what the cache and batching buy against plain transformers")
    _add_common(bench)
    _add_model(bench)
    _add_backend(bench)
    bench.add_argument("scenarios", nargs="*", help="seed, multiturn, batching, memory, limits, snapshot (default: all)")
    bench.add_argument("--quick", action="store_true", help="shrink every scenario to run in a few minutes")
    bench.add_argument("--json", dest="json_path", metavar="FILE", help="write the results as JSON to this file (default: none)")
    bench.add_argument("--plot", dest="plot_path", metavar="FILE", help="draw charts to this PNG file, needs chatkv[plot] (default: none)")
    bench.add_argument("--no-check", action="store_true", help="skip the fp32 exactness check before timing")
    bench.add_argument("--llama-bench", metavar="PATH", help="llama.cpp's llama-bench for the speed scenario (default: on PATH)")
    return parser


class _StrictParser(argparse.ArgumentParser):
    """Subcommand parsers: no abbreviated flags either."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)


def check_flag_combinations(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Flags that only mean something together: exits with status 2 and a usage message, as argparse does."""
    if args.command == "launch" and not args.headless:
        given = [f"--{name}" for name in HEADLESS_ONLY if getattr(args, name)]
        if given:
            verb = "applies" if len(given) == 1 else "apply"
            parser.exit(2, f"chatkv launch: error: {', '.join(given)} only {verb} with --headless "
                           "(chatkv launch --headless --script FILE)\n")


def apply_flags(settings: Settings, args: argparse.Namespace) -> None:
    """Command-line flags override the config file."""
    def given(name: str):
        return getattr(args, name, None)

    if given("backend"):
        settings.backend.url = args.backend
    if given("api_key_env"):
        settings.backend.api_key_env = args.api_key_env
    if given("model"):
        if settings.backend.url:
            settings.backend.model = args.model  # with a server, --model names one of its models
        else:
            settings.model.model = args.model
    if given("dtype"):
        settings.model.dtype = args.dtype
    if given("device"):
        settings.model.device = args.device
    if given("threads"):
        settings.model.threads = args.threads
    if given("quant"):
        settings.model.quant = args.quant
    if given("no_cache"):
        settings.kv.enabled = False
    for flag, section, field_name in (
        ("max_tokens_per_session", settings.kv, "max_tokens_per_session"),
        ("max_sessions", settings.kv, "max_sessions"),
        ("max_kv_bytes", settings.kv, "max_bytes_total"),
        ("max_batch_size", settings.batching, "max_batch_size"),
        ("max_batch_wait_ms", settings.batching, "max_batch_wait_ms"),
        ("max_queued", settings.batching, "max_total_queued_requests"),
        ("max_snapshot_bytes", settings.snapshot, "max_disk_bytes"),
        ("max_new_tokens", settings.generation, "max_new_tokens"),
        ("draft_tokens", settings.speculative, "draft_tokens"),
        ("temperature", settings.generation, "temperature"),
        ("theme", settings.ui, "theme"),
    ):
        value = given(flag)
        if value is not None:
            setattr(section, field_name, value)
    if given("prefill_only"):
        settings.batching.prefill_only = True
    if given("no_snapshot"):
        settings.snapshot.enabled = False


def make_context(args: argparse.Namespace) -> Context:
    paths = Paths.resolve(getattr(args, "data_dir", None))
    config_path = getattr(args, "config", None)
    if config_path and not os.path.exists(os.path.expanduser(config_path)):
        raise ConfigError(f"no config file at {config_path}")
    settings, messages = load_settings(config_path and os.path.expanduser(config_path) or paths.config_file)
    apply_flags(settings, args)
    return Context(args=args, settings=settings, paths=paths, config_messages=messages)


def main(argv: list[str] | None = None) -> int:
    # a terminal or pipe whose encoding cannot show a name (PYTHONIOENCODING=ascii, a C locale) gets '?' for
    # what it cannot show, never an error halfway through a table
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")
    parser = build_parser()
    args = parser.parse_args(argv)
    check_flag_combinations(parser, args)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        context = make_context(args)
        for message in context.config_messages:
            print(f"chatkv: config: {message}", file=sys.stderr)
        return _dispatch(context)
    except ConfigError as exc:
        print(f"chatkv: config: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a bug: one line and a log file, never a bare traceback or a silent exit 0
        from chatkv.crash import CRASH_EXIT_CODE, crash_summary, write_crash_log

        try:
            data = Paths.resolve(getattr(args, "data_dir", None)).data
        except Exception:
            data = None
        log_path = write_crash_log(data, exc) if data is not None else None
        print(f"chatkv: {crash_summary(exc, log_path)}", file=sys.stderr)
        return CRASH_EXIT_CODE


def _dispatch(context: Context) -> int:
    command = context.args.command
    if command == "launch":
        if context.args.headless:
            from chatkv.headless import run_headless

            return run_headless(context)
        from chatkv.tui.launch import run_tui

        return run_tui(context)
    if command == "model":
        from chatkv.model.commands import run_model_command

        return run_model_command(context)
    if command == "sessions":
        from chatkv.sessions_cli import run_sessions_command

        return run_sessions_command(context)
    if command == "bench":
        from chatkv.bench.cli import run_bench

        return run_bench(context)
    raise AssertionError(f"unhandled command {command}")
