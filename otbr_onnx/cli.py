"""Command line: a thin layer over the Python API.

Exit codes: 0 ok, 1 internal error (a bug: please report), 2 bad usage or unreadable model,
3 unsupported model (refused), 4 parity failure, 5 verify found a difference, 6 scan suspects a
backdoor, 130 interrupted, 141 the reader of standard output went away (``| head``: as a
process killed by SIGPIPE). Every error is one line on
stderr; ``--debug`` adds the traceback.
"""

from __future__ import annotations

import json
import logging
import sys
import traceback
import warnings
from pathlib import Path

import click

from otbr_onnx.errors import (
    EXIT_SUSPECTED,
    OtbrError,
    UsageError,
    exit_interrupted,
    interrupts_deferred,
    one_line,
    printable,
    was_interrupted,
    watch_interrupts,
)
from otbr_onnx.executors import EXECUTORS
from otbr_onnx.files import regular_file_size
from otbr_onnx.load import Limits
from otbr_onnx import removers
from otbr_onnx.options import DEVICES, MAX_ACC_DROP, METHODS, ORT_PROVIDERS, RANKINGS, default

LOG = logging.getLogger("otbr_onnx")



class _Shape(click.ParamType):
    """A full input shape such as ``1,3,224,224`` (or ``1x3x224x224``), checked when parsed."""

    name = "SHAPE"

    def convert(self, value, param, ctx) -> tuple[int, ...]:
        if isinstance(value, tuple):
            return value
        try:
            values = tuple(int(v) for v in str(value).replace("x", ",").split(","))
        except ValueError:
            self.fail(f"expected comma-separated integers such as 1,3,32,32, got {value!r}", param, ctx)
        if any(v <= 0 for v in values):
            self.fail(f"dimensions must be positive, got {value!r}", param, ctx)
        return values


class _Range(click.ParamType):
    """An input value range ``LOW,HIGH`` with LOW < HIGH, checked when parsed."""

    name = "LOW,HIGH"

    def convert(self, value, param, ctx) -> tuple[float, float]:
        if isinstance(value, tuple):
            return value
        try:
            low, high = (float(v) for v in str(value).split(","))
        except ValueError:
            self.fail(f"expected LOW,HIGH such as 0,1 or -1,1, got {value!r}", param, ctx)
        if not low < high:
            self.fail(f"LOW must be below HIGH, got {value!r}", param, ctx)
        return low, high


class _Size(click.ParamType):
    """A memory size: bytes, or with a K/M/G/T suffix (binary: 2G is 2 GiB)."""

    name = "SIZE"

    def convert(self, value, param, ctx) -> int:
        if isinstance(value, int):
            return value
        from otbr_onnx.sizing import parse_size

        try:
            return parse_size(str(value))
        except ValueError:
            self.fail(f"expected a size such as 2G, 512M or 1500000000, got {value!r}", param, ctx)


class _Floats(click.ParamType):
    """One or more comma-separated numbers, e.g. ``0.485,0.456,0.406``."""

    name = "X[,X...]"

    def convert(self, value, param, ctx) -> tuple[float, ...]:
        if isinstance(value, tuple):
            return value
        try:
            return tuple(float(v) for v in str(value).split(","))
        except ValueError:
            self.fail(f"expected comma-separated numbers such as 0.5 or 0.485,0.456,0.406, got {value!r}", param, ctx)


class _DataPath(click.ParamType):
    """``--data``: a folder or a regular file (``os.stat`` only: a FIFO or device is refused unopened)."""

    name = "FOLDER|NPZ"

    def convert(self, value, param, ctx) -> Path:
        if isinstance(value, Path):
            return value
        from otbr_onnx.files import folder_or_file

        try:
            folder_or_file(Path(value), "--data")
        except UsageError as error:
            self.fail(str(error), param, ctx)
        return Path(value)


SHAPE, RANGE, SIZE, FLOATS = _Shape(), _Range(), _Size(), _Floats()


def _echo(text: str, err: bool = False) -> None:
    """click.echo for text that may hold names, paths or messages from untrusted files: every
    control or format character (terminal escape sequences among them) is printed as an escape."""
    click.echo(printable(text, keep="\n"), err=err)


class _RegularFile(click.Path):
    """An existing regular file: a FIFO would block the first read forever, a device stream forever."""

    def __init__(self) -> None:
        super().__init__(exists=True, dir_okay=False, path_type=Path)

    def convert(self, value, param, ctx) -> Path:
        path = super().convert(value, param, ctx)
        try:
            regular_file_size(path)  # os.stat only: nothing is opened
        except UsageError as error:
            self.fail(str(error), param, ctx)
        return path


def _options(*decorators):
    """One decorator applying ``decorators`` in the order written (the order --help lists them)."""
    def apply(command):
        for decorator in reversed(decorators):
            command = decorator(command)
        return command
    return apply


def _limit_options(command):
    """--max-file-bytes, --max-nodes, --max-noise-elements, --max-tensor-elements: the caps of
    ``load.Limits`` that keep a hostile file from exhausting the machine."""
    texts = {  # Limits' fields, each the option --max-... of the same name
        "max_tensor_elements": "Refuse a model in which shape inference finds a tensor with more elements "
                               "(batch dims as 1).",
        "max_noise_elements": "Refuse a noise batch (or input image) with more float elements.",
        "max_nodes": "Refuse a graph with more nodes.",
        "max_file_bytes": "Refuse a model file (with its external data), or an npz declaring arrays, larger than this.",
    }
    defaults = default("limits")
    for name, text in texts.items():
        command = click.option(_flag(name), type=click.IntRange(min=1), default=getattr(defaults, name),
                               show_default=True, help=text)(command)
    return command


def _flag(field: str) -> str:
    """The option of a ``Limits`` field: ``max_nodes`` is ``--max-nodes``."""
    return "--" + field.replace("_", "-")


