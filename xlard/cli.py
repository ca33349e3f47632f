"""The ``xlard`` command line.

    xlard info                                   versions, build, providers
    xlard prompts --split heldout -n 500 OUT     a shapes-world prompt set (GenEval JSONL)
    xlard render --prompts FILE OUT              ground-truth renders in GenEval's folder layout
    xlard eval --prompts FILE --images DIR       the exact evaluator's table on images
    xlard eval --folder DIR                      ... on a GenEval output folder
    xlard generate --backbone shapes "three red circles left of a blue square"
    xlard eval --backbone shapes --prompts FILE  generate one image per record, then the table
    xlard eval --prompts FILE --corrector DIR --seeds 0,1   base vs corrected, paired, with intervals
    xlard generate --backbone shapes --correct "..."        with the shipped corrector (+ base, LAM)
    xlard train configs/shapes.yaml --out DIR    train a corrector (--resume continues a run)
    xlard demo --out DIR                         train, evaluate on held-out prompts, HTML report

``--backbone`` takes ``shapes`` (the embedded shapes-world model shipped in
``xlard/data/shapes_backbone``), a local diffusers pipeline folder, or a hub
model id (real weights are loaded the same way as the tiny ones).

An output folder that already holds results of an earlier run is refused
unless ``--overwrite`` (clears what the command wrote there before) or
``--resume`` (continues that run, reusing what is complete). Exit codes: 0 done,
2 a usage error (one line on stderr naming the argument), 1 a system error
(e.g. a full disk), 130 interrupted (Ctrl-C; every file left is complete), 143
terminated (SIGTERM; the same).
See docs/cli.md.

Every command works offline on a CPU and shows progress on long work.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import sys
import warnings
from pathlib import Path
from typing import Callable, Sequence

from xlard import _io
from xlard._signals import USER_ERRORS, import_held, interrupted_line, sigterm_interrupts

# Bounds checked before any work starts, so a typo cannot run until memory runs out.
MAX_RECORDS = 100_000
"""Most records a prompt set may hold (``prompts -n`` and every ``--prompts`` file)."""
MAX_PER_PROMPT = 1000
"""Most images per prompt; also keeps ``render``'s seeds (seed + 1000 * record + image) distinct."""
MAX_IMAGES = 1_000_000
"""Most images one command may produce."""
MAX_BATCH = 4096
MAX_STEPS = 10_000
MAX_SEED = 2**31 - 1
MAX_BOOTSTRAP = 100_000
MIN_BOOTSTRAP = 40  # evaluation.min_resamples(0.95): --bootstrap 1 gave one replicate as the interval
"""Most bootstrap resamples (``eval --bootstrap``): each draws an index per record, so memory grows with both."""

MANIFEST_NAME = _io.MANIFEST_NAME
"""Written into every output folder: which command and settings made it, and whether it finished."""
_UNIT_NAME = re.compile(r"^\d{5,}$")  # GenEval prompt folders: 00000, 00001, ...
# generate's files, either form: 0000_seed0.png, ...; with --corrector/--correct also the base and LAM images and
# the actions file (evaluation.GENERATE_ACTIONS_NAME)
_GENERATE_NAME = re.compile(r"^(\d{4,}_seed\d+(_base|_lam)?\.png|corrections\.jsonl)$")
_PAIRED_EVAL_NAMES = ("run.json", "pairs.jsonl", "eval.json", "eval.md", "images")  # eval --corrector/--correct


class UsageError(Exception):
    """A mistake in the command line or its inputs: one line on stderr, exit code 2.

    The message names the argument and says how to fix it.

    Args:
        message: the line to print (after ``<prog>: error: ``).
        prog: the (sub)command the error belongs to, when known.
    """

    def __init__(self, message: str, prog: str | None = None):
        super().__init__(message)
        self.prog = prog


class _Parser(argparse.ArgumentParser):
    """argparse with its errors turned into one-line :class:`UsageError` (exit 2, no usage dump), and no
    abbreviated options (``demo --seed 1`` was taken as ``--seeds 1`` and started a full demo)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)  # the subcommands' parsers are made by this class too
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # type: ignore[override]
        # `xlard --vers` (an unknown option and no command) was told only "the following arguments are required:
        # command": the option it did not know is the mistake to name
        argv = getattr(self, "_argv", None)
        if argv is not None and message.endswith("required: command"):
            unknown = [a for a in argv if a.startswith("-") and a != "--"
                       and a.split("=", 1)[0] not in self._option_string_actions]
            if unknown:
                message = f"unrecognized arguments: {' '.join(unknown)}"
        raise UsageError(f"{message} (see `{self.prog} --help`)", prog=self.prog)

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        self._argv = [str(a) for a in (sys.argv[1:] if args is None else args)]
        # argparse reports a subcommand's unknown option from the top parser ("xlard: error: ... see `xlard
        # --help`", which does not list the command's options): named with the command instead
        try:
            parsed, extras = self.parse_known_args(args, namespace)
        finally:  # only this call's words: a later parse_known_args on the same parser must not see them
            self._argv = None
        if extras:
            command = getattr(parsed, "command", None)
            prog = f"{self.prog} {command}" if command else self.prog
            hint = ("; train has no --overwrite: continue a run with --resume, or give a new --out"
                    if command == "train" and "--overwrite" in extras else "")
            raise UsageError(f"unrecognized arguments: {' '.join(extras)}{hint} (see `{prog} --help`)", prog=prog)
        return parsed


def _int_in(lo: int, hi: int, note: str = "") -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"must be in {lo}..{hi}{note}, got {value}")
        return value

    parse.__name__ = "integer"
    return parse


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def _guidance(text: str) -> float:
    value = _finite_float(text)
    if not 0 <= value <= 1000:  # as DiffusersBackbone checks it, but before the backbone loads
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1000] (models use about 1 to 30), got {text!r}")
    return value


def _open_fraction(text: str) -> float:
    value = _finite_float(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be a fraction strictly between 0 and 1, got {text!r}")
    return value


def _one_line(exc: BaseException) -> str:
    """The error's text on one line, with the characters a terminal acts on shown escaped (a path or an option
    holding ESC [2J cleared the screen, a right-to-left override reversed the rest of the line)."""
    return _io.show_controls(" ".join(str(exc).split())) or type(exc).__name__


# ---------------------------------------------------------------------------------------------
# Checks shared by the commands (all run before any work)


def _input_file(path: str, flag: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{flag}: no such file {path}; check the path")
    if not p.is_file():
        raise UsageError(f"{flag}: {path} is not a file; give the path of a file")
    try:
        with open(p, "rb"):
            pass
    except OSError as exc:  # unreadable (permissions): named here, not as a bare "[Errno 13]" line later
        raise UsageError(f"{flag}: cannot read {path}: {exc.strerror or exc}") from None
    return p


def _input_folder(path: str, flag: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{flag}: no such folder {path}; check the path")
    if not p.is_dir():
        raise UsageError(f"{flag}: {path} is not a folder; give the path of a folder")
    try:
        os.listdir(p)
    except OSError as exc:
        raise UsageError(f"{flag}: cannot read {path}: {exc.strerror or exc}") from None
    return p


def _output_file(path: str | None, flag: str) -> None:
    """A file the command will write: a regular file or a new path, in an existing folder."""
    if path is None:
        return
    try:
        _io.check_output_file(path, flag)
    except (OSError, ValueError) as exc:
        raise UsageError(_one_line(exc)) from None


def _output_folder(path: str | os.PathLike, flag: str) -> None:
    """A folder the command will create or write into: checked before any work (nothing is created)."""
    try:
        _io.check_writable_folder(path, flag)
    except OSError as exc:
        raise UsageError(_one_line(exc)) from None


def _distinct_outputs(outputs: dict[str, str | None], inputs: dict[str, str | None]) -> None:
    """No output may replace an input or another output of the same command."""
    seen: dict[str, str] = {}
    for flag, value in list(inputs.items()) + list(outputs.items()):
        if value is None:
            continue
        key = os.path.realpath(value)
        if key in seen:
            raise UsageError(f"{flag}: {value} is also given as {seen[key]}; writing it would destroy that file "
                             "(give another path)")
        seen[key] = flag


def _outside_run_outputs(outputs: dict[str, str | None], out: Path, out_flag: str, names: Sequence[str],
                         units: bool = False) -> None:
    """No file option may land on what the run writes in its output folder (``names`` at its top, or anything in
    a prompt folder ``NNNNN/`` when ``units``): ``--json OUT/pairs.jsonl`` replaced every per-pair verdict."""
    root = os.path.realpath(out)
    for flag, value in outputs.items():
        if value is None:
            continue
        path = os.path.realpath(value)
        if os.path.commonpath([root, path]) != root or path == root:
            continue
        first = Path(os.path.relpath(path, root)).parts[0]
        if first in names or (units and _UNIT_NAME.match(first)):
            raise UsageError(f"{flag}: {value} is one of the files the run writes in {out_flag} {out} "
                             f"({first}); writing it there would destroy them (give a path outside them)")


def _read_records(path: str, flag: str = "--prompts") -> list[dict]:
    """A GenEval prompt file: exists, valid (known tags included), 1..MAX_RECORDS records, every class and
    color one of the shapes world's (what ``render`` draws and the exact evaluator judges: a record of
    another world fails up front, not after its images were generated)."""
    return _read_records_with_lines(path, flag)[0]


def _read_records_with_lines(path: str, flag: str = "--prompts") -> tuple[list[dict], list[int]]:
    """:func:`_read_records`, and each record's line number (for messages about a record found later)."""
    from xlard.shapes import prompts as P
    from xlard.shapes.world import WorldConfig

    _input_file(path, flag)
    lines: list[int] = []
    try:
        records = P.read_records(path, WorldConfig(), line_numbers=lines)
    except ValueError as exc:
        raise UsageError(f"{flag}: {_one_line(exc)}") from None
    if not records:
        raise UsageError(f"{flag}: {path} holds no records; write some with `xlard prompts`")
    if len(records) > MAX_RECORDS:
        raise UsageError(f"{flag}: {path} holds {len(records)} records; at most {MAX_RECORDS} per run "
                         "(split the file)")
    world = WorldConfig()
    for i, record in enumerate(records):  # no image can pass such a record: refused, not scored as a failure
        try:
            P.check_satisfiable(record, world)
        except ValueError as exc:  # by its line, as every other error of the file (it said "record 0")
            raise UsageError(f"{flag}: {path}:{lines[i]}: {_one_line(exc)}") from None
    return records, lines


