"""Train the demo backdoored model and write models/demo_badnets.onnx and models/demo_eval.npz.

A small pre-activation ResNet is trained on Fashion-MNIST poisoned with BadNets under
BackdoorBench's conventions (3x3 white patch bottom-right, all-to-one, target 0, 10% of the
training set), exported to ONNX, and measured with onnxruntime on the exported file so the
numbers describe exactly what the defense will be given.

Run from the repository root:  python models/make_demo.py
Needs Debian's dataset-fashion-mnist; takes about 5 minutes on 2 CPU cores.
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

MODELS_DIR = Path(__file__).resolve().parent
# Run as a script, sys.path holds only models/: add the repo root so otbr_onnx imports too.
sys.path[:0] = [str(MODELS_DIR), str(MODELS_DIR.parent)]

import onnxruntime as ort  # noqa: E402

from architectures import PreActResNet  # noqa: E402
from benchmarks.datasets import load_fashion_mnist  # noqa: E402
from benchmarks.triggers import TRIGGERS, poison_dataset  # noqa: E402

ATTACK = "badnets"
TARGET = 0
POISON_RATIO = 0.1
SEED = 0
EVAL_SAMPLES = 1000


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate of the one-cycle schedule")
    parser.add_argument("--out-dir", type=Path, default=MODELS_DIR)
    return parser.parse_args()


def seed_everything(seed: int) -> None:
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def build_model() -> torch.nn.Module:
    return PreActResNet(in_channels=1, num_classes=10, widths=(16, 32, 64), blocks=(1, 1, 1))


@torch.no_grad()
def torch_accuracy(model: torch.nn.Module, x: np.ndarray, y: np.ndarray, batch: int = 1000) -> float:
    model.eval()
    hits = 0
    for start in range(0, len(x), batch):
        xb = torch.from_numpy(x[start : start + batch]).contiguous(memory_format=torch.channels_last)
        hits += int((model(xb).argmax(1).numpy() == y[start : start + batch]).sum())
    return hits / len(x)


def train(
    model: torch.nn.Module, x: np.ndarray, y: np.ndarray, x_val: np.ndarray, y_val: np.ndarray, args: argparse.Namespace
) -> None:
    """Adam with a one-cycle schedule: reaches good accuracy in few epochs without tuning."""
    # channels_last is markedly faster for these small convs on CPU.
    model.to(memory_format=torch.channels_last)
    steps_per_epoch = int(np.ceil(len(x) / args.batch_size))
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.lr, total_steps=args.epochs * steps_per_epoch)
    generator = torch.Generator().manual_seed(SEED)
    x_t, y_t = torch.from_numpy(x), torch.from_numpy(y)
    for epoch in range(args.epochs):
        model.train()
        start, total_loss = time.time(), 0.0
        for batch in torch.randperm(len(x), generator=generator).split(args.batch_size):
            logits = model(x_t[batch].contiguous(memory_format=torch.channels_last))
            loss = F.cross_entropy(logits, y_t[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total_loss += loss.item() * len(batch)
        print(
            f"epoch {epoch + 1}/{args.epochs}: loss {total_loss / len(x):.4f}, "
            f"val clean acc {torch_accuracy(model, x_val, y_val):.4f}, {time.time() - start:.0f}s",
            flush=True,
        )


def export_onnx(model: torch.nn.Module, path: Path) -> None:
    """Legacy (TorchScript) exporter at opset 17, as the project's tests and docs assume."""
    model.eval().to(memory_format=torch.contiguous_format)
    torch.onnx.export(
        model,
        (torch.zeros(1, 1, 28, 28),),
        str(path),
        dynamo=False,
        opset_version=17,
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
    )


def onnx_predict(path: Path, x: np.ndarray, batch: int = 1000) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outputs = [session.run(["logits"], {"input": x[i : i + batch]})[0] for i in range(0, len(x), batch)]
    return np.concatenate(outputs).argmax(1)


def triggered_non_target(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """BackdoorBench's ASR set: every test image not already of the target class, with the trigger."""
    keep = y != TARGET
    return TRIGGERS[ATTACK](x[keep]), y[keep]


def save_eval_set(path: Path, x_test: np.ndarray, y_test: np.ndarray, x_bd: np.ndarray, y_bd: np.ndarray) -> None:
    """A small fixed evaluation set so a defense can report ACC/ASR without the dataset installed."""
    rng = np.random.default_rng(SEED)
    clean = np.sort(rng.choice(len(x_test), EVAL_SAMPLES, replace=False))
    poisoned = np.sort(rng.choice(len(x_bd), EVAL_SAMPLES, replace=False))
    np.savez_compressed(
        path,
        x_clean=x_test[clean],
        y_clean=y_test[clean],
        x_poisoned=x_bd[poisoned],
        y_poisoned=y_bd[poisoned],
        target=np.int64(TARGET),
        attack=np.str_(ATTACK),
    )


def main() -> None:
    args = parse_args()
    torch.set_num_threads(2)
    seed_everything(SEED)
    began = time.time()

    x_train, y_train = load_fashion_mnist("train")
    x_test, y_test = load_fashion_mnist("test")
    x_train, y_train, poisoned = poison_dataset(x_train, y_train, ATTACK, TARGET, POISON_RATIO, seed=SEED)
    print(f"poisoned {len(poisoned)} of {len(x_train)} training images ({ATTACK}, target {TARGET})")

    model = build_model()
    train(model, x_train, y_train, x_test, y_test, args)
    train_seconds = time.time() - began

    args.out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = args.out_dir / "demo_badnets.onnx"
    export_onnx(model, onnx_path)

    x_bd, y_bd = triggered_non_target(x_test, y_test)
    acc = float(np.mean(onnx_predict(onnx_path, x_test) == y_test))
    asr = float(np.mean(onnx_predict(onnx_path, x_bd) == TARGET))
    save_eval_set(args.out_dir / "demo_eval.npz", x_test, y_test, x_bd, y_bd)

    print(f"training time {train_seconds:.0f}s, total {time.time() - began:.0f}s")
    print(f"{onnx_path.name}: {onnx_path.stat().st_size / 1e6:.2f} MB")
    print(f"ACC {acc:.4f} (clean test, n={len(x_test)})  ASR {asr:.4f} (triggered non-target test, n={len(x_bd)})")


if __name__ == "__main__":
    main()
