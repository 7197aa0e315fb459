"""Speed and memory of ``clean`` against the floor of the paper's random unlearning.

For each model this times every stage of ``clean`` (from the report) and, in the same run,
the *floor*: the bare I forward+backward+SGD steps at batch B on the same converted module,
what the paper's method cannot avoid (the previous default's cost was about 1.3x this floor).
Each model runs in its own subprocess so its peak RSS is its own. Needs no data and no network
(models are randomly initialised). ``--mode`` picks the path timed (see ``measure``).

    python benchmarks/speed.py --models small preact18                  # removal path, SPEED.md
    python benchmarks/speed.py --mode default --out /tmp/SPEED-default.md  # a model found clean

About 5 minutes on 2 CPU cores for small and preact18.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "models"))

# name -> (input shape, PreActResNet kwargs)
MODELS = {
    "small": ((1, 1, 28, 28), dict(in_channels=1, widths=(16, 32, 64), blocks=(1, 1, 1))),
    "preact18": ((1, 3, 32, 32), dict(in_channels=3, widths=(64, 128, 256, 512), blocks=(2, 2, 2, 2))),
    "preact34": ((1, 3, 32, 32), dict(in_channels=3, widths=(64, 128, 256, 512), blocks=(3, 4, 6, 3))),
    "preact18-wide": ((1, 3, 32, 32), dict(in_channels=3, widths=(96, 192, 384, 768), blocks=(2, 2, 2, 2))),
    # torchvision's ResNet-50 at 224x224, randomly initialised (no download), with open-nsfw's two
    # classes: with 1000 the scan alone is ~50k forward+backward passes (hours on 2 cores)
    "resnet50-224": ((1, 3, 224, 224), None),
}
STAGES = ["prepare", "scan", "ranking", "ratio_selection", "repair", "rescan", "write_back_parity"]


def export_model(name: str, path: Path) -> int:
    import torch
    from architectures import PreActResNet

    from tests.builders import export, randomise_bn

    shape, kwargs = MODELS[name]
    torch.manual_seed(0)
    if kwargs is None:
        import torchvision

        net = randomise_bn(torchvision.models.resnet50(weights=None, num_classes=2))
    else:
        net = randomise_bn(PreActResNet(num_classes=10, **kwargs))
    path.write_bytes(export(net, shape).SerializeToString())
    return sum(p.numel() for p in net.parameters())


def floor_seconds(path: Path, iterations: int, batch_size: int) -> float:
    """The bare unlearning loop on the converted module: I x (forward, backward, step)."""
    import copy

    import onnx
    import torch

    from converters.to_torch import convert

    proto = onnx.load(path)
    module = copy.deepcopy(convert(proto)).train()
    shape = [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim][1:]
    optimizer = torch.optim.SGD(module.parameters(), lr=1e-3, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for _ in range(iterations):
        x = torch.rand((batch_size, *shape), generator=gen)
        y = torch.randint(0, 10, (batch_size,), generator=gen)
        loss = -torch.nn.functional.cross_entropy(module(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return time.perf_counter() - start


def measure(name: str, iterations: int, batch_size: int, prune_ratio: float | None, mode: str) -> dict:
    """Runs inside the subprocess for one model.

    Random weights: no scan flags such a model, so ``default`` times what ``clean`` does to a
    model it finds clean (prepare and scan, then the input handed back). ``removal`` times the path
    of a flagged model: scan, activation ranking (of the class with the largest z), prune and fuse
    at ``prune_ratio`` (default 0.02), one rescan, write-back and parity. ``nwc`` is the previous
    default: random unlearning and the fidelity-first scan of every candidate (budget 100%).
    """
    from otbr_onnx import CleanOptions, RunOptions, clean

    on_cpu = CleanOptions(run=RunOptions(device="cpu"))
    modes = {
        "default": on_cpu,
        "removal": on_cpu.with_(removal={"always": True, "ranking": "activation", "prune_ratio": prune_ratio or 0.02}),
        "nwc": on_cpu.with_(removal={"always": True, "ranking": "nwc", "iterations": iterations,
                                     "batch_size": batch_size, "prune_ratio": prune_ratio, "max_disagreement": 100.0}),
    }
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"{name}.onnx"
        # exported in another process: tracing a ResNet-50 would otherwise count in this one's peak
        params = int(subprocess.run([sys.executable, __file__, "--export", name, str(path)], capture_output=True,
                                    text=True, check=True, cwd=ROOT).stdout.split()[-1])
        # the bare loop at B = 256 is not what clean runs at 224x224 (it splits the batch to fit
        # --max-memory) and alone needs ~16 GB there: no floor for such models
        floor = floor_seconds(path, iterations, batch_size) if MODELS[name][1] is not None else float("nan")
        start = time.perf_counter()
        result = clean(path, modes[mode])
        total = time.perf_counter() - start
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"model": name, "params": params, "floor": floor, "total": total, "stages": result.report["seconds"],
            "peak_rss_mib": peak_mib}


def run_child(name: str, iterations: int, batch_size: int, prune_ratio: float | None, mode: str) -> dict:
    ratio = [] if prune_ratio is None else ["--prune-ratio", str(prune_ratio)]
    done = subprocess.run(
        [sys.executable, __file__, "--child", name, "--iterations", str(iterations), "--batch-size", str(batch_size),
         "--mode", mode, *ratio],
        capture_output=True, text=True, check=True, cwd=ROOT,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(rows: list[dict], iterations: int, batch_size: int) -> str:
    import torch

    head = ["model", "params (M)"] + STAGES + ["total s", "floor s", "total/floor", "peak RSS MiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["model"], f"{r['params'] / 1e6:.2f}"] + [f"{r['stages'].get(s, 0):.2f}" for s in STAGES]
        cells += [f"{r['total']:.1f}", f"{r['floor']:.1f}", f"{r['total'] / r['floor']:.2f}", f"{r['peak_rss_mib']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    growth = ""
    if len(rows) > 1:
        base = min(rows, key=lambda r: r["params"])
        growth = "\n".join(
            f"- {r['model']}: {r['params'] / base['params']:.1f}x the parameters of {base['model']}, "
            f"{r['total'] / base['total']:.1f}x its total time" for r in rows if r is not base)
    return (f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
            f"torch {torch.__version__} with {torch.get_num_threads()} threads; I = {iterations} steps, "
            f"B = {batch_size}.\n\n" + "\n".join(lines) + "\n\n" + growth + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "SPEED.md")
    parser.add_argument("--prune-ratio", type=float, default=None,
                        help="fix gamma (skips the data-free ratio selection); default: chosen as clean does")
    parser.add_argument("--mode", choices=["default", "removal", "nwc"], default="removal",
                        help="what to time (see measure); default: the removal path of a flagged model")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--export", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.export:
        print(export_model(args.export[0], Path(args.export[1])))
        return
    if args.child:
        print(json.dumps(measure(args.child, args.iterations, args.batch_size, args.prune_ratio, args.mode)))
        return
    rows = []
    for name in args.models:
        rows.append(run_child(name, args.iterations, args.batch_size, args.prune_ratio, args.mode))
        print(f"{name}: total {rows[-1]['total']:.1f}s floor {rows[-1]['floor']:.1f}s "
              f"peak {rows[-1]['peak_rss_mib']:.0f} MiB", file=sys.stderr, flush=True)
    text = table(rows, args.iterations, args.batch_size)
    print(text)
    command = "python benchmarks/speed.py " + " ".join(sys.argv[1:])
    args.out.write_text(f"# Speed and memory of `clean` ({args.mode})\n\nCommand: `{command.strip()}`\n\n{text}")


if __name__ == "__main__":
    main()