def _inside_inputs(outputs: dict[str, str | None], folder, in_flag: str) -> None:
    """No output file may lie inside a folder the command reads (``--results F/00000/metadata.jsonl`` replaced a
    record by 24 result lines; ``--json IMAGES/3.png`` a sample by JSON)."""
    root = os.path.realpath(folder)
    for flag, value in outputs.items():
        if value is not None and os.path.commonpath([root, os.path.realpath(value)]) == root:
            raise UsageError(f"{flag}: {value} lies inside {in_flag} {folder}, which is being read; writing there "
                             "would change what is scored (give a path outside it)")


def _units_to_make(out: Path, count: int, samples: int, resuming: bool) -> list[int]:
    """The prompt folders a run makes: all, or under ``--resume`` the incomplete ones (see :func:`_complete_unit`).
    An incomplete one that is a link is refused: remaking it replaced the folder the link points at, outside OUT."""
    todo = []
    for i in range(count):
        unit = out / f"{i:05d}"
        if resuming and _complete_unit(unit, samples):
            continue
        if resuming and unit.is_symlink():
            raise UsageError(f"--resume: {unit} is incomplete and a link (to {os.readlink(unit)}); remaking it would "
                             "replace what the link points at: complete or remove it by hand")
        todo.append(i)
    return todo


def _complete_unit(folder: Path, samples: int) -> bool:
    """Whether a prompt folder of GenEval's layout is whole: its metadata.jsonl and ``samples`` PNGs (``--resume``
    reused any folder that existed: one with a sample deleted stayed short, an emptied one was scored as nothing)."""
    from xlard.shapes import evaluator as E

    if not (folder / "metadata.jsonl").is_file() or not (folder / "samples").is_dir():
        return False
    try:
        return len(E.png_files(folder / "samples")) >= samples
    except OSError:
        return False


def _check_image_count(count: int, what: str) -> None:
    if count > MAX_IMAGES:
        raise UsageError(f"{what} make {count} images; at most {MAX_IMAGES} per run (use fewer records or "
                         "a smaller --per-prompt)")


def _check_device(device: str | None) -> None:
    """``--device``: a device this machine has; checked before anything loads."""
    if device is None:
        return
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise UsageError(f"--device: {device!r} is not a device name; use cpu, cuda, cuda:N or mps") from None
    from xlard._args import missing_device

    if dev.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"--device: {device!r} is not supported; use cpu, cuda, cuda:N or mps")
    why = missing_device(dev)
    if why is not None:
        fix = "drop --device to run on the CPU" + (" (or install a CUDA build of torch)" if dev.type == "cuda" else "")
        raise UsageError(f"--device: {why}; {fix}")


def resolve_backbone(name: str) -> str:
    """``shapes`` -> the shapes-world pipeline folder (package data or $XLARD_SHAPES_BACKBONE); else as given."""
    if name == "shapes":
        from xlard.shapes import backbone as shapes_backbone

        folder = shapes_backbone.backbone_path()
        if not shapes_backbone.is_available(folder):
            raise UsageError(f"--backbone shapes: {shapes_backbone.not_installed()}")
        return str(folder)
    return name


def _check_backbone(name: str, flag: str = "--backbone") -> str:
    """``--backbone``: 'shapes', a pipeline folder (with model_index.json) or a hub id; returns what to load."""
    from xlard._args import model_location

    try:
        return model_location(flag, resolve_backbone(name), "model_index.json",
                              "a diffusers pipeline folder (written by pipeline.save_pretrained(...))", ", 'shapes'")
    except (OSError, ValueError) as exc:
        raise UsageError(str(exc)) from None


def _quiet_hub_logging(progress_bars: bool = True) -> None:
    """diffusers/transformers log multi-line notices while loading; the CLI reports errors itself, in one line
    (their own error records too: diffusers logged "An error occurred while trying to fetch ..." before the
    error xlard names). ``progress_bars=False`` (``--quiet``) also hides their loading and download bars."""
    for name in ("diffusers", "transformers", "huggingface_hub"):
        try:
            module = __import__(f"{name}.utils", fromlist=["logging"])
            module.logging.set_verbosity(module.logging.CRITICAL)
            if not progress_bars:
                if name == "huggingface_hub":
                    module.disable_progress_bars()
                else:
                    module.logging.disable_progress_bar()
        except (ImportError, AttributeError):
            pass


@contextlib.contextmanager
def _hub_logging_restored():
    """Give diffusers/transformers/huggingface_hub back the verbosity and progress bars they had (their defaults
    when the command imported them): a program that calls :func:`main` in-process kept their logging at ERROR
    (and, after ``--quiet``, no bars) for good."""
    saved = {}
    for name in ("diffusers", "transformers", "huggingface_hub"):
        module = sys.modules.get(f"{name}.utils")
        if module is not None:
            saved[name] = _hub_logging_state(name, module)
    try:
        yield
    finally:
        for name in ("diffusers", "transformers", "huggingface_hub"):
            module = sys.modules.get(f"{name}.utils")
            if module is None:
                continue
            try:
                verbosity, bars_off = saved[name] if name in saved else _hub_logging_default(name, module)
                module.logging.set_verbosity(verbosity)  # the hub's too: it stayed at the command's level
                if name == "huggingface_hub":
                    if bars_off != module.are_progress_bars_disabled():
                        (module.disable_progress_bars if bars_off else module.enable_progress_bars)()
                    continue
                if bars_off == module.logging.is_progress_bar_enabled():
                    (module.logging.disable_progress_bar if bars_off else module.logging.enable_progress_bar)()
            except AttributeError:  # another release's API: left as the command set it
                pass


