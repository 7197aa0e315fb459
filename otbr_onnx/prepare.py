"""Stage 1 (prepare): load and validate the ONNX model, find its weight layers and channel ties, convert it to
PyTorch and check the conversion against onnxruntime, all once.

The result, ``PreparedModel``, is the state every later stage reads. Its ``module`` is the
reference: no stage writes into it (candidates are evaluated on copies, see ``with_weights``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
from torch import nn

from converters import parity, runtime
from converters.parity import Parity
from converters.to_torch import TorchTensorRef, run_torch
from otbr_onnx import sizing
from otbr_onnx.bridge import batchnorm_refs, convert, providers, weight_refs
from otbr_onnx.budget import check_work
from otbr_onnx.detectors.margin import ScanConfig, search_images
from otbr_onnx.errors import UnsupportedModelError, one_line
from otbr_onnx.fuse import Neurons
from otbr_onnx.layers import SkippedLayer, WeightLayer, find_weight_layers, reachable_layers, to_rows
from otbr_onnx.load import LoadedModel, check_noise_budget, load_model, load_proto
from otbr_onnx.options import CleanOptions
from otbr_onnx.ties import ChannelTies, analyse
from otbr_onnx.unlearn import resolve_device

PARITY_SAMPLES = 8


@dataclass
class PreparedModel:
    """A validated model and everything derived from it once."""

    loaded: LoadedModel
    layers: list[WeightLayer]
    skipped: list[SkippedLayer]
    ties: ChannelTies
    module: nn.Module  # the converted reference, eval mode; never written to
    # initializer name -> where it lives in the module: the weight layers' weights and biases, and the
    # BatchNorm statistics that can be written back (converters.storage.resolve_statistics)
    refs: dict[str, TorchTensorRef]
    original: dict[str, np.ndarray]  # initializer name -> its value in the input model
    num_classes: int
    device: str
    parity_inputs: np.ndarray  # the random inputs both parity checks use
    conversion_parity: Parity
    providers: list[str]
    # max abs logit difference between the stored model (float16 / int8 ...) and its float32
    # working copy before cleaning: the parity of the written model allows a multiple of it
    precision_gap: float = 0.0
    memory: sizing.MemoryPlan | None = None  # the budget and the micro-batch chosen from it
    chunking: sizing.Chunking = sizing.Chunking()  # images per forward pass (inference, scan, rescan)
    probe_chunking: sizing.Chunking = sizing.Chunking()  # per probe pass: the BatchNorm prior costs more

    @property
    def scan_block(self) -> int | None:
        """Images the scan's margin search holds at once (None: all; ``sizing.search_block``)."""
        return self.memory.scan_block if self.memory is not None else None

    def neurons(self, i: int) -> Neurons:
        """Layer ``i``'s backdoored rows ``[out, in, ...]`` and bias."""
        layer = self.layers[i]
        bias = self.original[layer.bias] if layer.bias else None
        return Neurons(to_rows(layer, self.original[layer.weight]), bias)

    def with_weights(self, weights: dict[str, np.ndarray]) -> nn.Module:
        """A copy of the reference module with ``weights`` (ONNX layout) written in."""
        module = copy.deepcopy(self.module)
        for name, value in weights.items():
            self.refs[name].write(module, value)
        return module.eval()

    def outputs(self, module: nn.Module, x: np.ndarray) -> np.ndarray:
        """``module``'s class scores on ``x`` as (N, classes), ``chunking`` images at a time."""
        return chunked_outputs(module, x, self.loaded.output_index, self.chunking)


def chunked_outputs(module: nn.Module, x: np.ndarray, output_index: int, chunking: sizing.Chunking) -> np.ndarray:
    """``module``'s output on ``x`` as (N, -1), one chunk at a time (padded where the model's
    batch is fixed)."""
    batches = [run_torch(module, chunking.pad(x[start:stop]), output_index)[:stop - start]
               for start, stop in chunking.spans(len(x))]
    return np.concatenate([b.reshape(len(b), -1) for b in batches])


