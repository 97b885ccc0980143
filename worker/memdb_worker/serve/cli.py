"""`memdb-worker`: the inference worker's command line.

    memdb-worker [serve] --server HOST:PORT --api-key KEY --model default --device cpu \\
                 --listen 127.0.0.1:8000
    memdb-worker generate --memory NAME "prompt"      # one completion, printed, for scripts

Settings come from flags > MEMDB_* environment > --config TOML > defaults (`config.py`).
The server prints `memdb-worker serving http://HOST:PORT` and writes `--ready-file` once it
accepts connections (with --listen HOST:0 that is how to learn the port). Knows nothing beyond
parsing and wiring.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

import click
from pydantic import ValidationError

from memdb.errors import MemdbError
from memdb_worker.serve.config import WorkerConfig, load_config

logger = logging.getLogger(__name__)

_OPTIONS: list[Callable] = [
    click.option("--config", type=click.Path(dir_okay=False), help="TOML config file"),
    click.option("--server", help="memdb server HOST:PORT (MEMDB_SERVER)"),
    click.option("--api-key", help="tenant API key (MEMDB_API_KEY)"),
    click.option("--tls/--no-tls", default=None, help="TLS to the memdb server"),
    click.option("--model", help="'default' (SmolLM2-135M-Instruct GGUF), a .gguf or a folder"),
    click.option("--model-name", help="model id shown by the API"),
    click.option("--device", help="cpu | cuda | cuda:N"),
    click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"])),
    click.option("--listen", help="HTTP HOST:PORT (port 0: any free port)"),
    click.option("--memory-mode", type=click.Choice(["cache", "remote"])),
    click.option("--cache-bytes", type=int, help="byte budget of cached memories"),
    click.option("--max-batch", type=int, help="requests decoded together"),
    click.option("--threads", type=int, help="torch CPU threads"),
    click.option("--build-jobs/--no-build-jobs", default=None, help="run the server's build jobs"),
    click.option("--build-poll-s", type=float, help="seconds between polls for build jobs"),
    click.option("--log-level", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"])),
    click.option("--ready-file", type=click.Path(dir_okay=False), help="JSON written when ready"),
]


def _with_options(fn: Callable) -> Callable:
    for opt in reversed(_OPTIONS):
        fn = opt(fn)
    return fn


def _config(ctx: click.Context, flags: dict[str, Any]) -> WorkerConfig:
    merged = {**(ctx.obj or {}), **{k: v for k, v in flags.items() if v is not None}}
    try:
        cfg = load_config(**merged)
    except (ValidationError, ValueError) as exc:
        raise click.UsageError(str(exc)) from None
    logging.basicConfig(
        level=cfg.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return cfg


@click.group(invoke_without_command=True)
@_with_options
@click.pass_context
def main(ctx: click.Context, **flags: Any) -> None:
    """memdb inference worker: an OpenAI-compatible API decoding with memdb memories."""
    ctx.obj = {k: v for k, v in flags.items() if v is not None}
    if ctx.invoked_subcommand is None:
        ctx.invoke(serve)


@main.command()
@_with_options
@click.pass_context
def serve(ctx: click.Context, **flags: Any) -> None:
    """Serve the HTTP API (the default command)."""
    from memdb_worker.serve.http import serve as run

    run(_config(ctx, flags))


@main.command()
@_with_options
@click.option("--memory", "memory", default=None, help="memory to decode with (none: plainly)")
@click.option("--max-tokens", type=int, default=64, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True)
@click.option("--chat", is_flag=True, help="wrap the prompt in the chat template")
@click.argument("prompt")
@click.pass_context
def generate(
    ctx: click.Context,
    memory: str | None,
    max_tokens: int,
    temperature: float,
    chat: bool,
    prompt: str,
    **flags: Any,
) -> None:
    """Generate one completion of PROMPT and print it (exit 1 with a reason on errors)."""
    from memdb_worker.serve.runtime import WorkerRuntime
    from memdb_worker.serve.scheduler import SamplingParams

    cfg = _config(ctx, flags)
    rt = WorkerRuntime.create(cfg, watch=False)
    try:
        tok = rt.tokenizer
        if chat:
            text = tok.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
            ids = tok(text, add_special_tokens=False).input_ids
        else:
            ids = tok(prompt).input_ids
        source = rt.resolve(memory) if memory else None
        out, _ = rt.scheduler.generate(ids, SamplingParams(max_tokens, temperature), source)
    except MemdbError as exc:
        click.echo(f"error: {type(exc).__name__}: {exc}", err=True)
        sys.exit(1)
    finally:
        rt.close()
    click.echo(out)


if __name__ == "__main__":
    main()