def _hub_logging_state(name: str, module) -> tuple[int, bool]:
    """(verbosity, progress bars off) of one of the hub libraries now."""
    if name == "huggingface_hub":
        return module.logging.get_verbosity(), module.are_progress_bars_disabled()
    return module.logging.get_verbosity(), not module.logging.is_progress_bar_enabled()


def _hub_logging_default(name: str, module) -> tuple[int, bool]:
    """What a fresh import of the library starts with (its own environment variables read as it reads them)."""
    hub_bars_off = os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS", "").strip().upper() in ("1", "ON", "YES", "TRUE")
    default = getattr(module.logging, "_get_default_logging_level", lambda: module.logging.WARNING)
    return default(), hub_bars_off if name != "diffusers" else False  # transformers follows the hub's switch


def _loads_models(args) -> bool:
    """The command loads a backbone or a corrector (and so imports diffusers anyway)."""
    return args.command in ("generate", "train", "demo") or any(
        getattr(args, name, None) for name in ("backbone", "corrector", "correct"))


def _check_dtype(args) -> None:
    """``--dtype``: float16 needs a GPU (the CPU runs float32 or bfloat16); checked before anything loads."""
    dtype = getattr(args, "dtype", None)
    if dtype == "float16" and (args.device is None or args.device.split(":")[0] == "cpu"):
        raise UsageError("--dtype: float16 runs on a GPU (--device cuda); on the CPU use float32 (the default) or "
                         "bfloat16")


def _dtype_setting(args) -> dict:
    """``--dtype`` in an output folder's settings (only when given, so earlier runs' settings still match)."""
    return {"dtype": args.dtype} if getattr(args, "dtype", None) else {}


# Settings recorded only when their flag is given: the default given explicitly is the same run as none given.
_SETTING_DEFAULTS = {"dtype": "float32"}


def _with_defaults(settings: dict) -> dict:
    """``settings`` with the defaults of :data:`_SETTING_DEFAULTS` filled in (compared and named as themselves)."""
    return {**_SETTING_DEFAULTS, **settings}


def _load_backbone(args):
    import torch

    from xlard.backbones import DiffusersBackbone

    _check_device(args.device)
    target = _check_backbone(args.backbone)
    # Weights may ship in float16 (the shapes backbone does, to stay small): float32 unless --dtype says otherwise.
    kwargs = {"capture": False, "torch_dtype": getattr(torch, args.dtype or "float32")}
    steps, guidance = args.steps, args.guidance
    if args.backbone == "shapes":  # the sampler settings the shipped model was evaluated with
        from xlard.shapes import backbone as shapes_backbone

        steps, guidance = shapes_backbone.sampler_defaults(steps, guidance)
    if steps:
        kwargs["num_inference_steps"] = steps
    if guidance is not None:
        kwargs["guidance_scale"] = guidance
    _quiet_hub_logging()
    try:
        with warnings.catch_warnings():  # diffusers' deprecation notices are not the user's business
            warnings.filterwarnings("ignore", category=FutureWarning, module="diffusers")
            return DiffusersBackbone.from_pretrained(target, device=args.device, **kwargs)
    except (OSError, ValueError) as exc:  # diffusers/huggingface_hub report a missing model as either
        text = _one_line(exc)
        if text.startswith("guidance_scale:"):  # the --guidance given (it was blamed on --backbone)
            raise UsageError(f"--guidance: {text.split(':', 1)[1].strip()}") from None
        if Path(target).is_dir():
            raise UsageError(f"--backbone: {args.backbone} could not be loaded: {text}") from None
        from xlard.backbones.diffusers_backbone import hub_load_failure

        raise UsageError(f"--backbone: {hub_load_failure(args.backbone, exc)}") from None


# ---------------------------------------------------------------------------------------------
# Output folders: refuse, overwrite or resume


def _records_digest(records: Sequence[dict]) -> str:
    return hashlib.sha256(json.dumps(list(records), sort_keys=True).encode("utf-8")).hexdigest()


def _owned(out: Path, pattern: re.Pattern, folders: bool) -> list[Path]:
    """This command's outputs in ``out``; an entry of an output's name but the wrong kind is refused now (it was
    skipped, and the run failed on it after --overwrite had deleted the rest, or after minutes of work)."""
    try:
        if not out.is_dir():
            return []
    except OSError as exc:  # a name too long, a loop of links: is_dir() raises instead of saying no
        raise UsageError(f"cannot use {out}: {exc.strerror or exc}") from None
    named = sorted(p for p in out.iterdir() if pattern.match(p.name))
    for p in named:
        if not (p.is_dir() if folders else p.is_file()):
            kind = "a folder" if folders else "a file"
            raise UsageError(f"{p} has the name of one of this command's outputs but is not {kind}"
                             f"{' (a dangling link)' if p.is_symlink() and not p.exists() else ''}; move or remove "
                             "it (nothing was changed)")
    return named


def _remove_outputs(owned: Sequence[Path], flag: str) -> None:
    """--overwrite: delete an earlier run's outputs, each named if it cannot be (checked for all before any goes)."""
    for path in owned:
        holder = path if path.is_dir() else path.parent
        if not os.access(holder, os.W_OK | os.X_OK) or not os.access(path.parent, os.W_OK | os.X_OK):
            raise UsageError(f"--overwrite: cannot remove {path} (no write permission on "
                             f"{holder if not os.access(holder, os.W_OK | os.X_OK) else path.parent}); nothing "
                             f"was removed: fix the permissions or choose another {flag}")
    for path in owned:
        try:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        except OSError as exc:
            raise UsageError(f"--overwrite: cannot remove {path}: {exc.strerror or exc}; fix it and rerun with "
                             "--overwrite") from None


# The output folders this command holds (xlard._io.folder_lock), released when main() returns.
_HELD = contextlib.ExitStack()


def _hold(out: Path, flag: str) -> None:
    """Lock ``out`` (creating it) until the command ends: a second run into it fails at once, naming it."""
    _HELD.enter_context(_io.folder_lock(out, flag))


def _check_output_folder(args, out: Path, flag: str, settings: dict, owned: list[Path]) -> bool:
    """Decide, before any work, whether an output folder may be used; changes nothing.

    A folder holding outputs of an earlier run (``owned``) is refused unless
    ``--overwrite`` or ``--resume``; resuming needs the earlier run's manifest
    with the same command and ``settings``.

    Returns:
        True when resuming an earlier run (its complete outputs are reused).
    """
    if out.exists() and not out.is_dir():
        raise UsageError(f"{flag}: {out} exists and is not a folder; give a folder path")
    _output_folder(out, flag)
    if out.is_dir():  # before reading its state: another run may be writing there
        _hold(out, flag)
    _refuse_other_run(out, flag, ("render", "eval") if args.command in ("render", "eval") else args.command)
    if not owned:
        return False
    if not (args.overwrite or args.resume):
        raise UsageError(f"{flag}: {out} already holds results of an earlier run ({len(owned)} outputs); add "
                         "--overwrite to replace them, --resume to continue that run, or choose another folder")
    if args.overwrite:
        return False
    manifest = out / MANIFEST_NAME
    try:
        earlier = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise UsageError(f"--resume: {out} holds results but no readable {MANIFEST_NAME}, so the run that made "
                         "them is unknown; use --overwrite or another folder") from None
    before = earlier.get("settings", {}) if isinstance(earlier, dict) else {}
    before = _with_defaults(before if isinstance(before, dict) else {})
    settings = _with_defaults(settings)
    if not isinstance(earlier, dict) or earlier.get("command") != args.command or before != settings:
        diff = [_io.changed_setting(k, before.get(k), settings.get(k))
                for k in sorted(set(before) | set(settings)) if before.get(k) != settings.get(k)]
        command = _io.run_label(earlier.get("command") if isinstance(earlier, dict) else None)
        raise UsageError(f"--resume: {out} was written by `xlard {command}` with other settings "
                         f"(differ: {'; '.join(diff) or 'command'}); rerun with the same settings, or use "
                         "--overwrite or another folder")
    return True


