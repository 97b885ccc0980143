"""The flags of `memdb-admin`'s build commands (`prefix insert|update|append|build`): inputs,
traces and budget, one flag per `memdb.build_options.BuildOptions` field, the build job's
(`--local`, `--model-fingerprint`), the local model's and the server index's. Knows nothing of
what the commands do with them.
"""

from __future__ import annotations

import click

from memdb.build_options import Spec, specs
from memdb_client.inputs import DEFAULT_TEMPLATE, INPUT_FORMATS

_TEMPLATE_SHOWN = DEFAULT_TEMPLATE.replace("\n", "\\n")


def compose(*decorators):
    """The decorators as one (the first given is the outermost)."""

    def wrap(f):
        for d in reversed(decorators):
            f = d(f)
        return f

    return wrap


input_options = compose(
    click.option(
        "--prefix-file",
        "-p",
        required=True,
        metavar="FILE",
        help="The prefix: plain text, or JSONL examples ('-' = stdin).",
    ),
    click.option(
        "--input-format",
        type=click.Choice(INPUT_FORMATS),
        default="auto",
        show_default=True,
        help="auto: JSONL for .jsonl/.ndjson, else plain text.",
    ),
    click.option(
        "--format",
        "template",
        default=_TEMPLATE_SHOWN,
        show_default=True,
        help="str.format template of one JSONL example (fields of the record; "
        "\\n and \\t are understood).",
    ),
    click.option(
        "--prefix-skip",
        type=click.IntRange(min=0),
        default=0,
        help="Skip the first N examples (JSONL) or paragraphs (text).",
    ),
    click.option(
        "--prefix-limit",
        type=click.IntRange(min=1),
        default=None,
        help="Use at most N examples (JSONL) or paragraphs (text).",
    ),
)

job_options = compose(
    click.option(
        "--local",
        is_flag=True,
        help="Build on this machine (needs the worker extra and the model) instead of "
        "submitting a build job to a worker; --model/--device/--dtype/--threads apply only here.",
    ),
    click.option(
        "--model-fingerprint",
        default="",
        help="Build job: the model to build with (default: the prefix's, or the one model "
        "live workers hold).",
    ),
)

model_options = compose(
    click.option(
        "--model",
        default="default",
        envvar="MEMDB_MODEL",
        show_default=True,
        help="'default' (SmolLM2-135M-Instruct GGUF), a .gguf file or a model folder "
        "(env MEMDB_MODEL).",
    ),
    click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:1, ..."),
    click.option(
        "--dtype",
        type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
        default="auto",
        show_default=True,
        help="Model dtype (auto: float32 on CPU, bfloat16 on GPU).",
    ),
    click.option(
        "--threads",
        type=click.IntRange(min=1),
        default=None,
        help="CPU threads for torch and FAISS (default: theirs; 1 is best on a busy machine).",
    ),
)


def build_flag(s: Spec):
    """The click option of the build option `s` (its value None when not given: the default)."""
    decls = [f"--{s.flag}/--no-{s.flag}"] if s.kind is bool else [f"--{s.flag}"]
    bounded = s.min is not None or s.max is not None
    if s.choices is not None:
        kind = click.Choice(s.choices)
    elif s.kind is int:
        kind = click.IntRange(min=s.min, max=s.max) if bounded else click.INT
    elif s.kind is float:
        kind = click.FloatRange(min=s.min, max=s.max) if bounded else click.FLOAT
    else:
        kind = None  # a --x/--no-x flag
    default = f"  [default: {s.default_text}]" if s.default_text else ""
    return click.option(*decls, s.name, type=kind, default=None, help=s.help + default)


trace_options = compose(
    click.option(
        "--traces-file",
        "-t",
        metavar="FILE",
        help="Calibration traces: JSONL (one example each) or text (one paragraph "
        "each). Default: the prefix's own examples/paragraphs.",
    ),
    click.option(
        "--trace-format",
        "trace_template",
        default=None,
        help="Template of one JSONL trace (default: --format).",
    ),
    click.option(
        "--traces-skip", type=click.IntRange(min=0), default=0, help="Skip the first N traces."
    ),
    click.option(
        "--traces-limit", type=click.IntRange(min=1), default=None, help="Use at most N traces."
    ),
    click.option(
        "--budget",
        "-m",
        type=click.IntRange(min=1),
        default=1024,
        show_default=True,
        help="Memory budget M: entries per layer and index group.",
    ),
)
builder_options = compose(*(build_flag(s) for s in specs()))  # every BuildOptions field

index_options = compose(
    click.option(
        "--index-kind",
        type=click.Choice(["auto", "flat", "ivf", "hnsw"]),
        default="auto",
        show_default=True,
        help="Server index (auto: by budget).",
    ),
    click.option(
        "--metric", type=click.Choice(["cosine", "ip"]), default="cosine", show_default=True
    ),
)
