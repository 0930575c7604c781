"""The ``tensorbridge`` command line (also ``python -m tensorbridge``).

Subcommands: ``inspect``, ``convert``, ``diff``, ``doctor``, ``demo``. Each
lives in its own module and dispatches through the formats table. Errors
print ``tensorbridge: error: ...`` and exit 2; Ctrl-C exits 130. ``diff``
exits 0 when the files are the same and 1 when they differ, like GNU diff.

Importing this package imports no tensor framework; only ``doctor``,
``demo``, and converting to a framework do.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

__all__ = ["main", "build_parser"]

_F = argparse.RawDescriptionHelpFormatter


def _version() -> str:
    from .. import __version__

    return __version__


def _describe(examples: str, text: str) -> str:
    return "examples:\n" + examples.rstrip() + "\n\n" + text.strip() + "\n"


MAIN_EXAMPLES = """\
  tensorbridge inspect model.safetensors
  tensorbridge inspect --stats --filter 'encoder.*' model.pt
  tensorbridge convert model.pt model.safetensors
  tensorbridge convert --dtype bfloat16 --max-shard-size 5GB model.safetensors out/
  tensorbridge diff original.pt ported.safetensors --atol 1e-6
  tensorbridge doctor
  tensorbridge demo
"""

INSPECT_EXAMPLES = """\
  tensorbridge inspect model.safetensors
  tensorbridge inspect --stats weights.npz
  tensorbridge inspect --filter 'layers.*.weight' --sort size checkpoint/
  tensorbridge inspect --json model.pt | jq '.files[0].count'
"""

CONVERT_EXAMPLES = """\
  tensorbridge convert model.pt model.safetensors
  tensorbridge convert data.npz data.h5
  tensorbridge convert --dtype bfloat16 model.safetensors model-bf16.safetensors
  tensorbridge convert --exclude 'optimizer.*' ckpt.pt weights.npz
  tensorbridge convert --max-shard-size 2GB model.safetensors sharded/
  tensorbridge convert --dtype bfloat16 --workers 4 big-ckpt/ out/
"""

DIFF_EXAMPLES = """\
  tensorbridge diff a.npz b.npz                      # bit-exact
  tensorbridge diff model.pt model.safetensors --atol 1e-6 --rtol 1e-5
  tensorbridge diff --json before.pt after.pt
  tensorbridge diff --ignore-dtype --rtol 1e-2 model.pt model-bf16.safetensors
  tensorbridge diff -q a.npz b.npz && echo same      # exit 0 same, 1 different, 2 trouble
"""

DOCTOR_EXAMPLES = """\
  tensorbridge doctor
  tensorbridge doctor --json
"""

DEMO_EXAMPLES = """\
  tensorbridge demo
  tensorbridge demo --out ./demo-output
"""


def build_parser() -> argparse.ArgumentParser:
    from ..formats import FORMAT_MODULES

    formats = sorted(FORMAT_MODULES)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        default=argparse.SUPPRESS,
        help="print less: no progress bar, no summary lines",
    )
    parser = argparse.ArgumentParser(
        prog="tensorbridge",
        formatter_class=_F,
        parents=[common],
        description=_describe(
            MAIN_EXAMPLES,
            """\
Move tensors between files and frameworks, exactly.
Formats: .npy .npz .safetensors .pt/.pth/.bin .h5/.hdf5 .gguf .zarr and sharded checkpoints
(a directory or *.index.json). Run `tensorbridge COMMAND --help` for details.""",
        ),
    )
    parser.add_argument("--version", action="version", version=f"tensorbridge {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "inspect",
        parents=[common],
        formatter_class=_F,
        help="list the tensors in files: names, dtypes, shapes, sizes",
        description=_describe(
            INSPECT_EXAMPLES,
            """\