def _start_output_folder(args, out: Path, flag: str, settings: dict, owned: list[Path]) -> None:
    """After every check passed: clear for ``--overwrite``, drop dead temporaries, write the manifest.

    ``--overwrite`` deletes only ``owned`` (this command's outputs) and the
    manifest; nothing else in the folder is touched.
    """
    _hold(out, flag)
    if owned and args.overwrite:
        # Marked first, so that an interruption mid-delete leaves a folder that neither
        # `eval --folder` (unfinished) nor `--resume` (other settings) takes for a run.
        _io.atomic_write_json(out / MANIFEST_NAME, {"command": args.command, "settings": {"overwriting": True},
                                                    "complete": False}, owner=flag)
        _remove_outputs(owned, flag)
        print(f"overwrite: removed {len(owned)} outputs of the earlier run from {out}", file=sys.stderr)
    _io.remove_temporaries(out)  # leftovers of a run killed mid-write (SIGKILL): never complete
    _io.make_folder(out, flag)
    _io.atomic_write_json(out / MANIFEST_NAME, {"command": args.command, "settings": settings, "complete": False},
                          owner=flag)


def _refuse_other_run(out: Path, flag: str, mine: str | tuple[str, ...]) -> None:
    other = _io.other_run(out, mine)
    if other is not None:
        raise UsageError(f"{flag}: {out} holds the outputs of `xlard {other}`; writing this command's outputs there "
                         "would mix the two runs (neither could be resumed or read): choose another folder")


def _clear_paired_eval_outputs(args, out: Path, flag: str, owned: list[Path]) -> None:
    """The --overwrite rule of the paired eval, which keeps its own files (the caller holds the folder; --resume
    continues its pairs.jsonl and does not come here)."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"{flag}: {out} exists and is not a folder; give a folder path")
    if not owned:
        return
    if not args.overwrite:
        raise UsageError(f"{flag}: {out} holds an earlier run ({owned[0].name}, ...); pass --overwrite to replace it"
                         " or --resume to continue it")
    _remove_outputs(owned, flag)


def _finish_output_folder(out: Path, flag: str) -> None:
    manifest = out / MANIFEST_NAME
    data = json.loads(manifest.read_text(encoding="utf-8"))
    data["complete"] = True
    _io.atomic_write_json(manifest, data, owner=flag)


# ---------------------------------------------------------------------------------------------
# Images


def _progress(iterable, total: int, desc: str, quiet: bool, unit: str = "img"):
    if quiet:
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is optional: progress then goes to stderr as counts
        def plain():
            for i, item in enumerate(iterable, 1):
                if i == total or i % max(1, total // 10) == 0:
                    print(f"{desc}: {i}/{total} {unit}", file=sys.stderr)
                yield item

        return plain()
    return tqdm(iterable, total=total, desc=desc, unit=unit)


def _to_uint8(images):
    """[B, 3, H, W] float in [0, 1] -> list of uint8 HxWx3 arrays."""
    import torch

    return [(img.clamp(0, 1) * 255).round().to("cpu", dtype=torch.uint8).permute(1, 2, 0).numpy() for img in images]


def _write_png(path: Path, image) -> None:
    """Write a uint8 HxWx3 array as a PNG, atomically (Pillow, through xlard.explain and xlard._io)."""
    import torch

    from xlard.explain import save_png

    save_png(path, torch.from_numpy(image).permute(2, 0, 1))


def _generate_batches(backbone, prompts: list[str], seeds: list[int], batch: int, quiet: bool):
    """Yield (start, uint8 images) for consecutive batches, with progress."""
    starts = list(range(0, len(prompts), batch))
    for start in _progress(starts, len(starts), "generate", quiet, unit="batch"):
        out = backbone.generate(prompts[start:start + batch], seed=seeds[start:start + batch])
        yield start, _to_uint8(out.images)


def _write_geneval_folder(out: Path, index: int, record: dict, images) -> None:
    """One prompt folder of GenEval's layout, <out>/<index>/metadata.jsonl + samples/*.png, in one rename.

    A reader (and ``--resume``) finds the whole folder or none of it.
    """
    from xlard.shapes import prompts as P

    # replace: only an incomplete folder --resume remakes is there (--overwrite cleared the rest, a plain run refused)
    with _io.atomic_folder(out / f"{index:05d}", owner="xlard", existing="replace") as tmp:
        (tmp / "samples").mkdir()
        P.write_jsonl(tmp / "metadata.jsonl", [record])
        for k, image in enumerate(images):
            _write_png(tmp / "samples" / f"{k:04d}.png", image)


# ---------------------------------------------------------------------------------------------
# Commands


def _note_unknown_words(prompts: Sequence[str]) -> None:
    """The shapes backbone knows its world's words only: say which words of a prompt it never saw."""
    from xlard.shapes import backbone as shapes_backbone

    for i, prompt in enumerate(prompts):
        words = shapes_backbone.unknown_words(prompt)
        if words:
            print(f"note: prompt {i + 1}: the shapes backbone never saw {', '.join(map(repr, words[:8]))}"
                  f"{' ...' if len(words) > 8 else ''}; it knows the shapes world's words only (circle, square, "
                  "triangle, diamond, ten colors, counts one to ten in words, left of/right of/above/below)",
                  file=sys.stderr)


def _cmd_generate(args) -> int:
    for i, prompt in enumerate(args.prompt):
        if not prompt.strip():
            raise UsageError(f"PROMPT: prompt {i + 1} of {len(args.prompt)} is empty; give each image's text")
        try:  # a byte that is not UTF-8 (the shell passes bytes): refused before anything loads
            prompt.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise UsageError(f"PROMPT: prompt {i + 1} of {len(args.prompt)} is not UTF-8 text (byte "
                             f"0x{ord(prompt[exc.start]) & 0xFF:02x} at character {exc.start + 1}: {prompt!r})")
    if args.backbone == "shapes":
        _note_unknown_words(args.prompt)
    _check_dtype(args)  # every form, before anything loads
    # both forms (--correct skipped these: seed 2147483647 with two prompts wrote 0001_seed2147483648.png)
    images = len(args.prompt) * args.per_prompt
    _check_image_count(images, "these prompts and --per-prompt")
    if images and args.seed + images - 1 > MAX_SEED:
        raise UsageError(f"--seed: image seeds run up to {args.seed + images - 1}, above {MAX_SEED}; use a smaller "
                         f"--seed")
    if args.corrector or args.correct:
        _output_folder(args.out, "--out")  # the plain form checks it in _check_output_folder
        from xlard import evaluation

        out = Path(args.out)
        owned = _owned(out, _GENERATE_NAME, folders=False)
        settings: dict = {}

        def decide(run_settings: dict) -> bool:  # once the corrector is known: refuse, overwrite or resume
            settings.update(prompts=list(args.prompt), per_prompt=args.per_prompt, seed=args.seed,
                            backbone=args.backbone, steps=args.steps, guidance=args.guidance, **_dtype_setting(args),
                            **run_settings)
            return _check_output_folder(args, out, "--out", settings, owned)

        return evaluation.run_generate_cli(args, decide=decide,
                                           start=lambda: _start_output_folder(args, out, "--out", settings, owned),
                                           finish=lambda: _finish_output_folder(out, "--out"))

    prompts = [p for p in args.prompt for _ in range(args.per_prompt)]
    seeds = [args.seed + i for i in range(len(prompts))]
    out = Path(args.out)
    names = [f"{i:04d}_seed{seeds[i]}.png" for i in range(len(prompts))]
    settings = {"prompts": list(args.prompt), "per_prompt": args.per_prompt, "seed": args.seed,
                "backbone": args.backbone, "steps": args.steps, "guidance": args.guidance, **_dtype_setting(args)}
    _check_device(args.device)
    _check_backbone(args.backbone)
    # Everything either form of generate writes: --overwrite on a --correct folder left its _base/_lam images and
    # corrections.jsonl beside the new images, describing the old run's prompts under the new one's manifest.
    owned = _owned(out, _GENERATE_NAME, folders=False)
    resuming = _check_output_folder(args, out, "--out", settings, owned)
    todo = [i for i in range(len(prompts)) if not (resuming and (out / names[i]).is_file())]
    backbone = _load_backbone(args) if todo else None  # before anything is deleted: it may fail
    if backbone is not None:  # a prompt the backbone cannot use fails now, not after the images before it
        backbone.check_prompts(args.prompt, lambda i: f"PROMPT: prompt {i + 1} of {len(args.prompt)}")
    _start_output_folder(args, out, "--out", settings, owned)
    if resuming:
        print(f"resuming: reusing {len(prompts) - len(todo)} of {len(prompts)} images in {out}", file=sys.stderr)
    if todo:
        batches = _generate_batches(backbone, [prompts[i] for i in todo], [seeds[i] for i in todo], args.batch,
                                    args.quiet)
        for start, images in batches:
            for k, image in enumerate(images):
                _write_png(out / names[todo[start + k]], image)
    _finish_output_folder(out, "--out")
    print(f"wrote {len(todo)} images to {out}" + (f" ({len(prompts) - len(todo)} reused)" if resuming else ""))
    return 0