def _arguments() -> list[str]:
    """The command line as given (SARIF's invocation, the report's command): recorded by
    ``_Main.make_context`` in the context every command inherits."""
    return click.get_current_context().meta.get(_ARGUMENTS_KEY, [])


_ARGUMENTS_KEY = "otbr_onnx.arguments"


def _output_options(command):
    """--format, --sarif and --html, shared by ``scan`` and ``clean``."""
    for decorator in reversed([
        click.option("--format", "output_format", type=click.Choice(["text", "json", "sarif"]),
                     help="What stdout gets: text (scan: the verdict and margins; clean: nothing, the summary "
                          "goes to stderr), json (the report; batch: the summary; same as --json) or sarif "
                          "(a SARIF 2.1.0 log for code scanning).  [default: text]"),
        click.option("--sarif", "sarif_path", type=click.Path(path_type=Path),
                     help="Also write a SARIF 2.1.0 log here (written before the exit code, also on refusal)."),
        click.option("--html", "html_path", type=click.Path(path_type=Path),
                     help="Write a self-contained HTML report here (needs the [html] extra: matplotlib)."),
    ]):
        command = decorator(command)
    return command


def _output_format(output_format: str | None, as_json: bool) -> str:
    if as_json and output_format not in (None, "json"):
        raise UsageError(f"--json and --format {output_format} contradict each other (--json is --format json)")
    return "json" if as_json else output_format or "text"


def _findings(fmt: str, sarif_path: Path | None, inputs: list[Path]):
    """The run's SARIF log (``findings.Findings``): on stdout with --format sarif, in --sarif's file."""
    from otbr_onnx.findings import Findings

    return Findings(fmt == "sarif", sarif_path, inputs, _arguments(), click.echo)


def _html_target(html_path: Path | None, inputs: list[Path]) -> None:
    """Before any work: matplotlib is there and the HTML path is writable."""
    if html_path is None:
        return
    from otbr_onnx.html_report import require_matplotlib
    from otbr_onnx.output import check_output_path

    require_matplotlib()
    check_output_path(html_path, inputs, False)


def _run(debug: bool, action) -> None:
    """Run ``action``; turn every failure into one stderr line and an exit code."""
    try:
        with warnings.catch_warnings():
            if not debug:  # library warnings would break the one-line-on-stderr contract
                warnings.simplefilter("ignore")
            action()
    except OtbrError as error:
        if debug:
            traceback.print_exc()
        click.echo(f"otbr-onnx: error: {one_line(error, limit=None)}", err=True)
        sys.exit(error.exit_code)
    except KeyboardInterrupt:
        exit_interrupted()
    except BrokenPipeError:
        _reader_gone()
    except Exception as error:  # noqa: BLE001 - the last line of defence against tracebacks
        if was_interrupted():  # Ctrl-C that a library turned into another error (ImportError)
            exit_interrupted()
        if debug:
            traceback.print_exc()
        click.echo(f"otbr-onnx: internal error: {type(error).__name__}: {one_line(error)} (rerun with --debug)",
                   err=True)
        sys.exit(1)


def _reader_gone() -> None:
    """``otbr-onnx inspect m.onnx | head``: the pipe closed under a print. Exit as a process that
    SIGPIPE killed (141), silently; stdout goes to /dev/null so the interpreter's final flush does
    not raise again. Every file is written atomically, so none is left half-done."""
    import os

    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    sys.exit(141)


class _Main(click.Group):
    """click's own refusals (a bad option value, a missing argument) as one ``otbr-onnx: error:``
    line with exit 2, like every other error; Ctrl-C at any point (while click parses, while a
    command imports torch) exits 130 with one line, where click would print "Aborted!" and exit 1."""

    def make_context(self, info_name, args, parent=None, **extra) -> click.Context:
        arguments = list(args)  # before parsing, which consumes the list
        context = super().make_context(info_name, args, parent, **extra)
        context.meta[_ARGUMENTS_KEY] = arguments
        return context

    def main(self, args=None, *rest, standalone_mode: bool = True, **kwargs):
        if not standalone_mode:
            return super().main(args, *rest, standalone_mode=False, **kwargs)
        watch_interrupts()
        try:
            code = super().main(args, *rest, standalone_mode=False, **kwargs)
        except (click.exceptions.Abort, KeyboardInterrupt):  # click turns KeyboardInterrupt into Abort
            exit_interrupted()
        except click.ClickException as error:
            message = printable(" ".join(error.format_message().split()))
            click.echo(f"otbr-onnx: error: {message} (see --help)", err=True)
            sys.exit(2)
        sys.exit(code if isinstance(code, int) else 0)


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="otbr-onnx")
def main() -> None:
    """Remove backdoors from ONNX image classifiers without data (OTBR).

    \b
      otbr-onnx clean suspicious.onnx cleaned.onnx --report report.json
      otbr-onnx eval cleaned.onnx --data eval.npz
    """


def _scan_options(command):
    """The detection options, shared by ``scan`` and ``clean``."""
    for decorator in reversed([
        click.option("--scan-starts", type=click.IntRange(min=1), default=default("scan.starts"), show_default=True,
                     help="Random starts per class of the maximum-margin search."),
        click.option("--scan-steps", type=click.IntRange(min=1), default=default("scan.steps"), show_default=True,
                     help="Adam steps per start of the maximum-margin search."),
        click.option("--scan-threshold", type=click.FloatRange(min=0, min_open=True), default=default("scan.threshold"),
                     show_default=True,
                     help="Robust z-score (median/MAD of the other classes) above which a class's maximum "
                          "margin flags it as a backdoor target."),
        click.option("--max-classes", type=click.IntRange(min=1), default=default("scan.max_classes"),
                     show_default=True,
                     help="Refuse (exit 3) a model with more classes, before the scan starts: its work grows "
                          "with the class count, which the model file decides."),
    ]):
        command = decorator(command)
    return command


