"""vadusa: several speech tokens per forward pass for codec language models."""

from .accept import ACCEPTANCE_RULES
from .batch import left_pad
from .cpu import transpose_linear_weights
from .decoders import DECODERS, build_decoder
from .drafter import DrafterConfig, FeatureDrafter, load_drafter
from .dynamic import DynamicTree
from .generate import GenerationOutput, generate, generate_ar
from .heads import DraftHeads, HeadsConfig
from .hf import custom_generate
from .tree import Tree

__all__ = [
    "ACCEPTANCE_RULES",
    "DECODERS",
    "DraftHeads",
    "DrafterConfig",
    "DynamicTree",
    "FeatureDrafter",
    "GenerationOutput",
    "HeadsConfig",
    "Tree",
    "build_decoder",
    "custom_generate",
    "generate",
    "generate_ar",
    "left_pad",
    "load_drafter",
    "transpose_linear_weights",
]
