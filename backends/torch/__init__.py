"""The torch reference backend: eager PyTorch for every stage of a plan.
The oracle for generated kernels and the CPU path of the HF engine."""
from .evaluate import Evaluator, LayerInputs
from .policy import LayerDecision, ModelShape, SequenceRun, TorchPolicy

__all__ = ["Evaluator", "LayerDecision", "LayerInputs", "ModelShape", "SequenceRun", "TorchPolicy"]