def prepare(model: str | Path | onnx.ModelProto, options: CleanOptions) -> PreparedModel:
    """Load, validate and convert ``model``; refuse what the later stages cannot handle."""
    loaded = _load(model, options)
    working = loaded.working  # every stage but write-back reads the float32 working copy
    layers, skipped = find_weight_layers(working, loaded.storage.shared)
    layers, skipped = reachable_layers(working, layers, skipped, loaded.output_name)
    if not layers:
        raise UnsupportedModelError("no weight layer to clean (Conv, Gemm or MatMul with a constant float weight)")
    check_noise_budget(loaded.input_shape, options.removal.batch_size, options.limits)
    ties = analyse(working, layers, loaded.input_name, loaded.input_shape, loaded.shapes)
    module = convert(working).eval()  # a fixed batch made dynamic where it can be: load.batch_plan
    # the weight layers' tensors, then the BatchNorm statistics a remover may re-estimate
    refs = {**weight_refs(module, working, layers), **batchnorm_refs(module, working, loaded.storage.statistics)}
    providers_ = providers(options.run.ort_provider)
    exact = loaded.batch.exact
    inputs = runtime.random_inputs(loaded.input_shape, PARITY_SAMPLES, options.run.seed + 1,
                                   *options.interface.input_range)
    # the model as given, at its own batch size where fixed (runtime.run chunks it)
    reference = loaded.class_scores(
        runtime.run(runtime.session(loaded.proto, providers_), loaded.input_name, loaded.output_name, inputs))
    gap = _precision_gap(loaded, reference, inputs, providers_)
    # the conversion is exact: judged against the working copy, whose compute it mirrors
    float_reference = reference if gap is None else gap[1]
    first = sizing.Chunking(exact, True) if exact else sizing.Chunking()
    check = parity.compare(float_reference, _first_torch_run(module, inputs, loaded.output_index, first))
    if not check.ok:
        raise UnsupportedModelError(
            f"the PyTorch conversion disagrees with onnxruntime before any change "
            f"(max abs diff {check.max_abs:.3g} > {check.tolerance:.3g}); refusing to clean"
        )
    original = {t.name: numpy_helper.to_array(t) for t in working.graph.initializer if t.name in refs}
    device = resolve_device(options.run.device)
    weight_bytes = sum(value.nbytes for value in original.values())
    # unlearning's batch, held whole
    noise_bytes = 4 * options.removal.batch_size * int(np.prod(loaded.input_shape[1:]))
    classes = _num_classes(reference)
    check_work(classes, options)  # before the memory plan sizes a search over every class
    memory = sizing.memory_plan(module, loaded.input_shape, loaded.batch, weight_bytes, options.run.max_memory, device,
                                noise_bytes, search_images(classes, ScanConfig(starts=options.scan.starts)))
    chunking = first if exact else sizing.Chunking(memory.chunking_size)
    probe_chunking = first if exact else sizing.Chunking(memory.probe_chunking_size)
    return PreparedModel(loaded, layers, skipped, ties, module, refs, original, classes,
                         device, inputs, check, providers_, precision_gap=0.0 if gap is None else gap[0],
                         memory=memory, chunking=chunking, probe_chunking=probe_chunking)


def _precision_gap(loaded: LoadedModel, reference: np.ndarray, inputs: np.ndarray,
                   providers_: list[str]) -> tuple[float, np.ndarray] | None:
    """For a float16 / bfloat16 / int8 model: how far the model as stored is from its float32
    working copy on the parity inputs (max abs logit difference), and the copy's outputs.
    None for a float32 model (the copy computes exactly what the model does)."""
    if not loaded.storage.lossy:
        return None
    floats = runtime.run(runtime.session(loaded.working, providers_), loaded.input_name, loaded.output_name, inputs)
    return parity.compare(reference, floats).max_abs, floats


def _load(model: str | Path | onnx.ModelProto, options: CleanOptions) -> LoadedModel:
    interface = options.interface
    if isinstance(model, onnx.ModelProto):
        return load_proto(model, interface.input_shape, interface.output_name, options.limits)
    return load_model(model, interface.input_shape, interface.output_name, options.limits)


def _first_torch_run(module: nn.Module, inputs: np.ndarray, output_index: int,
                     chunking: sizing.Chunking) -> np.ndarray:
    """The converted module's first forward pass; a crash there is a conversion problem."""
    try:
        return chunked_outputs(module, inputs, output_index, chunking)
    except (RuntimeError, ValueError, TypeError, IndexError) as error:
        raise UnsupportedModelError(
            f"the converted PyTorch model fails to run: {one_line(error, type(error).__name__)}"
        ) from error


def _num_classes(logits: np.ndarray) -> int:
    if logits.ndim != 2 or logits.shape[1] < 2:
        raise UnsupportedModelError(
            f"the output has shape {tuple(logits.shape)}; expected class scores of shape (N, classes)"
        )
    return int(logits.shape[1])