Show every tensor's name, dtype, shape and size, the file's metadata, and totals,
read from the file's header without loading the data. --stats reads one tensor
at a time and adds min/max/mean/std over the finite values plus NaN/inf counts
(float64 accumulation; complex tensors by magnitude).""",
        ),
    )
    p.add_argument("files", nargs="+", metavar="FILE", help="tensor files or sharded directories")
    p.add_argument("--stats", action="store_true", help="add min/max/mean/std and NaN/inf counts")
    p.add_argument(
        "--filter",
        action="append",
        metavar="GLOB",
        help="only names matching GLOB (fnmatch; repeatable)",
    )
    p.add_argument(
        "--sort",
        choices=("name", "size", "dtype", "file"),
        default="name",
        help="order: natural by name (layer.2 before layer.10; default), size "
        "(largest first), dtype, or file order",
    )
    p.add_argument("--format", choices=formats, help="read as this format, whatever the suffix")
    p.add_argument(
        "--variant",
        metavar="NAME",
        help="in a checkpoint directory, read the save_pretrained(variant=NAME) files (e.g. fp16)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON document")

    p = sub.add_parser(
        "convert",
        parents=[common],
        formatter_class=_F,
        help="convert a tensor file to another format, then verify it",
        description=_describe(
            CONVERT_EXAMPLES,
            """\
Convert SRC to DST, any format to any format, holding one tensor at a time.
The destination format comes from DST's suffix; a directory (or a path ending
in /) is written as a sharded safetensors checkpoint. The write is atomic.
Every tensor's bytes are checked. A tensor copied as it is (kernel-side, into
safetensors) is compared byte for byte with the source right after it lands,
before DST is replaced, so a mismatch leaves DST untouched. Afterwards DST is
reopened, every tensor's dtype and shape checked, and every other tensor read
back and compared with a CRC-32 taken as it was written (after --dtype).
--no-verify skips all of that.""",
        ),
    )
    p.add_argument("src", metavar="SRC")
    p.add_argument("dst", metavar="DST")
    p.add_argument("--format", choices=formats, help="write DST in this format")
    p.add_argument("--src-format", choices=formats, help="read SRC as this format")
    p.add_argument(
        "--variant",
        metavar="NAME",
        help="read SRC's save_pretrained(variant=NAME) "
        "files (e.g. fp16), when SRC is a checkpoint directory",
    )
    p.add_argument(
        "--dtype",
        metavar="DTYPE",
        help="cast floating tensors to DTYPE (e.g. bfloat16, float16); "
        "integer and bool tensors are left as they are. To .gguf: q8_0, "
        "q4_0, q4_1, q5_0, q5_1 (tq1_0, tq2_0, mxfp4 with gguf-py) "
        "quantise the float matrices",
    )
    p.add_argument(
        "--include",
        action="append",
        metavar="GLOB",
        help="only tensors whose name matches GLOB (repeatable)",
    )
    p.add_argument(
        "--exclude",
        action="append",
        metavar="GLOB",
        help="leave out tensors whose name matches GLOB (repeatable)",
    )
    p.add_argument(
        "--max-shard-size",
        metavar="SIZE",
        help="largest shard for a sharded destination, e.g. 5GB, 500MB, 2GiB",
    )
    p.add_argument(
        "--no-verify",
        dest="verify",
        action="store_false",
        help="skip reading DST back and comparing it with SRC",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="read and cast tensors in N worker processes (output byte-identical to one process)",
    )
    p.add_argument(
        "--scheduler",
        metavar="ADDRESS",
        help="run the reading and casting on a dask.distributed cluster "
        "(e.g. tcp://host:8786); workers need the same paths",
    )
    p.add_argument("--json", action="store_true", help="print a JSON summary")

    p = sub.add_parser(
        "diff",
        parents=[common],
        formatter_class=_F,
        help="compare the tensors of two files by name",
        description=_describe(
            DIFF_EXAMPLES,
            """\
Compare tensors by name across formats: names only in A or only in B, shape
and dtype changes, and for common tensors the max absolute and relative
difference and the number of mismatching elements. With --rtol 0 --atol 0
(default) the comparison is bit-exact (bytes: NaN payloads and -0.0 count).
Otherwise an element matches when |a-b| <= atol + rtol*|b| (NaN equals NaN).
Tensors whose dtype changed are compared by value in float64 (complex128), and
count as different unless --ignore-dtype is given and their values match.

--json is strict JSON: an infinite difference is null, with "nonfinite":
{"max_abs_diff": "inf"} beside it. Names from the files are printed escaped
(\\x1b, \\u202e, ...); --json has them exactly.

