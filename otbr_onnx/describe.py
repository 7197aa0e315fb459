"""``inspect``: what ``clean`` would see and do, without changing anything or unlearning."""

from __future__ import annotations

from pathlib import Path

from otbr_onnx.errors import OtbrError
from otbr_onnx.layers import find_weight_layers, reachable_layers
from otbr_onnx.load import Limits, check_noise_budget, load_model
from otbr_onnx.ties import analyse


CLEAN_BATCH_SIZE = 256  # clean's default --batch-size, for the noise-budget check


def describe(path: str | Path, input_shape: tuple[int, ...] | None = None, output_name: str | None = None,
             limits: Limits = Limits(), batch_size: int = CLEAN_BATCH_SIZE) -> dict:
    """Interface, weight layers, channel-tie groups and the verdict ``clean`` would reach.

    Load errors propagate (the model cannot be described at all: ``load_model`` holds the checks
    both commands share, the class-score output among them); problems found later are reported
    in ``verdict`` so the rest of the description is still shown. The checks after loading are
    the ones ``clean`` makes before converting, in the same order; what only a conversion or the
    ratio scan can show (PyTorch parity, the fidelity budget) inspect cannot promise.
    """
    from otbr_onnx.bridge import check_convertible

    loaded = load_model(path, input_shape, output_name, limits)
    proto = loaded.proto
    info = {
        "path": str(path),
        "sha256": loaded.sha256,
        "opset": loaded.opset,
        "producer": f"{proto.producer_name} {proto.producer_version}".strip(),
        "input": {"name": loaded.input_name, "shape": list(loaded.input_shape), "batch": loaded.batch.as_dict()},
        "output": {"name": loaded.output_name, "probabilities": loaded.output_is_probability,
                   "single_score": loaded.single_score},
        "nodes": len(proto.graph.node),
        "layers": [],
        "skipped_layers": [],
        "tie_groups": {},
        "verdict": "clean would run",
    }
    try:
        working = loaded.working  # weights resolved through Constant / Identity / Cast / DequantizeLinear
        info["storage"] = loaded.storage.counts()
        layers, skipped = find_weight_layers(working, loaded.storage.shared)
        info["skipped_layers"] = [{"node": s.node_name, "op": s.op_type, "reason": s.reason} for s in skipped]
        layers, skipped = reachable_layers(working, layers, skipped, loaded.output_name)
        info["skipped_layers"] = [{"node": s.node_name, "op": s.op_type, "reason": s.reason} for s in skipped]
        check_convertible(working)
        if not layers:
            raise OtbrError("no weight layer to clean")
        check_noise_budget(loaded.input_shape, batch_size, limits)
        ties = analyse(working, layers, loaded.input_name, loaded.input_shape, loaded.shapes)
    except OtbrError as error:
        info["verdict"] = f"clean would refuse: {error}"
        return info
    for i, layer in enumerate(layers):
        info["layers"].append({
            "node": layer.label, "op": layer.op_type, "neurons": layer.out_channels, "role": ties.roles[i],
            "group": ties.groups[i], "head": i in ties.heads, "pinned_because": ties.pin_reasons.get(i),
        })
    info["tie_groups"] = {str(g): [layers[i].label for i in m] for g, m in ties.tied_groups().items()}
    return info