def _data_options(command):
    """--data, --data-mean, --data-std: the user's own images (``otbr_onnx.data.load_images``)."""
    for decorator in reversed([
        click.option("--data", "data_path", type=_DataPath(),
                     help="Your own images: a folder of PNG/JPEG files (converted to the model's channels, "
                          "resized, scaled to --input-range; the first 2000 by name) or an .npz with x "
                          "(N, *input shape) already in the model's layout and range, and optional y labels."),
        click.option("--data-mean", type=FLOATS,
                     help="With a --data folder: per-channel mean (one value or one per channel) subtracted "
                          "after scaling to --input-range."),
        click.option("--data-std", type=FLOATS,
                     help="With a --data folder: per-channel standard deviation divided by, after --data-mean."),
    ]):
        command = decorator(command)
    return command


def _data_arguments(data_path: Path | None, data_mean, data_std) -> dict:
    """The --data options as ``options.from_command_line`` takes them (the path as a string)."""
    return {"data_path": None if data_path is None else str(data_path), "data_mean": data_mean, "data_std": data_std}


def _check_data_paths(options, outputs: list, out_dirs: list) -> None:
    """Before any work: nothing is written over or into the --data file or folder."""
    if options.data.path is None:
        return
    from otbr_onnx.output import check_data_paths

    check_data_paths(Path(options.data.path), [p for p in outputs if p is not None],
                     [d for d in out_dirs if d is not None])


def _batch_options(command):
    """Where batch mode runs its models, shared by ``scan`` and ``clean``."""
    for decorator in reversed([
        click.option("--jobs", type=click.IntRange(min=1), default=1, show_default=True,
                     help="Batch mode: models run in parallel local processes (--executor local)."),
        click.option("--executor", type=click.Choice(EXECUTORS), default=EXECUTORS[0], show_default=True,
                     help="Batch mode: local (this machine, --jobs processes) or ray (one Ray task per model, "
                          "on a local Ray instance or the cluster at --address; the [ray] extra)."),
        click.option("--address", help="With --executor ray: the cluster to use, e.g. auto, HOST:6379 or "
                                       "ray://HOST:10001 (default: start a Ray instance on this machine). Input "
                                       "and output folders must be on a file system every node shares."),
        click.option("--cpus-per-model", type=click.FloatRange(min=0, min_open=True),
                     help="With --executor ray: CPUs each model's task requests.  [default: 1]"),
        click.option("--gpus-per-model", type=click.FloatRange(min=0),
                     help="With --executor ray: GPUs each model's task requests (fractions share a GPU); "
                          "with 0 the task sees no GPU.  [default: 0]"),
    ]):
        command = decorator(command)
    return command


def _batch_run(run, models: list[Path], out_dir: Path | None, options, executor, quiet: bool,
               to_stderr: bool, columns: tuple[str, ...]) -> list:
    """Run a batch with a progress bar over models (stderr, on a terminal only), one line per model
    as it finishes and a final table (on ``to_stderr`` or stdout, terminal or not)."""
    from tqdm import tqdm

    from otbr_onnx.batch_view import outcome_line, outcome_table

    stream = sys.stderr if to_stderr else sys.stdout
    # disable=None: tqdm draws the bar only when stderr is a terminal
    bar = tqdm(total=len(models), desc="models", unit="model", file=sys.stderr, disable=True if quiet else None)

    def done(outcome) -> None:
        bar.update(1)
        if not quiet:  # file names in a batch folder are anyone's choice: printable
            bar.write(printable(outcome_line(outcome)), file=stream)

    try:
        outcomes = run(models, out_dir, options, executor=executor, on_done=done)
    finally:
        bar.close()
    if not quiet:
        _echo("\n".join(["", *outcome_table(outcomes, columns)]), err=to_stderr)
    return outcomes


def _shown(values: tuple[float, ...]) -> str:
    """A range default as typed on the command line, (0.0, 1.0) as 0,1 (--help shows it so)."""
    return ",".join(f"{v:g}" for v in values)


def _seed_option(text: str):
    return click.option("--seed", type=int, default=default("run.seed"), show_default=True, help=text)


def _device_option(text: str):
    return click.option("--device", type=click.Choice(DEVICES), default=default("run.device"), show_default=True,
                        help=text)


def _interface_options(range_text: str):
    """--input-shape, --output and --input-range (``range_text``: what the range is of)."""
    return _options(
        click.option("--input-shape", type=SHAPE,
                     help="Full input shape, e.g. 1,3,224,224, for models with dynamic dims."),
        click.option("--output", "output_name", help="Name of the logits output when the model has several."),
        click.option("--input-range", type=RANGE, default=_shown(default("interface.input_range")), show_default=True,
                     help=range_text),
    )


# Where a batch runs, what is printed and written, and the caps: the same in ``scan`` and ``clean``
_RUN_OPTIONS = _options(
    _batch_options,
    click.option("--json", "as_json", is_flag=True,
                 help="Print the report (batch: the summary) as JSON on stdout (--format json)."),
    _output_options,
    click.option("--quiet", "-q", is_flag=True, help="No progress bar or summary."),
    click.option("--verbose", "-v", count=True, help="Log stages (-v) and details (-vv) to stderr."),
    click.option("--debug", is_flag=True, help="Show tracebacks on errors."),
    _limit_options,
)


@main.command()
@click.argument("models", nargs=-1, required=True, type=click.Path(path_type=Path))
@_scan_options
@_seed_option("Seed of the random starts.")
@_device_option("Where the search runs; auto picks CUDA when torch sees a GPU.")
@click.option("--max-memory", type=SIZE,
              help="Memory the search may use, e.g. 2G (see clean --help). Default: 2G, or half the "
                   "available memory when less; on CUDA half the free GPU memory.")