def _cmd_info(args) -> int:
    from xlard import info

    return info.main(["--json"] if args.json else [])


def _cmd_prompts(args) -> int:
    from xlard.shapes import prompts as P

    to_stdout = args.out == "-"  # `xlard prompts - -n 10 | ...`: the records on stdout, the summary on stderr
    if not to_stdout:
        _output_file(args.out, "OUT")
    # The split is always the one everything trains on (P.SPLIT_SEED); --seed picks the sample only. (It once
    # picked the split too: `--split heldout --seed 1` gave 243 prompts, 193 of them training prompts.)
    splits = P.make_splits(P.PromptConfig(), seed=P.SPLIT_SEED)
    pool = splits[args.split]
    records = P.sample_records(pool, args.n, seed=args.seed) if args.n else list(pool)
    if to_stdout:
        sys.stdout.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        sys.stdout.flush()
    else:
        _keep_other_prompts(args, records)
        P.write_jsonl(args.out, records)
    distinct = len({r["prompt"] for r in records})
    # More records than the split has prompts: they repeat (each record still gets its own image seeds).
    repeats = (f" ({distinct} distinct prompts: the {args.split} split holds {len(pool)})"
               if distinct < len(records) else "")
    print(f"wrote {len(records)} {args.split} records to {'stdout' if to_stdout else args.out}{repeats}",
          file=sys.stderr if to_stdout else sys.stdout)
    return 0


def _keep_other_prompts(args, records: list[dict]) -> None:
    """``xlard prompts OUT`` replaces an existing ``OUT`` only with ``--overwrite``, or when it already holds these
    very records (a rerun): a hand-edited prompt set was replaced without a word."""
    path = Path(args.out)
    if args.overwrite or not path.is_file():
        return
    try:
        text = path.read_text(encoding="utf-8-sig")  # a BOM, as read_jsonl accepts one
        same = not text.strip() or [json.loads(line) for line in text.splitlines() if line.strip()] == records
    except (OSError, ValueError):  # unreadable, not UTF-8 or not JSON lines: not these records
        same = False  # (an empty file, e.g. made by mktemp, holds nothing to lose)
    if not same:
        raise UsageError(f"OUT: {args.out} exists and holds other records; pass --overwrite to replace it, or "
                         f"give another file")


def _check_renderable(records: Sequence[dict], flag: str, path: str, lines: Sequence[int]) -> None:
    """Every record's objects fit one shapes-world image (else rendering could not end); a record named by its
    line, as every other error of the file."""
    from xlard.shapes.world import WorldConfig

    capacity = WorldConfig().capacity()
    for i, r in enumerate(records):
        n = sum(item["count"] for item in r["include"])
        if n > capacity:
            raise UsageError(f"{flag}: {path}:{lines[i]}: the record asks for {n} objects; a shapes-world image "
                             f"holds at most {capacity} (fix the record's counts)")


def _cmd_render(args) -> int:
    from xlard import _optional
    from xlard.shapes import prompts as P

    _optional.require("PIL.Image", "xlard render")  # before the folder is made (it wrote xlard-run.json first)
    records, lines = _read_records_with_lines(args.prompts)
    _check_renderable(records, "--prompts", args.prompts, lines)
    _check_image_count(len(records) * args.per_prompt, "--prompts and --per-prompt")
    out = Path(args.out)
    settings = {"records": _records_digest(records), "count": len(records), "per_prompt": args.per_prompt,
                "seed": args.seed}
    owned = _owned(out, _UNIT_NAME, folders=True)
    resuming = _check_output_folder(args, out, "OUT", settings, owned)
    todo = _units_to_make(out, len(records), args.per_prompt, resuming)
    scenes = {}  # every scene laid out before anything is written: a record no layout fits fails up front
    for i in todo:
        try:
            scenes[i] = [P.render_record(records[i], seed=args.seed + 1000 * i + k) for k in range(args.per_prompt)]
        except RuntimeError as exc:  # no layout found: too many objects for the record's relation
            raise UsageError(f"--prompts: {args.prompts}:{lines[i]}: {_one_line(exc)}") from None
    _start_output_folder(args, out, "OUT", settings, owned)
    if resuming:
        print(f"resuming: reusing {len(records) - len(todo)} of {len(records)} prompt folders in {out}",
              file=sys.stderr)
    for i in _progress(todo, len(todo), "render", args.quiet, unit="prompt"):
        _write_geneval_folder(out, i, records[i], [scene.render() for scene in scenes[i]])
    _finish_output_folder(out, "OUT")
    print(f"wrote {len(todo)} prompt folders to {out}" + (f" ({len(records) - len(todo)} reused)" if resuming else ""))
    return 0


def _check_finished_folder(folder: Path) -> dict | None:
    """``eval --folder``: refuse a folder whose run stopped half-way (its score would cover a subset); returns the
    run's manifest (None for a GenEval folder from elsewhere)."""
    manifest = folder / MANIFEST_NAME
    if not manifest.is_file():
        return None  # a GenEval folder from elsewhere
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise UsageError(f"--folder: {manifest} is unreadable; remove it if {folder} is complete") from None
    if isinstance(data, dict) and data.get("complete") is False:
        raise UsageError(f"--folder: {folder} holds an unfinished `xlard {_io.run_label(data.get('command'))}` run; "
                         "finish it by rerunning that command with --resume")
    settings = data.get("settings") if isinstance(data, dict) else None
    count = settings.get("count") if isinstance(settings, dict) else None
    if isinstance(count, int) and not isinstance(count, bool):  # a prompt folder removed after the run
        from xlard.shapes import evaluator as E

        try:
            have = sum(1 for p in E.prompt_folders(folder) if int(p.name) < count)
        except (OSError, ValueError):
            return data  # named by the scoring itself
        if have != count:
            raise UsageError(f"--folder: {folder} holds {have} of the {count} prompt folders its `xlard "
                             f"{_io.run_label(data.get('command'))}` run wrote; rerun that command with --resume to "
                             "make the others")
    return data if isinstance(data, dict) else None


_EVAL_DEFAULTS = {"steps": 0, "batch": 8, "seed": 0}


