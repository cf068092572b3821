"""The ``agkd`` command (``python -m agkd_models.cli``): one function per subcommand, each
parsing nothing itself and calling :mod:`agkd_models.experiments`; what ``agkd --help``
says is in ``DESCRIPTION`` and ``EXAMPLES`` below. Under ``torchrun`` only rank 0 writes
files.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import List, Optional

from .config import (AMP_MODES, METHODS, PRESETS, ConfigError, load_config, read_saved_config, resume_conflicts,
                     save_config)
from .data.cache import TeacherCache, TeacherCacheError
from .data.datasets import DataError
from .distillers import ATTENTION_LOSSES
from .engine import distributed
from .engine.checkpoint import CheckpointError, check_readable
from .engine.distributed import check_device, resolve_device
from .engine.run_folder import RunFolder, RunFolderError, check_out_path
from .engine.trainer import NonFiniteLossError
from .experiments.compare import COMPARE_METHODS, parse_grid, parse_methods, run_comparison, run_demo
from .experiments.chain import plan_chain, run_chain, step_config
from .experiments.experiment import Experiment
from .experiments.pipeline import check_model_settings, test_accuracy, train_teacher, write_run_report
from .experiments.report import model_costs
from .models.teacher import WeightsFileError

# Errors about the user's input (configuration, files, data), reported in one line; any
# other exception is a bug in agkd and keeps its traceback.
USER_ERRORS = (ConfigError, DataError, NonFiniteLossError, TeacherCacheError, CheckpointError, RunFolderError,
               WeightsFileError)


def _is_main() -> bool:
    return distributed.world().is_main


@contextmanager
def _own_run_folder(args, cfg, out: Path, kind: str):
    """``out`` is this run's while the block runs (:class:`RunFolder`). With ``--resume``,
    a saved ``config.yaml`` that differs in what changes the result stops the run before
    any work; the checkpoint's own record of the run is checked again when it is loaded
    (:func:`~agkd_models.experiments.pipeline.check_resume`), which also writes the new
    ``config.yaml``. Under torchrun, rank 0 claims the folder and alone writes to it."""
    if not _is_main():
        yield
        return
    inputs = [("--teacher", path) for path in getattr(args, "teacher", None) or []]
    inputs.append(("--teacher-cache", getattr(args, "teacher_cache", None)))
    with RunFolder(out, kind=kind, resume=args.resume, overwrite=args.overwrite, inputs=inputs,
                   data_root=cfg.data.root):
        saved = out / "config.yaml"
        if args.resume and saved.is_file():
            conflicts = resume_conflicts(read_saved_config(saved), cfg)
            if conflicts:
                raise ConfigError(f"--resume continues the run in {out} as it was configured; these settings "
                                  f"differ and would change its result: {'; '.join(conflicts)}. Start a new run "
                                  f"(another --out, or --overwrite) to train with them")
        yield


def cmd_train_teacher(args, cfg):
    out = Path(args.out)
    with _own_run_folder(args, cfg, out, "train-teacher"):
        _train_teacher(args, cfg, out)


def _train_teacher(args, cfg, out: Path):
    run = train_teacher(cfg, out, args.resume)
    if not _is_main():
        return
    device = resolve_device(cfg.train.device)
    costs = model_costs(run["model"].to(device), cfg.data.image_size, device)
    test_acc = test_accuracy(run["model"], run["data"], cfg, device)
    write_run_report(out, "Teacher training", {"teacher": {"history": run["history"], "costs": costs,
                                                            "test_acc": test_acc}})
    print(f"teacher: val acc {run['history'][-1]['val_acc']:.4f}, test acc {test_acc:.4f}; "
          f"wrote {out}/teacher.pt, report.md")


def cmd_distill(args, cfg):
    out = Path(args.out)
    if args.method:
        cfg.distill.method = args.method
    with _own_run_folder(args, cfg, out, "distill"):
        _distill(args, cfg, out)


def _distill(args, cfg, out: Path):
    experiment = Experiment(cfg, args.teacher)
    run = experiment.distill(cfg, out, args.resume, args.teacher_cache)
    if not _is_main():
        return
    device = resolve_device(cfg.train.device)
    student = experiment.student_report(cfg, run, device)
    last = run["history"][-1]
    kept = [f"{name}: val acc {last[f'val_acc_{name}']:.4f}, test acc {acc:.4f} (wrote {out}/{name}.pt)"
            for name, acc in student.get("kept_test_acc", {}).items()]
    write_run_report(out, f"Distillation ({cfg.distill.method})", {f"student ({cfg.distill.method})": student},
                     notes=[f"Kept beside the student: {'; '.join(kept)}."] if kept else None)
    print(f"student: val acc {last['val_acc']:.4f}, test acc {student['test_acc']:.4f}; wrote {out}/student.pt, "
          f"report.md" + "".join(f"\n{line}" for line in kept))


def cmd_evaluate(args, cfg):
    result = Experiment(cfg).evaluate(args.checkpoint, args.model, args.split)
    print(json.dumps(result))
    return result


def cmd_cache_teacher(args, cfg):
    out = Experiment(cfg, args.teacher).write_cache(args.out, epochs=args.epochs, dtype=args.dtype, topk=args.topk,
                                                    overwrite=args.overwrite)
    if _is_main():
        manifest = TeacherCache.open(out).manifest
        size = sum((out / f["file"]).stat().st_size for f in manifest["fields"].values())
        print(f"teacher cache: {manifest['num_samples']} samples x {manifest['epochs']} epochs, {manifest['dtype']}"
              f"{'' if manifest['topk'] is None else ', top-' + str(manifest['topk'])}, {size / 2**20:.1f} MiB in {out}")


def cmd_compare(args, cfg):
    out = Path(args.out)
    methods = parse_methods(args.methods)
    grid = parse_grid(args.grid, cfg)
    if args.seeds < 1:
        raise ConfigError(f"--seeds must be at least 1, got {args.seeds}")
    # A comparison folder is meant to be re-entered (finished runs are kept), so it is only
    # locked, never refused for holding earlier results.
    with RunFolder(out, kind="compare", work_files=(), data_root=cfg.data.root):
        save_config(cfg, out / "config.yaml")
        _compare(args, cfg, out, methods, grid)


def _compare(args, cfg, out: Path, methods, grid):
    experiment = Experiment(cfg, args.teacher)
    if not args.teacher:
        experiment.prepare_teacher(out / "teacher", cfg.train.epochs if args.teacher_epochs is None
                                   else args.teacher_epochs, log=_log("compare"))
    seeds = [cfg.train.seed + i for i in range(args.seeds)]
    student_epochs = cfg.train.epochs if args.student_epochs is None else args.student_epochs
    run_comparison(experiment, out, methods=methods, seeds=seeds, student_epochs=student_epochs, grid=grid,
                   log=_log("compare"))
    print((out / "comparison.md").read_text())


def cmd_chain(args, cfg):
    out = Path(args.out)
    if args.method:
        cfg.distill.method = args.method
    through = [name.strip() for name in args.through.split(",") if name.strip()]
    steps = plan_chain(cfg, through=through, generations=args.generations or 0, has_teacher=bool(args.teacher))
    for step in steps:  # each step's student (an assistant's architecture) checked before any work
        check_model_settings(step_config(cfg, step))
    # Re-entered like a comparison: finished steps are kept, so the folder is only locked.
    with RunFolder(out, kind="chain", work_files=(), data_root=cfg.data.root):
        save_config(cfg, out / "config.yaml")
        run_chain(Experiment(cfg, args.teacher), out, steps, log=_log("chain"))
        print((out / "chain.md").read_text())


def _log(command):
    return lambda message: print(f"[{command}] {message}", flush=True)


def cmd_demo(args, cfg):
    with RunFolder(Path(args.out), kind="compare", work_files=(), data_root=cfg.data.root):  # re-entered like one
        _demo(args, cfg)


def _demo(args, cfg):
    out = Path(args.out)
    save_config(cfg, out / "config.yaml")
    losses = [loss.strip() for loss in args.attention_losses.split(",") if loss.strip()]
    unknown = sorted(set(losses) - set(ATTENTION_LOSSES))
    if unknown:
        raise ConfigError(f"--attention-losses: unknown {', '.join(unknown)}; choose from {', '.join(ATTENTION_LOSSES)}")
    report = run_demo(Experiment(cfg), out, attention_losses=losses, teacher_epochs=args.teacher_epochs,
                      student_epochs=args.student_epochs, log=_log("demo"))
    print(report.read_text())
    print((out / "comparison.md").read_text())


DESCRIPTION = """\
Train a hybrid CNN + ViT teacher and distil it into a small student: logit KD,
attention-guided KD (AGKD) and cross-architecture KD (CAKD), compared over seeds."""

EXAMPLES = """\
examples:
  agkd demo                                     digits: a teacher, then students, one table
  agkd train-teacher --config digits --out runs/teacher
  agkd distill --teacher runs/teacher/teacher.pt --method agkd --out runs/agkd
  agkd cache-teacher --teacher runs/teacher/teacher.pt --epochs 6 --out runs/cache
  agkd distill --teacher runs/teacher/teacher.pt --teacher-cache runs/cache --out runs/agkd-cached
  agkd compare --teacher runs/teacher/teacher.pt --methods none,logit,agkd-hybrid,cakd --seeds 3
  agkd compare --teacher runs/teacher/teacher.pt --methods logit,agkd-ssim --grid logit.temperature=2,4
  agkd chain --teacher runs/teacher/teacher.pt --through efficientnet_b3 --method logit   teacher assistant
  agkd chain --generations 3 --method logit                      born-again networks
  agkd evaluate --checkpoint runs/agkd/student.pt --model student --split val
  torchrun --nproc_per_node=4 -m agkd_models.cli distill ...    one process per GPU