@_interface_options("Value range of the model's input (e.g. -1,1 for normalised inputs, or 0,255).")
@click.option("--report", "report_path", type=click.Path(path_type=Path),
              help="Write the JSON report here (one model; batch mode: see --out-dir).")
@click.option("--out-dir", type=click.Path(path_type=Path),
              help="Batch mode: write NAME.report.json per model and summary.json into this folder; a rerun "
                   "skips models whose report matches their input and options.")
@_data_options
@_RUN_OPTIONS
def scan(models: tuple[Path, ...], scan_starts, scan_steps, scan_threshold, max_classes, seed, device, max_memory,
         input_shape, output_name, input_range, report_path, out_dir, data_path, data_mean, data_std, jobs, executor,
         address, cpus_per_model, gpus_per_model, as_json, output_format, sarif_path, html_path, quiet, verbose, debug, **limits) -> None:
    """Is MODEL backdoored, and which class does the backdoor serve? Needs no data; changes nothing.

    For every class the largest logit margin reachable over the input box is searched from
    random starts (maximum-margin detection, MM-BD); a class whose margin stands out against
    the other classes' (robust z-score above --scan-threshold) is suspected. Data-free, it finds
    most patch triggers and misses most global ones (Blended, SIG, WaNet).

    With --data (100-200 unlabelled images are enough), trigger inversion runs too: per class, a
    small patch, additive and warp trigger is optimised to send the other classes' images there;
    a class reached abnormally easily (thresholds set from clean models) is suspected as well.

    Exit codes: 0 no backdoor found, 6 backdoor suspected (the classes are listed), 2 bad usage
    or unreadable model, 3 unsupported model.

    Batch mode: give a folder, several models, or --out-dir. One line per model as it finishes,
    then a table (model, status, verdict, target, time) on stdout (stderr with --json, which
    prints the summary); the exit code is the worst model's: 6 when any model is suspected, else
    the worst error, else 0.
    """
    _logging(verbose)

    def action() -> None:
        with interrupts_deferred():  # imported inside _run, with Ctrl-C held until they are done
            from otbr_onnx.batch import check_scan_batch, is_batch, refuse_single_ray
            from otbr_onnx.data import check_data
            from otbr_onnx.executors import choose_executor
            from otbr_onnx.output import atomic_write, check_output_path
            from otbr_onnx.options import from_command_line
            from otbr_onnx.pipeline import scan as run_scan
            from otbr_onnx.report import margins_text
            from otbr_onnx.sarif import scan_results

        fmt = _output_format(output_format, as_json)
        options = from_command_line(
            False, {}, scan_starts=scan_starts, scan_steps=scan_steps, scan_threshold=scan_threshold,
            max_classes=max_classes, seed=seed, device=device, max_memory=max_memory, input_shape=input_shape,
            output_name=output_name, input_range=input_range, **limits,
            **_data_arguments(data_path, data_mean, data_std),
        )
        options.validate()
        _check_data_paths(options, [report_path, sarif_path, html_path], [out_dir])
        if is_batch(list(models), out_dir):
            check_scan_batch(report_path, html_path, fmt == "sarif" or sarif_path is not None, out_dir)
            runner = choose_executor(jobs, executor, address, cpus_per_model, gpus_per_model)
            findings = _findings(fmt, sarif_path, list(models))
            with findings.recording(None):
                _scan_batch(list(models), out_dir, options, runner, fmt, quiet, findings)
            return
        refuse_single_ray(executor, "a folder, several models, or --out-dir")
        model = models[0]
        if report_path is not None:
            check_output_path(report_path, [model], False)
        _html_target(html_path, [model])
        findings = _findings(fmt, sarif_path, [model])
        with findings.recording(model):
            check_data(model, options)
            with _progress(quiet) as progress:
                found = run_scan(model, options, progress, command=_arguments())
            code = EXIT_SUSPECTED if found.backdoor_suspected else 0
            if report_path is not None:
                atomic_write(report_path, json.dumps(found.report, indent=2).encode())
            if html_path is not None:
                from otbr_onnx.html_report import write_html

                write_html(found.report, html_path)
            findings.emit(scan_results(found.report, model), code)  # before the exit code is returned
        if fmt == "json":
            click.echo(json.dumps(found.report, indent=2))
        elif fmt == "text" and not quiet:
            _echo(f"{model}: {found.report['verdict']}")
            _echo("\n".join(margins_text(found.report["scan"])))
        if code:
            sys.exit(code)

    _run(debug, action)