exit status: 0 same, 1 different, 2 trouble (missing or unreadable file).""",
        ),
    )
    p.add_argument("a", metavar="A")
    p.add_argument("b", metavar="B")
    p.add_argument("--rtol", type=float, default=0.0, help="relative tolerance (default 0)")
    p.add_argument("--atol", type=float, default=0.0, help="absolute tolerance (default 0)")
    p.add_argument(
        "--include",
        action="append",
        metavar="GLOB",
        help="only compare names matching GLOB (repeatable)",
    )
    p.add_argument(
        "--exclude",
        action="append",
        metavar="GLOB",
        help="do not compare names matching GLOB (repeatable)",
    )
    p.add_argument(
        "--ignore-dtype",
        action="store_true",
        help="a dtype change alone is not a difference (values still are)",
    )
    p.add_argument("--format-a", choices=formats, help="read A as this format, whatever the suffix")
    p.add_argument("--format-b", choices=formats, help="read B as this format, whatever the suffix")
    p.add_argument("--json", action="store_true", help="print one JSON document")

    p = sub.add_parser(
        "doctor",
        parents=[common],
        formatter_class=_F,
        help="frameworks, devices, and which conversion routes work here",
        description=_describe(
            DOCTOR_EXAMPLES,
            """\
Report Python, NumPy and ml_dtypes versions, the installed frameworks (with
versions and import times), the devices they see, and which conversion routes
work on this machine, each tried for real: numpy<->torch zero-copy, DLPack
between frameworks, pinned memory and CUDA -> NumPy.""",
        ),
    )
    p.add_argument("--json", action="store_true", help="print one JSON document")

    p = sub.add_parser(
        "demo",
        parents=[common],
        formatter_class=_F,
        help="a guided tour: tensors to NumPy and back, correctly",
        description=_describe(
            DEMO_EXAMPLES,
            """\
Walk through converting tensors between NumPy, PyTorch and TensorFlow with real
frameworks, saying at each step whether memory is shared. Ends by exporting a
small dataset with tensorbridge.Writer to an .npz and inspecting it. Steps for
frameworks that are not installed are skipped with a note.""",
        ),
    )
    p.add_argument(
        "--out", metavar="DIR", help="where to write the dataset (default: a temporary directory)"
    )
    return parser


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "inspect":
        from . import inspect_cmd

        return inspect_cmd.run(args)
    if args.command == "convert":
        from . import convert_cmd

        return convert_cmd.run(args)
    if args.command == "diff":
        from . import diff_cmd

        return diff_cmd.run(args)
    if args.command == "doctor":
        from .. import doctor

        return doctor.main(json_output=args.json, quiet=args.quiet)
    if args.command == "demo":
        from .. import demo

        return demo.main(out_dir=args.out, quiet=args.quiet)
    raise AssertionError(args.command)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (also used by the console script)."""
    from ..errors import TensorBridgeError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "quiet"):
        args.quiet = False
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return _dispatch(args)
    except KeyboardInterrupt:
        print("tensorbridge: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader (e.g. `| head`) went away: stop quietly, as Unix tools do
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    except TensorBridgeError as exc:
        return _fail(args, str(exc))
    except OSError as exc:
        where = f" {exc.filename}" if exc.filename else ""
        return _fail(
            args, f"{where.strip()}: {exc.strerror or exc}" if where else str(exc.strerror or exc)
        )
    except Exception as exc:  # never a traceback with exit 1: diff's 1 means "different"
        if os.environ.get("TENSORBRIDGE_DEBUG"):
            import traceback

            traceback.print_exc()
        return _fail(
            args,
            f"unexpected {type(exc).__name__}: {exc}. This is a bug; please "
            "report it with the command you ran (set TENSORBRIDGE_DEBUG=1 for the "
            "traceback).",
        )


def _fail(args: argparse.Namespace, text: str) -> int:
    """Report an error: on stderr, and with ``--json`` as a JSON document on stdout too
    (``{"error": ..., "exit_code": 2}``), so a script reading stdout always gets JSON."""
    from ..console import echo

    echo(f"tensorbridge: error: {text}", sys.stderr)
    if getattr(args, "json", False):
        from .common import emit_json

        emit_json({"error": text, "exit_code": 2})
    return 2