def _generation_options(args) -> list[str]:
    """The options of ``eval`` that only a form generating images uses, as given on the command line."""
    return [flag for flag, given in (
        ("--out", args.out is not None), ("--steps", args.steps is not None), ("--guidance", args.guidance is not None),
        ("--batch", args.batch is not None), ("--device", args.device is not None),
        ("--dtype", args.dtype is not None), ("--seed", args.seed is not None), ("--overwrite", args.overwrite),
        ("--resume", args.resume)) if given]


def _cmd_eval(args) -> int:
    from xlard.shapes import evaluator as E

    generation = _generation_options(args)
    for name, value in _EVAL_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    _check_dtype(args)  # every form that loads a backbone, before it loads
    if args.corrector or args.correct:
        if args.results:
            raise UsageError("--results: with --corrector/--correct the per-pair verdicts (base and corrected) go to "
                             "OUT/pairs.jsonl; drop --results")
        if args.seeds is not None and "--seed" in generation:  # --seed was ignored without a word
            raise UsageError("--seed: give the evaluation seeds once, either --seeds 0,1 or --seed S (one seed)")
        out = Path(args.out or _io.PAIRED_EVAL_OUT)
        _output_folder(out, "--out")
        for value, flag in ((args.json, "--json"), (args.markdown, "--markdown")):
            _output_file(value, flag)
        _distinct_outputs({"--json": args.json, "--markdown": args.markdown}, {"--prompts": args.prompts})
        _outside_run_outputs({"--json": args.json, "--markdown": args.markdown}, out, "--out", _PAIRED_EVAL_NAMES)
        from xlard import evaluation

        # Everything the paired run reads from the command line is checked before the corrector and the
        # backbone load (run_eval_cli checks it again for callers that skip the CLI).
        if not args.prompts:
            raise UsageError("--prompts: eval with a corrector needs --prompts FILE (GenEval JSONL records)")
        if args.folder or args.images:
            raise UsageError("--corrector/--correct generates its own images; drop --folder/--images")
        records = _read_records(args.prompts)
        seeds = evaluation.parse_seeds(args.seeds, default=args.seed)
        evaluation.check_pair_count(len(records), len(seeds), MAX_IMAGES)  # before --overwrite clears a run

        owned = [out / name for name in _PAIRED_EVAL_NAMES if (out / name).exists()] if out.is_dir() else []
        if out.is_dir():  # before anything loads: another run may be writing there (--resume too)
            _hold(out, "--out")
        _refuse_other_run(out, "--out", "eval (with a corrector)")
        pairs = out / "pairs.jsonl"
        if owned and {p.name for p in owned} <= {"run.json", "pairs.jsonl"} and \
                (not pairs.is_file() or pairs.stat().st_size == 0):
            # a run that failed before judging any pair: nothing to keep or resume, so no reason to refuse
            for path in owned:
                path.unlink()
            owned = []
        if not args.resume:  # --resume: the paired run continues its pairs.jsonl (refused if its settings differ)
            _clear_paired_eval_outputs(args, out, "--out", owned)
        return evaluation.run_eval_cli(args)

    # The paired run's options, given without a corrector, were ignored without a word (--seeds 3,4 scored seed 0).
    paired_only = [flag for flag, given in (("--seeds", args.seeds is not None), ("--save-images", args.save_images),
                                            ("--markdown", args.markdown is not None),
                                            ("--mask-fraction", args.mask_fraction is not None),
                                            ("--no-faithfulness", args.no_faithfulness),
                                            ("--bootstrap", args.bootstrap is not None)) if given]
    if paired_only:
        raise UsageError(f"{paired_only[0]}: only with --corrector DIR or --correct (the paired base vs corrected "
                         f"run); without one, eval scores images once (--seed sets the first image's seed)")
    for value, flag in ((args.results, "--results"), (args.json, "--json")):
        _output_file(value, flag)
    _distinct_outputs({"--results": args.results, "--json": args.json}, {"--prompts": args.prompts})
    if not args.backbone and generation:  # --folder, --prompts with --images: they score images that exist
        raise UsageError(f"{generation[0]}: only when eval generates images (--backbone, --corrector or --correct); "
                         f"{'--folder' if args.folder else '--prompts with --images'} scores the images it is given")
    if args.folder:
        if args.backbone or args.prompts or args.images:
            raise UsageError("--folder: give --folder alone, or --prompts with --images or --backbone")
        folder = _input_folder(args.folder, "--folder")
        _inside_inputs({"--results": args.results, "--json": args.json}, folder, "--folder")
        made = _check_finished_folder(folder)
        settings = made.get("settings") if isinstance(made, dict) else None
        backbone = settings.get("backbone") if isinstance(settings, dict) else None
        if isinstance(backbone, str) and backbone:  # images an xlard run made with another model: said, as there
            from xlard.evaluation import other_world_note

            note = other_world_note(backbone)
            if note:  # shown under --quiet too
                print(note, file=sys.stderr)
        try:
            units = E.prompt_folders(folder)
            indices = sorted(set(int(p.name) for p in units))
            missing, shown, previous = 0, [], -1
            for index in indices:  # the gaps, counted without building the range (a folder "20240601" took 2 GB)
                missing += index - previous - 1
                shown += list(range(previous + 1, min(index, previous + 1 + 8 - len(shown))))
                previous = index
            if missing:  # a note, shown under --quiet too: GenEval numbers its prompts from 0
                listed = ", ".join(map(str, shown)) + (" ..." if missing > len(shown) else "")
                print(f"note: --folder: {missing} prompt folder(s) missing between 0 and {indices[-1]} ({listed}): "
                      f"the score covers the {len(units)} present", file=sys.stderr)
            results = E.evaluate_folder(folder, progress=lambda it, n: _progress(it, n, "eval", args.quiet,
                                                                                  unit="prompt"))
        except (OSError, ValueError) as exc:  # OSError: an unreadable metadata.jsonl or image inside
            raise UsageError(f"--folder: {_one_line(exc)}") from None
    elif args.backbone:
        if not args.prompts:
            raise UsageError("--backbone: needs --prompts FILE (the records to generate for)")
        if args.images:
            raise UsageError("--images: with --backbone eval generates its own images into --out; drop --images "
                             "(or drop --backbone to score the folder's images)")
        records = _read_records(args.prompts)
        out = Path(args.out or "xlard-eval")
        _outside_run_outputs({"--results": args.results, "--json": args.json}, out, "--out", (MANIFEST_NAME,),
                             units=True)
        settings = {"records": _records_digest(records), "count": len(records), "seed": args.seed,
                    "backbone": args.backbone, "steps": args.steps, "guidance": args.guidance, **_dtype_setting(args)}
        if args.seed + len(records) - 1 > MAX_SEED:
            raise UsageError(f"--seed: image seeds run up to {args.seed + len(records) - 1}, above {MAX_SEED}")
        _check_device(args.device)
        _check_backbone(args.backbone)
        owned = _owned(out, _UNIT_NAME, folders=True)
        resuming = _check_output_folder(args, out, "--out", settings, owned)
        todo = _units_to_make(out, len(records), 1, resuming)
        backbone = _load_backbone(args) if todo else None  # before anything is deleted: it may fail
        if backbone is not None:
            backbone.check_prompts([records[i]["prompt"] for i in todo],
                                   lambda k: f"--prompts: {args.prompts} record {todo[k]}")
        from xlard.evaluation import other_world_note

        note = other_world_note(backbone if backbone is not None else args.backbone)
        if note:  # a note, as the unknown-word ones: shown under --quiet too
            print(note, file=sys.stderr)
        _start_output_folder(args, out, "--out", settings, owned)
        if resuming:
            print(f"resuming: reusing {len(records) - len(todo)} of {len(records)} prompt folders in {out}",
                  file=sys.stderr)
        if todo:
            prompts = [records[i]["prompt"] for i in todo]
            seeds = [args.seed + i for i in todo]
            for start, images in _generate_batches(backbone, prompts, seeds, args.batch, args.quiet):
                for k, image in enumerate(images):
                    i = todo[start + k]
                    _write_geneval_folder(out, i, records[i], [image])
        _finish_output_folder(out, "--out")
        # Only this run's prompt folders are scored, whatever else the folder holds.
        results = []
        for i, record in enumerate(records):
            if not _complete_unit(out / f"{i:05d}", 1):  # changed under the run: refused, not dropped from the score
                raise UsageError(f"--out: {out / f'{i:05d}'} lacks its metadata.jsonl or samples/*.png (removed "
                                 "while the run went on?); rerun with --resume to make it again")
            pngs = E.png_files(out / f"{i:05d}" / "samples")
            results.extend(E.evaluate([str(p) for p in pngs], record))
        print(f"images and per-prompt metadata in {out}")
    else:
        if not (args.prompts and args.images):
            raise UsageError("give --folder DIR, or both --prompts FILE and --images DIR, or --prompts with --backbone, "
                             "or --prompts with --corrector DIR or --correct (base vs corrected)")
        records = _read_records(args.prompts)
        _inside_inputs({"--results": args.results, "--json": args.json}, args.images, "--images")
        images = E.png_files(_input_folder(args.images, "--images"))
        if len(images) != len(records):
            raise UsageError(f"--images: {args.images} holds {len(images)} PNG files for {len(records)} records "
                             "(one image per record, in the order of the numbers in their names)")
        by_number = sorted(images, key=_number_order)  # 2.png before 10.png: by text, record 2 was judged on 10.png
        if by_number != images:  # a note, shown under --quiet too
            at = next(i for i, (a, b) in enumerate(zip(by_number, images)) if a != b)
            print(f"note: --images: files taken in the order of the numbers in their names: record {at} is "
                  f"{by_number[at].name} (by text it would be {images[at].name})", file=sys.stderr)
        images = by_number
        results = []
        for path, record in _progress(list(zip(images, records)), len(records), "eval", args.quiet):
            results.append(E.evaluate_record(str(path), record))
    if not results:
        raise UsageError("nothing to score: no samples (<index>/samples/*.png) were found")
    summary = E.summarize(results, print_table=True)
    if args.results:
        E.write_results_jsonl(args.results, results)
    if args.json:
        _io.atomic_write_json(args.json, summary, owner="--json")
    return 0


