"""``vitlab`` command line: ``vitlab train | eval | predict | export | analyze | pretrain | study | bench | models``.

Each sub-command lives in its own module, which exposes ``add_arguments(parser)`` and
``run(args) -> int``; modules are imported lazily so ``vitlab --help`` is fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

# sub-command -> (module, one-line help)
COMMANDS = {
    "train": ("vitlab.engine.train_cli", "train a model (default: the bundled data set)"),
    "eval": ("vitlab.engine.eval_cli", "evaluate a checkpoint: accuracy, NLL, calibration"),
    "predict": ("vitlab.engine.predict_cli", "top-k classes of image files or folders (CSV or JSON)"),
    "export": ("vitlab.engine.export_cli", "export a checkpoint to ONNX (checked with onnxruntime) or torch.export"),
    "analyze": ("vitlab.analysis.cli", "analyse a model: spectra, oversmoothing, Hessian, ..."),
    "pretrain": ("vitlab.pretrain.cli", "self-supervised pretraining (MAE, SimMIM, DINO, MPP) of a backbone"),
    "study": ("vitlab.studies.cli", "reproduce a paper's claim in miniature: train, measure, verdict table"),
    "bench": ("vitlab.bench", "measure speed, memory and FLOPs of a model"),
    "models": ("vitlab.models.cli", "list registered models (with --table: params and FLOPs)"),
}


from vitlab.errors import UserError  # noqa: E402,F401  (re-exported: older code imports it from here)


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line; an error re-raised from a DataLoader worker carries the
    worker's whole traceback, of which only its last line (the original message) is kept."""
    msg = str(exc).strip()
    if "Traceback (most recent call last)" in msg:
        last = msg.splitlines()[-1]
        msg = last.split(": ", 1)[1] if ": " in last and last.split(": ", 1)[0].replace(".", "").isidentifier() else last
    return " ".join(msg.split("\n")).strip()


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="vitlab", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = argv[0] if argv and argv[0] in COMMANDS else None
    modules = {}
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if wanted is None or wanted == name:
            try:
                modules[name] = importlib.import_module(module_name)
            except ModuleNotFoundError as exc:  # a sub-command not built yet
                if exc.name != module_name:
                    raise
                continue
            modules[name].add_arguments(p)
    if not argv:
        argv = ["train"]  # `vitlab` alone runs the main job
    args = parser.parse_args(argv)
    module = modules.get(args.command)
    if module is None:
        parser.error(f"sub-command '{args.command}' is not available")
    if args.command != "models":
        from vitlab.runtime import tune_cpu_allocator

        tune_cpu_allocator()  # reuse freed activation memory instead of faulting it in again (VITLAB_TUNE_MALLOC=0: off)
    try:
        return int(module.run(args) or 0)
    except (UserError, ValueError, FileNotFoundError, NotADirectoryError) as exc:
        if getattr(args, "traceback", False):
            raise
        print(f"vitlab {args.command}: error: {one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