@main.command()
@click.argument("models", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.argument("output", type=click.Path(path_type=Path))
@click.option("--report", "report_path", type=click.Path(path_type=Path), help="Write the JSON report here.")
@click.option("--always", is_flag=True,
              help="Clean even when the scan finds no backdoor (default without --data: such a model is written "
                   "unchanged; with --data every model is sanitized anyway).")
@click.option("--only-if-flagged", is_flag=True,
              help="With --data: remove only when the scan flags a class, and hand every other model back "
                   "unchanged (the behaviour before the relearning remover). Without --data it changes nothing: "
                   "the data-free path only cleans flagged models.")
@click.option("--ranking", type=click.Choice(RANKINGS), default=default("removal.ranking"), show_default=True,
              help="Neuron score: activation (how much more a neuron fires on the suspected target's "
                   "maximum-margin inputs), nwc (the paper's weight change under random unlearning), auto "
                   "(activation when a class is suspected, else nwc).")
@_scan_options
@click.option("--iterations", type=click.IntRange(min=0),  # no click default: None is "not given" (--reference)
              help=f"Random-unlearning steps (nwc ranking).  [default: {default('removal.iterations')}]")
@click.option("--batch-size", type=click.IntRange(min=1), help="Noise images per unlearning step.")
@click.option("--micro-batch", type=click.IntRange(min=1),
              help="Unlearn each noise batch in chunks of this many images: less memory; BatchNorm in "
                   "train mode then sees per-chunk statistics. Default: as many as --max-memory holds.")
@click.option("--max-memory", type=SIZE,
              help="Memory the run may use, e.g. 2G or 512M (host RSS; with --device cuda, GPU memory): "
                   "the images per forward+backward pass of unlearning, scan and probes are chosen to fit "
                   "(see the report's 'memory'). Default: 2G, or half the available memory when less; "
                   "on CUDA half the free GPU memory.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), help="Unlearning learning rate (SGD, momentum 0.9).")
@click.option("--fusion-lambda", type=click.FloatRange(0, 1), help="Weight of the transported pruned model in the fusion.")
@click.option("--prune-ratio", type=click.FloatRange(0, 1, max_open=True),
              help="Share of ranked neurons to prune (gamma). Default: chosen per model, the largest candidate "
                   "within --max-disagreement on probes synthesised from the model (no data), or within "
                   "--max-acc-drop on --calibration images.")
@click.option("--method", type=click.Choice(METHODS), default=default("removal.method"), show_default=True,
              help="otbr: the full method; prune-only: stage 1 alone (ablation); clp: channel-Lipschitz pruning baseline.")
@click.option("--remover", type=click.Choice(removers.choices()), default=default("removal.remover"), show_default=True,
              help="How the backdoor is removed. relearning: a copy of the model forgets, then relearns the "
                   "original's answers on your --data images, with no trigger searched (needs --data); "
                   "adversarial: triggers found on your --data images are unlearnt while the original's answers "
                   "are kept (needs --data); pruning: ranking + pruning + OT fusion (--method); auto: relearning "
                   "with --data (unless --reference, --method, --prune-ratio or --calibration ask for pruning), "
                   "else pruning.")
@click.option("--calibration", type=_RegularFile(),
              help="npz of CLEAN images (x, y) you trust: choose the prune ratio under --max-acc-drop on them.")
@click.option("--max-acc-drop", type=click.FloatRange(min=0), default=default("removal.max_acc_drop"),
              help="Accuracy points the cleaning may cost: on --calibration images, or with --data on the "
                   "held-out share of your images (judged against the original's answers).  [default: "
                   + ", ".join(f"{points:g} for {name}" for name, points in MAX_ACC_DROP.items()) + "]")
@_data_options
@click.option("--max-disagreement", type=click.FloatRange(0, 100), default=default("removal.max_disagreement"),
              show_default=True,
              help="Without --calibration or --prune-ratio: how much (%) of the original's confidence in its own "
                   "answers on the synthesised probes the cleaning may lose.")
@click.option("--probes", type=click.IntRange(min=1), default=default("data.probes"), show_default=True,
              help="Probe images synthesised from the model to choose the prune ratio.")
@_seed_option("Seed for noise, labels and parity inputs.")
@_device_option("Where unlearning runs; auto picks CUDA when torch sees a GPU.")
@click.option("--ort-provider", type=click.Choice(ORT_PROVIDERS), default=default("run.ort_provider"),
              show_default=True,
              help="onnxruntime provider for the parity checks (cuda needs onnxruntime-gpu).")
@click.option("--reference", is_flag=True,
              help="Use the published settings exactly (20 steps, batch 256, lr 1e-4, lambda 0.5, conv layers, "
                   "no grad clipping). Options given explicitly still override.")
@_interface_options("Value range of the noise images (use the range the model expects, e.g. -1,1 or 0,255).")
@click.option("--force", is_flag=True,
              help="Allow the output path to be the input path (batch: the output folder to overlap the inputs).")
@_RUN_OPTIONS
def clean(models: tuple[Path, ...], output: Path, report_path: Path | None, always, only_if_flagged, ranking, scan_starts, scan_steps,
          scan_threshold, max_classes, iterations, batch_size, micro_batch, max_memory, lr,
          fusion_lambda, prune_ratio, method, remover, calibration, max_acc_drop, data_path, data_mean, data_std,
          max_disagreement, probes, seed, device, ort_provider, reference, input_shape, output_name, input_range, force,
          jobs, executor, address, cpus_per_model, gpus_per_model, as_json, output_format, sarif_path, html_path,
          quiet, verbose, debug, **limits) -> None:
    """Scan MODEL, remove the backdoor it finds, check that it is gone, and write OUTPUT.

    \b
    1. scan: data-free maximum-margin detection (see `otbr-onnx scan`), and with --data trigger
       inversion on your images; without --data, nothing suspected: OUTPUT is MODEL, byte for
       byte ("model unchanged"), unless --always;
    2. with --data (remover relearning, the default there): EVERY model is sanitized, flagged or
       not (--only-if-flagged: only flagged ones): a copy forgets, then relearns the original's
       answers on your images; a quarter of them, held out, must keep the expected accuracy
       cost within --max-acc-drop, else refused (exit 3);
       without --data (or --remover pruning): rank neurons by how much more they fire on the
       suspected target's inputs, then prune and OT-fuse (OTBR) at the smallest candidate ratio
       after which a rescan no longer flags the target, within the fidelity budget;
       with --remover adversarial (needs --data): unlearn the triggers found on your images
       while keeping the original's answers on them; none within budget: refused (exit 3);
    3. with --data and BatchNorm nodes: re-estimate the BatchNorm statistics on your images and
       rescan; a removal that comes back is refused as masked (exit 3), nothing written;
    4. a fresh scan of the cleaned model (what `otbr-onnx scan OUTPUT` reports, with the same
       --data); write the new weights into the original graph; check parity in onnxruntime.

    Exit codes: 0 written (or MODEL unchanged), 6 written but the fresh scan of it flags a
    class (named in the verdict: a human should look), 3 refused, 4 parity failure, 2 bad usage.

    OUTPUT is the input graph with only weight values changed (same inputs, outputs, node
    names, opset and metadata). It is written only after onnxruntime parity passes.

    Batch mode: give a folder or several models, and an output folder. Each model gets
    NAME.onnx and NAME.report.json there, plus summary.json; models already cleaned with the
    same input and options are skipped; the exit code is the worst of the models' codes. One
    line per model as it finishes, then a table (model, status, verdict, target, strength,
    fidelity, time), on stderr. --executor ray runs each model as a Ray task (see --address).
    """
    _logging(verbose)

    def action() -> None:
        # imported here, inside _run, with Ctrl-C held until they are done (see interrupts_deferred)
        with interrupts_deferred():
            from otbr_onnx.batch import final_scan_code, is_batch, refuse_batch_html, refuse_single_ray
            from otbr_onnx.data import check_calibration, check_data
            from otbr_onnx.executors import choose_executor
            from otbr_onnx.options import from_command_line
            from otbr_onnx.output import check_output_path, write_result
            from otbr_onnx.pipeline import clean as run_clean
            from otbr_onnx.report import summary_text
            from otbr_onnx.sarif import clean_results

        fmt = _output_format(output_format, as_json)
        options = from_command_line(
            reference,
            {"iterations": iterations, "batch_size": batch_size, "lr": lr, "fusion_lambda": fusion_lambda,
             "prune_ratio": prune_ratio},
            method=method, remover=remover, always=always, only_if_flagged=only_if_flagged, ranking=ranking, scan_starts=scan_starts,
            scan_steps=scan_steps, scan_threshold=scan_threshold, seed=seed, device=device, input_shape=input_shape,
            output_name=output_name,
            input_range=input_range, micro_batch=micro_batch, max_memory=max_memory, ort_provider=ort_provider,
            calibration=calibration, max_acc_drop=max_acc_drop, max_disagreement=max_disagreement, probes=probes,
            max_classes=max_classes, **limits, **_data_arguments(data_path, data_mean, data_std),
        )
        options.validate()
        batch = is_batch(list(models))
        if batch:
            _check_data_paths(options, [sarif_path], [output])
        else:
            _check_data_paths(options, [output, report_path, sarif_path, html_path], [])
        check_calibration(options)  # fail fast, before loading or unlearning: the ratio rule reads it last
        if batch:
            refuse_batch_html(html_path)
            runner = choose_executor(jobs, executor, address, cpus_per_model, gpus_per_model)
            findings = _findings(fmt, sarif_path, list(models))
            with findings.recording(None):
                _clean_batch(list(models), output, options, runner, fmt, quiet, force, findings)
            return
        refuse_single_ray(executor, "give a folder or several models")
        model = models[0]
        check_output_path(output, [model], force)
        if report_path is not None:
            check_output_path(report_path, [model, output], False)
        _html_target(html_path, [model, output])
        findings = _findings(fmt, sarif_path, [model, output])
        with findings.recording(model):  # refused (3), parity failure (4), ...: logged before the exit
            check_data(model, options)
            with _progress(quiet) as progress:
                result = run_clean(model, options, progress, command=_arguments())
            report = write_result(result, output, report_path)
            if html_path is not None:
                from otbr_onnx.html_report import write_html

                write_html(report, html_path)
            code = final_scan_code(report)  # 6 as `scan` of the written file; batch mode alike
            findings.emit(clean_results(report, model), code)
        if fmt == "json":  # json.dumps writes every control character as \\uXXXX
            click.echo(json.dumps(report, indent=2))
        if not quiet:
            _echo(summary_text(result.report), err=True)
            _echo(f"  wrote {output}" + ("" if result.changed else " (the input, unchanged)"), err=True)
        if code:
            sys.exit(code)

    _run(debug, action)


def _clean_batch(inputs: list[Path], out_dir: Path, options, executor, fmt: str, quiet: bool,
                 force: bool, findings) -> None:
    from otbr_onnx.batch import CLEAN_STATUSES, clean_batch_models, clean_many
    from otbr_onnx.batch_view import CLEAN_COLUMNS

    models = clean_batch_models(inputs, out_dir, force)
    outcomes = _batch_run(clean_many, models, out_dir, options, executor, quiet, True, CLEAN_COLUMNS)
    _batch_end(outcomes, out_dir, CLEAN_STATUSES, fmt, quiet, findings, to_stderr=True)


def _scan_batch(inputs: list[Path], out_dir: Path | None, options, executor, fmt: str, quiet: bool,
                findings) -> None:
    from otbr_onnx.batch import SCAN_STATUSES, scan_batch_models, scan_many
    from otbr_onnx.batch_view import SCAN_COLUMNS

    models = scan_batch_models(inputs, out_dir)
    outcomes = _batch_run(scan_many, models, out_dir, options, executor, quiet, fmt != "text", SCAN_COLUMNS)
    _batch_end(outcomes, out_dir, SCAN_STATUSES, fmt, quiet, findings, to_stderr=fmt != "text")


def _batch_end(outcomes: list, out_dir: Path | None, statuses: tuple[str, ...], fmt: str, quiet: bool,
               findings, to_stderr: bool) -> None:
    """The SARIF log, the counts line, the summary on stdout with --json, and the exit code: the
    worst model's."""
    from otbr_onnx.batch import summary, worst_exit_code
    from otbr_onnx.findings import batch_findings

    worst = worst_exit_code(outcomes)
    if out_dir is not None:  # the findings come from the reports written there
        findings.emit(batch_findings(outcomes, out_dir), worst)
    if fmt == "json":  # summary.json's content (scan without --out-dir: what it would hold)
        click.echo(json.dumps(summary(outcomes, statuses), indent=2))
    if not quiet:
        counts = ", ".join(f"{sum(o.status == s for o in outcomes)} {s}" for s in statuses)
        where = f"; summary in {out_dir / 'summary.json'}" if out_dir is not None else ""
        _echo(f"batch: {counts}{where}", err=to_stderr)
    if worst:
        sys.exit(worst)


class _PrintableFormatter(logging.Formatter):
    """Log records quote layer names and paths: escape what a terminal would act on."""

    def format(self, record: logging.LogRecord) -> str:
        return printable(super().format(record), keep="\n")


def _logging(verbose: int) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_PrintableFormatter("otbr-onnx: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler])


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # replaced or closed
        return False


class StageLog:
    """Progress for a log (stderr not a terminal, where tqdm draws nothing): a line for a stage
    once it looks long, and a heartbeat every ``every_s`` while it lasts.

    "Looks long": the time per step so far, times the steps, reaches ``after_s``. A run of
    quick stages (every test, most refusals) prints nothing, so an error stays the one line on
    stderr; a scan that will take minutes says so at its first step instead of staying silent.
    """

    def __init__(self, after_s: float = 5.0, every_s: float = 60.0, clock=None) -> None:
        import time

        self.after_s, self.every_s = after_s, every_s
        self.clock = clock or time.monotonic
        self.started: dict[str, tuple[float, int]] = {}  # stage -> (time, steps done) at its first update
        self.last_line: dict[str, float] = {}

    def line(self, stage: str, done: int, total: int) -> str | None:
        """The line to print for this update, or None."""
        now = self.clock()
        start, first = self.started.setdefault(stage, (now, done))  # timed from the first update on
        if done <= first:
            return None
        elapsed = now - start
        left = elapsed * (total - done) / (done - first)
        last = self.last_line.get(stage)
        due = elapsed + left >= self.after_s if last is None else now - last >= self.every_s
        if not due:
            return None
        self.last_line[stage] = now
        return f"otbr-onnx: {stage}: {done}/{total} steps, about {_duration(left)} left"


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if hours else f"{minutes} min {secs} s" if minutes else f"{secs} s"


class _progress:
    """A tqdm bar per stage on stderr unless --quiet; tqdm itself (``disable=None``) stays silent
    when stderr is not a terminal, so there ``StageLog`` prints a line for each long stage: a CI
    log of a long run shows where it is."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.bars: dict = {}
        self.log = None if _is_terminal(sys.stderr) else StageLog()

    def __enter__(self):
        return None if self.quiet else self.update

    def update(self, stage: str, done: int, total: int) -> None:
        from tqdm import tqdm

        bar = self.bars.get(stage)
        if bar is None:
            bar = self.bars[stage] = tqdm(total=total, desc=stage, file=sys.stderr, leave=False, disable=None)
        bar.update(done - bar.n)
        line = self.log.line(stage, done, total) if self.log is not None else None
        if line is not None:
            _echo(line, err=True)

    def __exit__(self, *exc) -> None:
        for bar in self.bars.values():
            bar.close()


@main.command("eval")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--data", "data_path", required=True, type=_RegularFile(),
              help="npz with x_clean/y_clean (and optionally x_poisoned/y_poisoned), or x/y.")
@click.option("--poisoned", "poisoned_path", type=_RegularFile(),
              help="npz of triggered images (x, y = TRUE labels).")
@click.option("--target", type=int, help="Attack target class (default: 'target' in the npz, else 0).")
@click.option("--original", "original_path", type=click.Path(path_type=Path),
              help="The model before cleaning: also report its metrics and the DER.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON on stdout.")
@click.option("--debug", is_flag=True, help="Show tracebacks on errors.")
@_limit_options
def eval_command(model: Path, data_path: Path, poisoned_path: Path | None, target: int | None,
                 original_path: Path | None, as_json: bool, debug: bool, **limits) -> None:
    """Print ACC (clean accuracy), ASR (attack success rate) and RA (robust accuracy) of MODEL."""

    def action() -> None:
        with interrupts_deferred():
            from otbr_onnx.evaluate import evaluate_files

        found = evaluate_files(model, data_path, poisoned_path, target, original_path, Limits(**limits))
        if as_json:
            click.echo(json.dumps(found.as_dict(), indent=2))
            return
        if found.original is not None:
            _echo(f"{original_path}: {_metrics_line(found.original)}")
        _echo(f"{model}: {_metrics_line(found.metrics)}")
        if found.der is not None:
            click.echo(f"DER: {100 * found.der:.2f}")

    _run(debug, action)


@main.command("inspect")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--input-shape", type=SHAPE, help="Full input shape for models with dynamic dims, e.g. 1,3,224,224.")
@click.option("--output", "output_name", help="Name of the logits output when the model has several.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON on stdout.")
@click.option("--debug", is_flag=True, help="Show tracebacks on errors.")
@_limit_options
def inspect_command(model: Path, input_shape, output_name, as_json: bool, debug: bool, **limits) -> None:
    """Show MODEL's interface, weight layers, channel ties and what clean would do. Changes nothing."""

    def action() -> None:
        with interrupts_deferred():
            from otbr_onnx.describe import describe

        info = describe(model, input_shape, output_name, Limits(**limits))
        if as_json:
            click.echo(json.dumps(info, indent=2))
            return
        # producer, path and verdict are free text from the file: _echo escapes them
        _echo(f"{info['path']}: opset {info['opset']}, {info['nodes']} nodes, producer {info['producer'] or '?'}")
        batch = info["input"]["batch"]
        how = {"made dynamic": "made dynamic in a working copy", "fixed": "every pass at that size"}
        fixed = "" if batch["path"] == "dynamic" else f" (fixed batch {batch['declared']}: {how[batch['path']]})"
        _echo(f"  input  {info['input']['name']} {info['input']['shape']}{fixed}")
        single = {"logit": " (one logit: a binary classifier, read as classes [0, z])",
                  "probability": " (one sigmoid probability: a binary classifier, read as classes [1-p, p])"}
        _echo(f"  output {info['output']['name']}" + (single.get(info["output"].get("single_score"))
                                                      or (" (probabilities)" if info["output"]["probabilities"] else "")))
        for layer in info["layers"]:
            why = f"  ({layer['pinned_because']})" if layer["pinned_because"] else ""
            _echo(f"  {layer['op']:7} {layer['neurons']:5d} neurons  {layer['role']:8} group {layer['group']:3d}  "
                  f"{layer['node']}{why}")
        for skipped in info["skipped_layers"]:
            _echo(f"  skipped {skipped['node']}: {skipped['reason']}")
        for group, members in info["tie_groups"].items():
            _echo(f"  tied group {group}: {', '.join(members)}")
        if info.get("storage"):
            kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(info["storage"].items()))
            _echo(f"  weights stored as: {kinds}")
        _echo(f"  verdict: {info['verdict']}")

    _run(debug, action)


@main.command("report")
@click.argument("report_file", metavar="REPORT", type=_RegularFile())
@click.option("-o", "--output", "html_path", required=True, type=click.Path(path_type=Path),
              help="Where to write the HTML page.")
@click.option("--max-file-bytes", type=click.IntRange(min=1), default=256 * 2**20, show_default=True,
              help="Refuse a report file larger than this.")
@click.option("--debug", is_flag=True, help="Show tracebacks on errors.")
def report_command(report_file: Path, html_path: Path, max_file_bytes: int, debug: bool) -> None:
    """Render REPORT, a JSON report of `clean --report` or `scan --report`, as one self-contained
    HTML page (needs the [html] extra: matplotlib). Runs no model."""

    def action() -> None:
        with interrupts_deferred():
            from otbr_onnx.html_report import page_from_file
            from otbr_onnx.output import atomic_write

        _html_target(html_path, [report_file])
        atomic_write(html_path, page_from_file(report_file, max_file_bytes).encode("utf-8"))

    _run(debug, action)


@main.command("verify")
@click.argument("original", type=click.Path(path_type=Path))
@click.argument("cleaned", type=click.Path(path_type=Path))
@click.option("--input-shape", type=SHAPE, help="Full input shape for models with dynamic dims.")
@click.option("--samples", type=click.IntRange(min=1), default=64, show_default=True, help="Random inputs to compare.")
@click.option("--scan", "with_scan", is_flag=True,
              help="Also scan both models and print their per-class maximum margins side by side.")
@click.option("--input-range", type=RANGE, default=_shown(default("interface.input_range")), show_default=True,
              help="Value range of the model's input (--scan).")
@_data_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON on stdout.")
@click.option("--debug", is_flag=True, help="Show tracebacks on errors.")
@_limit_options
def verify_command(original: Path, cleaned: Path, input_shape, samples: int, with_scan: bool, input_range: str,
                   data_path: Path | None, data_mean, data_std, as_json: bool, debug: bool, **limits) -> None:
    """Check that CLEANED is ORIGINAL with only weight values changed (exit 5 if not): a changed
    value of any initializer that is not a weight-layer weight or bias is a graph difference.

    With --scan, both models are scanned (see `otbr-onnx scan`): the margins show whether the
    class the original's backdoor served is still abnormally reachable in CLEANED.

    Either model not a classifier (a segmentation map, no class scores): refused, exit 3, as
    there are no class answers to compare."""

    def action() -> None:
        with interrupts_deferred():
            from otbr_onnx.options import from_command_line
            from otbr_onnx.verify import verify_files

        if data_path is not None and not with_scan:
            raise UsageError("--data is read by the scan: give --scan too")
        options = from_command_line(False, {}, input_shape=input_shape, input_range=input_range, **limits,
                                    **_data_arguments(data_path, data_mean, data_std))
        options.validate()
        result, scans = verify_files(original, cleaned, options, samples, with_scan)
        if as_json:
            click.echo(json.dumps({**result.as_dict(), **({"scan": scans} if scans else {})}, indent=2))
        elif result.same_graph:
            _echo(f"same graph: only weight values differ ({len(result.moved)} tensors changed)")
            for name, moved in result.moved.items():
                _echo(f"  {name}: max abs {moved['max_abs']:.3g}, relative L2 {moved['relative_l2']:.3g}")
            _echo(f"outputs on {samples} random inputs: top-1 agreement {100 * result.top1_agreement:.1f}%, "
                  f"max abs logit diff {result.max_abs_logit_diff:.3g}")
            if scans:
                _echo("\n".join(_margins_side_by_side(scans["original"], scans["cleaned"])))
        if not result.same_graph:
            if not as_json:
                _echo(f"otbr-onnx: graphs differ at {result.first_difference}", err=True)
            sys.exit(5)

    _run(debug, action)


def _margins_side_by_side(original: dict, cleaned: dict) -> list[str]:
    lines = [f"scan: original {original['verdict']} {original['suspected_targets'] or ''}; "
             f"cleaned {cleaned['verdict']} {cleaned['suspected_targets'] or ''}",
             "  class   original margin (z)   cleaned margin (z)"]
    for a, b in zip(original["classes"], cleaned["classes"]):
        lines.append(f"  {a['class']:5d}   {a['max_margin']:9.2f} ({a['z']:6.2f})   {b['max_margin']:9.2f} ({b['z']:6.2f})")
    return lines


def _metrics_line(m) -> str:
    text = f"ACC {m.acc:.2f}% ({m.clean_samples} clean)"
    if m.asr is not None:
        text += f"  ASR {m.asr:.2f}%  RA {m.ra:.2f}% ({m.poisoned_samples} triggered)"
    return text


if __name__ == "__main__":  # pragma: no cover
    main()
