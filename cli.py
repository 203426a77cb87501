"""The ``erf-lab`` command line: parses arguments, calls one library function per
subcommand, prints. No logic of its own (DESIGN section 1).

Every user error (an :class:`erf_lab.errors.ErfLabError` or a ``ValueError`` from
argument validation) becomes one line on stderr and exit code 2; ``--debug``
shows the traceback instead.
"""
import argparse
import sys
from typing import Callable, Dict, List, Optional

EXIT_USAGE = 2

# Subcommands not built yet: (name, one-line help). Each section below removes its
# names from here when it registers the real subcommand.
_PLANNED = {
    "erf": "effective receptive field of a model (not implemented yet)",
    "rf": "theoretical receptive field of every layer (not implemented yet)",
    "layers": "list a model's layers with output shapes (not implemented yet)",
    "train": "train a study model on a data set (not implemented yet)",
    "tsne": "t-SNE of features coloured by class and box size (not implemented yet)",
    "report": "rebuild an HTML report from saved results (not implemented yet)",
    "figures": "reproduce the paper's figures and tables (not implemented yet)",
}

Handlers = Dict[str, Callable[[argparse.Namespace], int]]


def _not_implemented(name: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        print(f"erf-lab {name}: not implemented yet", file=sys.stderr)
        return EXIT_USAGE

    return run


def _cmd_ops(args: argparse.Namespace) -> int:
    import dk_ops

    info = dk_ops.backend_info()
    for key, value in info.items():
        print(f"{key}: {value}")
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from dk_ops import models

    for name in models.names():
        print(name)
    return 0


# ---- section: erf / rf / layers (erf_lab ERF engine) ---------------------------------------
def _add_erf_commands(sub: "argparse._SubParsersAction", handlers: Handlers) -> None:
    """Registers erf, rf and layers (not yet: they are in _PLANNED)."""


# ---- section: train (erf_lab data and training) ---------------------------------------------
def _add_train_command(sub: "argparse._SubParsersAction", handlers: Handlers) -> None:
    """Registers train (not yet: it is in _PLANNED)."""


# ---- section: tsne / report (analyses) ------------------------------------------------------
def _add_tsne_commands(sub: "argparse._SubParsersAction", handlers: Handlers) -> None:
    """Registers tsne and report (not yet: they are in _PLANNED)."""


# ---- section: figures -----------------------------------------------------------------------
def _add_figures_command(sub: "argparse._SubParsersAction", handlers: Handlers) -> None:
    """Registers figures (not yet: it is in _PLANNED)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="erf-lab",
        description="Deformable Kernels and effective receptive fields: what does my network look at?",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    handlers: Handlers = {}

    p = sub.add_parser("ops", help="which operator implementation runs on which device")
    handlers["ops"] = _cmd_ops
    p = sub.add_parser("models", help="list the model zoo's architectures")
    handlers["models"] = _cmd_models

    _add_erf_commands(sub, handlers)
    _add_train_command(sub, handlers)
    _add_tsne_commands(sub, handlers)
    _add_figures_command(sub, handlers)
    for name, help_text in _PLANNED.items():
        sub.add_parser(name, help=help_text, add_help=True)
        handlers[name] = _not_implemented(name)

    parser.set_defaults(_handlers=handlers)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    if unknown:
        if args.command in _PLANNED:
            return _not_implemented(args.command)(args)
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    from erf_lab.errors import ErfLabError

    try:
        return args._handlers[args.command](args)
    except (ErfLabError, ValueError, FileNotFoundError) as exc:
        if args.debug:
            raise
        print(f"erf-lab {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"erf-lab {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