def _number_order(path: Path) -> tuple:
    """Sort key of a file name with its digit runs read as numbers: ``2.png`` before ``10.png``, ``img_9`` before
    ``img_10``; zero-padded names keep their order."""
    parts = re.split(r"(\d+)", path.name)
    return tuple((0, int(p), "") if p.isdecimal() else (1, 0, p) for p in parts if p) + (path.name,)


def _output_folder_options(p) -> None:
    """--overwrite / --resume for a command that writes an output folder."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("--overwrite", action="store_true",
                   help="the output folder holds an earlier run: delete what that run wrote, then start afresh")
    g.add_argument("--resume", action="store_true",
                   help="the output folder holds an earlier run with the same settings: keep its complete "
                        "outputs and make the rest")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="xlard", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    from xlard import __version__

    parser.add_argument("--version", action="version", version=f"xlard {__version__}",
                        help="print xlard's version and exit (`xlard info` tells the build and providers)")
    sub = parser.add_subparsers(dest="command", required=True)
    seed_type = _int_in(0, MAX_SEED)

    p = sub.add_parser("info", help="versions, build and providers")
    p.add_argument("--json", action="store_true", help="print the facts as JSON")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("prompts", help="write a shapes-world prompt set (GenEval JSONL)")
    p.add_argument("out", help="the JSONL file to write (- for standard output)")
    p.add_argument("--split", choices=("train", "heldout"), default="heldout",
                   help="which split's prompts (default heldout; train for training-split work)")
    p.add_argument("-n", type=_int_in(0, MAX_RECORDS, " (0: the whole split)"), default=0,
                   help=f"sample this many records balanced over tags (0: all; at most {MAX_RECORDS})")
    p.add_argument("--seed", type=seed_type, default=0,
                   help="which records -n samples (the split itself is fixed: the one xlard trains on)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing OUT that holds other records (a rerun with the same records needs none)")
    p.set_defaults(func=_cmd_prompts)

    p = sub.add_parser("render", help="ground-truth renders of a prompt set, in GenEval's folder layout")
    p.add_argument("out", help="the output folder (GenEval layout: <index>/metadata.jsonl + samples/*.png)")
    p.add_argument("--prompts", required=True, help="GenEval JSONL records of the shapes world")
    p.add_argument("--per-prompt", type=_int_in(1, MAX_PER_PROMPT), default=1, help="renders per record")
    p.add_argument("--seed", type=seed_type, default=0,
                   help="the render seed (render k of record i: seed + 1000 i + k)")
    p.add_argument("--quiet", action="store_true", help="no progress bars (results and errors are still printed)")
    _output_folder_options(p)
    p.set_defaults(func=_cmd_render)

    def backbone_options(p, required: bool, seed_help: str = "image i uses seed + i"):
        p.add_argument("--backbone", required=required,
                       help="'shapes', a diffusers pipeline folder, or a hub model id")
        p.add_argument("--steps", type=_int_in(0, MAX_STEPS), default=0,
                       help="denoising steps (0: the pipeline's default)")
        p.add_argument("--guidance", type=_guidance, default=None,
                       help="classifier-free guidance scale, in [0, 1000] (default: the backbone's)")
        p.add_argument("--batch", type=_int_in(1, MAX_BATCH), default=8, help="prompts per forward pass")
        p.add_argument("--device", default=None, help="e.g. cuda; default: CPU")
        p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                       help="the backbone's weights and latents (default float32; bfloat16 or float16 on a GPU "
                            "halve its memory, which large models need)")
        p.add_argument("--seed", type=seed_type, default=0, help=seed_help)
        p.add_argument("--corrector", help="a corrector folder (see docs/evaluation.md): base vs corrected")
        p.add_argument("--correct", action="store_true", help="use the corrector shipped for --backbone")

    p = sub.add_parser("generate", help="generate images with a backbone (with a corrector: corrected, base, LAM)")
    p.add_argument("prompt", nargs="+", help="one or more prompts (quote each)")
    p.add_argument("--out", default="xlard-images", help="the output folder (default xlard-images)")
    p.add_argument("--per-prompt", type=_int_in(1, MAX_PER_PROMPT), default=1, help="images per prompt")
    p.add_argument("--quiet", action="store_true", help="no progress bars (results and errors are still printed)")
    backbone_options(p, required=True)
    _output_folder_options(p)
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("eval", help="score images with the exact shapes-world evaluator")
    p.add_argument("--folder", help="a GenEval output folder (<index>/metadata.jsonl + samples/*.png)")
    p.add_argument("--prompts", help="GenEval JSONL records (with --images)")
    p.add_argument("--images", help="a folder of PNGs, one per record, in the order of the numbers in their names "
                                    "(2.png before 10.png; with --prompts)")
    p.add_argument("--results", help="write per-image results (JSONL) here")
    p.add_argument("--json", help="write the summary table (JSON) here")
    p.add_argument("--out", help="with --backbone: where generated images go (GenEval layout; default xlard-eval); "
                                 f"with a corrector: the paired evaluation's folder (default {_io.PAIRED_EVAL_OUT})")
    p.add_argument("--quiet", action="store_true", help="no progress bars (results and errors are still printed)")
    backbone_options(p, required=False, seed_help="with --backbone: image i uses seed + i; with a corrector: the "
                                                   "evaluation seed (record i: generator seed seed*1000000+i), as "
                                                   "--seeds with one seed")
    _output_folder_options(p)
    p.add_argument("--seeds", help="with a corrector: evaluation seeds, e.g. 0,1 (record i, seed s: generator "
                                   "seed s*1000000+i); default --seed")
    p.add_argument("--mask-fraction", type=_open_fraction, default=None,
                   help="with a corrector: LAM faithfulness, share of cells masked (0..1, exclusive; default 0.2)")
    p.add_argument("--no-faithfulness", action="store_true", help="with a corrector: skip the LAM faithfulness check")
    p.add_argument("--bootstrap", type=_int_in(MIN_BOOTSTRAP, MAX_BOOTSTRAP), default=None,
                   help=f"with a corrector: bootstrap resamples for the 95%% intervals (default 2000; at least "
                        f"{MIN_BOOTSTRAP}, one replicate in each tail)")
    p.add_argument("--save-images", action="store_true", help="with a corrector: keep base/corrected images")
    p.add_argument("--markdown", help="with a corrector: also write the markdown table here")
    # None: not given (the forms that score existing images refuse them); _cmd_eval fills in 0 / 8 / 0
    p.set_defaults(func=_cmd_eval, steps=None, batch=None, seed=None)

    p = sub.add_parser("train", help="train a corrector (PPO; see docs/training.md); torchrun for several processes")
    p.add_argument("config", help="a YAML or JSON training config, e.g. configs/shapes.yaml")
    p.add_argument("--out", default=None, help="the run folder (overrides the config's out)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in the run folder")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set steps=50 --set ppo.epochs=2")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bars (as --set log.progress=false; the run's notes and result line stay)")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("demo", help="train a corrector on the shapes backbone, evaluate it paired on held-out "
                                    "prompts, write an HTML report (CPU, offline; docs/demo.md)")
    p.add_argument("--out", default="xlard-demo", help="the demo folder (train/, eval/, report.html, demo.json)")
    p.add_argument("--items-per-tag", type=_int_in(0, 100_000), default=None,
                   help="edit targets per GenEval tag for the warm start (default 200: fits the 15 minutes; "
                        "0: none, with --steps and the reader turned off by --set)")
    p.add_argument("--steps", type=_int_in(0, 100_000), default=0,
                   help="PPO steps after the warm start (default 0, as the shipped corrector)")
    p.add_argument("--per-tag", type=_int_in(1, MAX_RECORDS // 6), default=None,
                   help="held-out records per GenEval tag (six tags; default 83)")
    p.add_argument("--seeds", default=None, help="evaluation seeds (default 0,1)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="change a training-config field, e.g. --set ppo.group_size=4 (docs/training.md)")
    p.add_argument("--quiet", action="store_true", help="no progress bars (results and errors are still printed)")
    _output_folder_options(p)
    p.set_defaults(func=_cmd_demo)
    return parser


def _check_train_config(cfg) -> None:
    """What ``xlard train`` can check before the trainer loads the backbone: the prompt files and the
    backbone's name (the shapes backbone is checked by the trainer, which names its training command)."""
    for key in ("prompts", "monitor_prompts"):
        value = getattr(cfg.data, key)
        if value and not value.strip().lower().startswith("shapes:"):
            _input_file(value.strip(), f"train config data.{key}")
    if cfg.backbone.name != "shapes":
        _check_backbone(cfg.backbone.name, "train config backbone.name")
    from xlard.train.rewarding import check_reward_settings

    check_reward_settings(cfg.reward, cfg.backbone.name)  # the source and its options, before the backbone loads