--config takes a preset or a YAML file; --set section.key=value overrides any setting
(--set train.epochs=3 --set agkd.attention_loss=ssim); the resolved configuration is
saved as config.yaml in the output folder. `agkd COMMAND --help` lists a command's options.
"""


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Description and examples as written; the command list in one column (argparse
    measures subcommand names without the indent it then gives them, so the longer names
    would spill their help onto a line of its own)."""

    def add_argument(self, action):
        super().add_argument(action)
        if isinstance(action, argparse._SubParsersAction):
            self._action_max_length += self._indent_increment


def _positive_int(text: str) -> int:
    """An argparse type: an integer >= 1 (0 epochs or seeds is never meant)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def _check_environment() -> None:
    """The environment variables agkd reads, checked before any work."""
    import agkd_ops
    try:
        agkd_ops.get_backend()
    except ValueError as exc:
        raise ConfigError(str(exc).removeprefix("agkd_ops: ")) from None


def _os_error_line(exc: OSError) -> str:
    """An OSError as one line naming the file (a full disk, a read-only folder, a path too
    long for the file system)."""
    what = exc.strerror or str(exc)
    name = str(exc.filename) if exc.filename else ""
    if len(name) > 160:  # a name too long for the file system is too long for one line too
        name = f"{name[:80]}...{name[-40:]} ({len(name)} characters)"
    return f"{name}: {what}" if name else what


MULTI = ("; repeat it for several teachers, combined into one (distill.teacher_weights, distill.teacher_average; "
         "each one's architecture from the teacher_recipe.json beside it)")


def build_parser() -> argparse.ArgumentParser:
    """The `agkd` command line: every subcommand and its flags."""
    parser = argparse.ArgumentParser(prog="agkd", description=DESCRIPTION, epilog=EXAMPLES,
                                     formatter_class=_HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", title="commands")

    def common(p, default_config):
        p.add_argument("--config", default=default_config,
                       help=f"preset ({', '.join(PRESETS)}) or YAML file (default: {default_config})")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config entry, e.g. --set train.epochs=3 (repeatable); a mapping such as "
                            "teacher.vit_kwargs={patch_size: 8} merges into the preset's")
        p.add_argument("--download", action="store_true",
                       help="allow fetching the data set (CIFAR); never done otherwise")

    def speed(p):
        p.add_argument("--amp", choices=AMP_MODES, default=None, help="autocast (default: the config's train.amp)")
        p.add_argument("--channels-last", action="store_true", help="channels_last memory format")
        p.add_argument("--compile", action="store_true",
                       help="torch.compile the model (and a distiller's loss path, fullgraph)")

    def resumable(p):
        p.add_argument("--resume", action="store_true",
                       help="continue the run in OUT from its checkpoint (its settings must match)")
        p.add_argument("--overwrite", action="store_true", help="replace the run in OUT (its files are deleted)")

    p = sub.add_parser("train-teacher", help="train the hybrid teacher")
    common(p, "digits")
    p.add_argument("--out", default="runs/teacher")
    resumable(p)
    speed(p)
    p = sub.add_parser("distill", help="train a student from a trained teacher")
    common(p, "digits")
    p.add_argument("--teacher", required=True, action="append", help=f"teacher.pt written by train-teacher{MULTI}")
    p.add_argument("--method", choices=METHODS, default=None, help="default: the config's distill.method")
    p.add_argument("--out", default="runs/student")
    resumable(p)
    p.add_argument("--teacher-cache", default=None, metavar="DIR",
                   help="read the teacher's outputs from a cache-teacher folder instead of running it")
    speed(p)
    p = sub.add_parser("cache-teacher", help="run the teacher once over E epochs of augmentation and store it")
    common(p, "digits")
    p.add_argument("--teacher", required=True, action="append", help=f"teacher.pt written by train-teacher{MULTI}")
    p.add_argument("--out", required=True, help="cache folder to create")
    p.add_argument("--epochs", type=_positive_int, required=True, help="augmentation epochs to cache")
    p.add_argument("--dtype", choices=("float16", "float32"), default="float16", help="storage precision")
    p.add_argument("--topk", type=_positive_int, default=None, help="keep only the k largest teacher logits per sample")
    p.add_argument("--overwrite", action="store_true", help="replace an existing cache folder")
    p = sub.add_parser("evaluate", help="test (or validation) loss and accuracy of a saved model")
    common(p, "digits")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--model", choices=("teacher", "student"), default="student")
    p.add_argument("--split", choices=("val", "test"), default="test",
                   help="evaluation set (default: test; choose recipes on val)")
    p = sub.add_parser("compare", help="students trained with several methods over several seeds, one table")
    common(p, "digits")
    p.add_argument("--out", default="runs/compare")
    p.add_argument("--teacher", default=None, action="append",
                   help=f"teacher.pt to distil from (default: train one in OUT/teacher, or reuse the one there){MULTI}")
    p.add_argument("--methods", default=",".join(COMPARE_METHODS),
                   help=f"comma-separated, from {', '.join(COMPARE_METHODS)} (default: all)")
    p.add_argument("--seeds", type=_positive_int, default=3, help="training seeds train.seed, +1, ... (default 3)")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="try each value of a recipe setting (repeatable, e.g. --grid agkd.kd_weight=0.5,0.9 "
                        "--grid train.lr=0.001,0.002); each method is reported at the grid point with the best "
                        "mean validation accuracy, the whole grid in comparison.json")
    p.add_argument("--teacher-epochs", type=_positive_int, default=None, help="default: train.epochs")
    p.add_argument("--student-epochs", type=_positive_int, default=None, help="default: train.epochs")
    p = sub.add_parser("chain", help="distillation runs in a chain: teacher assistants, born-again generations")
    common(p, "digits")
    p.add_argument("--out", default="runs/chain")
    p.add_argument("--teacher", default=None, action="append",
                   help="teacher.pt the first step distils from (default: none; generation 0 then learns from the "
                        f"labels alone){MULTI}")
    p.add_argument("--through", default="", metavar="ARCH,...",
                   help="teacher assistants (Mirzadeh et al.): timm names of the students between the teacher and "
                        "student.name, largest first, each distilled from the one before")
    p.add_argument("--generations", type=_positive_int, default=None,
                   help="born-again networks (Furlanello et al.): N generations of student.name, each distilled "
                        "from the one before")
    p.add_argument("--method", choices=METHODS, default=None, help="default: the config's distill.method")
    p = sub.add_parser("demo", help="digits: a teacher, then students without KD, with logit KD and with AGKD")
    common(p, "digits")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--teacher-epochs", type=_positive_int, default=6,
                   help="default 6: the teacher then reaches about 0.99 test accuracy")
    p.add_argument("--student-epochs", type=_positive_int, default=6,
                   help="default 6, not the preset's 20, so that the demo takes minutes on a 2-core CPU; at 20 "
                        "the students come within 0.01 of the teacher (docs/results/digits/budget.md)")
    p.add_argument("--attention-losses", default="hybrid",
                   help="comma-separated AGKD attention losses to compare (mse,cosine,ssim,hybrid,perceptual)")

    for action in sub.choices.values():
        action.add_argument("--debug", action="store_true",
                            help="show the full traceback of an error (also: AGKD_DEBUG=1)")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    previous_handler = signal.signal(signal.SIGTERM, _stop_on_sigterm)
    try:
        _check_environment()
        cfg = load_config(args.config, args.set)
        if getattr(args, "out", None):
            check_out_path(Path(args.out), data_root=cfg.data.root)
        if args.download:
            cfg.data.download = True
        if getattr(args, "amp", None):
            cfg.train.amp = args.amp
        if getattr(args, "channels_last", False):
            cfg.train.channels_last = True
        if getattr(args, "compile", False):
            cfg.train.compile = True
        check_device(cfg.train.device)
        check_model_settings(cfg)
        # Files named on the command line, before any work starts.
        for path in getattr(args, "teacher", None) or []:
            check_readable(Path(path), "teacher file")
        if getattr(args, "checkpoint", None):
            check_readable(Path(args.checkpoint), "checkpoint")
        if getattr(args, "teacher_cache", None) and not Path(args.teacher_cache).is_dir():
            raise TeacherCacheError(f"teacher cache {args.teacher_cache}: no such folder (write one with "
                                    f"agkd cache-teacher)")
        if args.command in ("train-teacher", "distill", "cache-teacher"):
            distributed.setup(cfg.train.device)  # under torchrun: join the group before anything is written
        {"train-teacher": cmd_train_teacher, "distill": cmd_distill, "cache-teacher": cmd_cache_teacher,
         "evaluate": cmd_evaluate, "compare": cmd_compare, "chain": cmd_chain, "demo": cmd_demo}[args.command](args, cfg)
    except USER_ERRORS as exc:  # the user's input is wrong, not agkd: one line, exit status 2
        if args.debug or os.environ.get("AGKD_DEBUG", "0") not in ("", "0"):
            raise
        message = " ".join(str(exc).split())
        print(f"agkd {args.command}: error: {message}", file=sys.stderr)
        return 2
    except OSError as exc:  # the machine's files refuse (a full disk, read-only, a name too long)
        if args.debug or os.environ.get("AGKD_DEBUG", "0") not in ("", "0"):
            raise
        print(f"agkd {args.command}: error: {_os_error_line(exc)}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, Stopped) as exc:
        # Stopped on purpose: one line on what was kept, and the shell's status for the signal.
        signum = exc.signum if isinstance(exc, Stopped) else signal.SIGINT
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        print(f"agkd {args.command}: stopped by {name}; {_what_was_kept(args)}", file=sys.stderr, flush=True)
        return 128 + int(signum)
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        distributed.shutdown()
    return 0


class Stopped(Exception):
    """SIGTERM, turned into an exception so that ``finally`` blocks run (partial files go)."""

    def __init__(self, signum: int):
        super().__init__(f"signal {signum}")
        self.signum = signum


def _stop_on_sigterm(signum, _frame):
    raise Stopped(signum)


def _what_was_kept(args) -> str:
    out = Path(getattr(args, "out", None) or ".")
    if args.command in ("train-teacher", "distill"):
        metrics = out / "metrics.jsonl"
        if (out / "checkpoint.pt").is_file() and metrics.is_file():
            epochs = len(metrics.read_text().splitlines())
            return (f"{epochs} finished epoch(s) are saved in {out}; continue with the same command and --resume "
                    f"(the epoch in progress is lost)")
        return f"no epoch had finished, nothing to resume in {out}"
    if args.command in ("compare", "demo", "chain"):
        return f"finished students are kept in {out}; the same command again continues with the rest"
    if args.command == "cache-teacher":
        return "the unfinished cache was removed; run the command again to write it"
    return "nothing was written"


if __name__ == "__main__":
    sys.exit(main())
