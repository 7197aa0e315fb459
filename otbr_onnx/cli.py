"""Command line: parses the options, calls one function of ``otbr_onnx.commands`` per command and
exits with its code. What each command does and prints lives there (and in ``terminal``).

Exit codes: 0 ok, 1 internal error (a bug: please report), 2 bad usage or unreadable model,
3 unsupported model (refused), 4 parity failure, 5 verify found a difference, 6 scan suspects a
backdoor, 130 interrupted, 141 the reader of standard output went away (``| head``: as a
process killed by SIGPIPE). Every error is one line on
stderr; ``--debug`` adds the traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from otbr_onnx import removers
from otbr_onnx.cli_types import FLOATS, RANGE, SHAPE, SIZE, DataPath, RegularFile
from otbr_onnx.cli_types import Shape as _Shape  # noqa: F401 - the name tests patch while click parses
from otbr_onnx.errors import EXIT_SUSPECTED  # noqa: F401 - scan's exit code, importable from here
from otbr_onnx.errors import exit_interrupted, interrupts_deferred, printable, watch_interrupts
from otbr_onnx.executors import EXECUTORS
from otbr_onnx.load import Limits
from otbr_onnx.options import DEVICES, MAX_ACC_DROP, METHODS, ORT_PROVIDERS, RANKINGS, RESIDUAL_PICKERS, default
from otbr_onnx.terminal import PrintableFormatter as _PrintableFormatter  # noqa: F401 - kept importable here
from otbr_onnx.terminal import StageLog  # noqa: F401 - kept importable here
from otbr_onnx.terminal import run_guarded as _run
from otbr_onnx.terminal import setup_logging as _logging


def _exit(code: int) -> None:
    """A command's exit code; 0 returns, as click does when the command returns."""
    if code:
        sys.exit(code)


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
        click.option("--data", "data_path", type=DataPath(),
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
def scan(models: tuple[Path, ...], verbose: int, debug: bool, **given) -> None:
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
            from otbr_onnx.commands.scan import scan_command

        _exit(scan_command(list(models), given, _arguments()))

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
@click.option("--unlearn-residual", type=click.Choice(RESIDUAL_PICKERS), default=default("removal.unlearn_residual"),
              show_default=True,
              help="With the relearning remover: search the relearnt model for a class it still serves (minimal: "
                   "the minimal-trigger statistic; scan: the scan's tests; off: no search) and unlearn that "
                   "class's triggers within the --max-acc-drop budget relearning left; kept only if the whole "
                   "cleaning stays within it.")
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
                   "else pruning. See docs/method.md.")
@click.option("--calibration", type=RegularFile(),
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
def clean(models: tuple[Path, ...], output: Path, verbose: int, debug: bool, **given) -> None:
    """Scan MODEL, remove the backdoor it finds, check that it is gone, and write OUTPUT.

    \b
    1. scan: data-free maximum-margin detection (see `otbr-onnx scan`), and with --data trigger
       inversion on your images; without --data, nothing suspected: OUTPUT is MODEL, byte for
       byte ("model unchanged"), unless --always;
    2. with --data (remover relearning, the default there): EVERY model is sanitized, flagged or
       not (--only-if-flagged: only flagged ones): a copy forgets, then relearns the original's
       answers on your images; a quarter of them, held out, must keep the expected accuracy
       cost within --max-acc-drop, else refused (exit 3), or, for a model the scan passed,
       handed back unchanged;
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
            from otbr_onnx.commands.clean import clean_command

        _exit(clean_command(list(models), output, given, _arguments()))

    _run(debug, action)


@main.command("eval")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--data", "data_path", required=True, type=RegularFile(),
              help="npz with x_clean/y_clean (and optionally x_poisoned/y_poisoned), or x/y.")
@click.option("--poisoned", "poisoned_path", type=RegularFile(),
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
            from otbr_onnx.commands.evaluate import eval_command as evaluate

        _exit(evaluate(model, data_path, poisoned_path, target, original_path, Limits(**limits), as_json))

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
            from otbr_onnx.commands.inspect import inspect_command as describe

        _exit(describe(model, input_shape, output_name, Limits(**limits), as_json))

    _run(debug, action)


@main.command("report")
@click.argument("report_file", metavar="REPORT", type=RegularFile())
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
            from otbr_onnx.commands.report import report_command as render

        _exit(render(report_file, html_path, max_file_bytes))

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
def verify_command(original: Path, cleaned: Path, debug: bool, **given) -> None:
    """Check that CLEANED is ORIGINAL with only weight values changed (exit 5 if not): a changed
    value of any initializer that is not a weight-layer weight or bias is a graph difference.

    With --scan, both models are scanned (see `otbr-onnx scan`): the margins show whether the
    class the original's backdoor served is still abnormally reachable in CLEANED.

    Either model not a classifier (a segmentation map, no class scores): refused, exit 3, as
    there are no class answers to compare."""

    def action() -> None:
        with interrupts_deferred():
            from otbr_onnx.commands.verify import verify_command as verify

        _exit(verify(original, cleaned, given))

    _run(debug, action)


if __name__ == "__main__":  # pragma: no cover
    main()