def _cmd_train(args) -> int:
    from xlard import train

    _quiet_hub_logging()
    overrides = list(args.set) + (["log.progress=false"] if args.quiet else [])
    return train.main(args.config, resume=args.resume, out=args.out, overrides=overrides, check=_check_train_config)


def _cmd_demo(args) -> int:
    _output_folder(args.out, "--out")
    from xlard import demo
    from xlard.evaluation import parse_seeds

    # Unset options take the demo's own defaults (xlard.demo), so the two cannot drift apart.
    args.seeds = parse_seeds(demo.DEMO_SEEDS if args.seeds is None else args.seeds)
    if args.per_tag is None:
        args.per_tag = demo.DEMO_PER_TAG
    if args.items_per_tag is None:
        args.items_per_tag = demo.DEMO_ITEMS_PER_TAG
    return demo.main(args)


# Errors a user can fix (exit 2); any other OSError is the system's (a full disk: exit 1).
# ImportError: a missing optional dependency, whose message names the extra to install.
_USER_ERRORS = (UsageError,) + USER_ERRORS


#: Path arguments (dest -> how the command line spells it; OUT/CONFIG are positional).
_PATH_ARGUMENTS = {"out": "--out", "prompts": "--prompts", "folder": "--folder", "images": "--images",
                   "results": "--results", "json": "--json", "markdown": "--markdown", "corrector": "--corrector",
                   "config": "CONFIG", "backbone": "--backbone"}


def _refuse_empty_paths(args) -> None:
    """An empty path ("") was a traceback for some arguments, the current folder for others (render, generate)
    and "not given" for the rest; it is a usage error for all."""
    for dest, flag in _PATH_ARGUMENTS.items():
        value = getattr(args, dest, None)
        if isinstance(value, str) and not value.strip():
            if dest == "out" and args.command in ("prompts", "render"):
                flag = "OUT"
            raise UsageError(f"{flag}: the path is empty; give a file or folder name")


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code.

    Every error a user can fix prints one line on stderr and returns 2; Ctrl-C
    prints one line and returns 130, SIGTERM the same line and 143 (both leave
    only complete files). ``XLARD_TRACEBACK=1`` re-raises instead (for
    debugging xlard itself).
    """
    prog, args, parsed = "xlard", None, False
    try:
        with sigterm_interrupts(), _hub_logging_restored():
            parser = build_parser()
            try:
                args = parser.parse_args(argv)
            except SystemExit as exc:  # --help and --version print, then argparse exits: returned, as documented
                return exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 2
            prog = f"xlard {args.command}"
            _refuse_empty_paths(args)
            parsed = True
            # the extension modules every command but `prompts` loads, imported with the signals held (an
            # interrupt inside torch's import aborted the process; inside numpy's it read as a broken install)
            import_held(("numpy",) if args.command == "prompts" else ("numpy", "torch"))
            # a torchrun process other than the first draws no loading bars (process 0's are the run's)
            secondary = args.command == "train" and os.environ.get("RANK", "0").strip() not in ("", "0")
            if (getattr(args, "quiet", False) or secondary) and _loads_models(args):
                _quiet_hub_logging(progress_bars=False)
            with _HELD:
                return args.func(args)
    except KeyboardInterrupt as exc:
        if os.environ.get("XLARD_TRACEBACK") == "1":
            raise
        writes_folder = args is not None and (args.command in ("render", "demo") or getattr(args, "backbone", None)
                                              or getattr(args, "corrector", None) or getattr(args, "correct", False))
        if args is not None and args.command == "train":
            hint = " (rerun with --resume to continue from the last checkpoint)"
        else:
            hint = " (rerun with --resume to continue)" if writes_folder else ""
        line, code = interrupted_line(prog, exc, hint)
        print(line, file=sys.stderr)
        return code
    except (_USER_ERRORS + (OSError,)) as exc:
        if os.environ.get("XLARD_TRACEBACK") == "1":
            raise
        prog = getattr(exc, "prog", None) or prog
        if parsed or not _repeats_a_peers_line():
            print(f"{prog}: error: {_one_line(exc)}", file=sys.stderr)
        return 2 if isinstance(exc, _USER_ERRORS) else 1


def _repeats_a_peers_line() -> bool:
    """True in a torchrun process other than the first of its machine (TORCHELASTIC_RUN_ID set, LOCAL_RANK > 0): a
    mistake in the command line is the same in every process, so only the first of each machine prints it (one
    line, not one per process); errors met after parsing can differ between processes and are printed by each.
    LOCAL_RANK alone (SLURM, accelerate, a leftover export) silences nothing."""
    return "TORCHELASTIC_RUN_ID" in os.environ and os.environ.get("LOCAL_RANK", "0").strip() not in ("", "0")


if __name__ == "__main__":
    raise SystemExit(main())
