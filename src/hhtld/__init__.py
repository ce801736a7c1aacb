"""hhtld: compress transformer weights into one .hhtld pack and prove what it cost.

The public API, layer by layer: checkpoint reading → classification → codecs →
pack → budget and calibration → gates → using a pack (load, embed, generate).
torch, transformers and matplotlib are imported only when a function that
needs them is called.
"""

from ._version import __version__
from .errors import (
    ArchitectureError,
    CheckpointError,
    CodecError,
    GateError,
    HhtldError,
    LoadError,
    MissingDependencyError,
    NoConfigError,
    OptionsError,
    PackError,
    TensorMismatchError,
)
from .format import CodecId, HeelBasin, RouteAction

# reading a checkpoint; classifying its tensors into groups
from .checkpoint import Checkpoint, TensorInfo, open_checkpoint
from .classify import (
    EncodablePolicy,
    GroupKey,
    RoleRule,
    RuleTable,
    classify_component,
    classify_role,
    effective_shape,
    is_encodable,
    plan_checkpoint,
    should_use_leaf,
)

# codecs: the registry, the budget codec and the reference family's structures
from .codecs import (
    CODECS,
    FamilyGamma,
    FisherZQuality,
    FisherZTable,
    HhtlCache,
    HhtlDEntry,
    HhtlDTensor,
    HhtlF32Tensor,
    HhtlVqCodec,
    SharedPaletteGroup,
    SvdBasis,
    build_group_with_fisher_z,
    build_group_with_leaf,
    build_hhtl_d_group,
    fisher_z_quality,
    make_codec,
    slot_l_byte_size,
    svd_basis_byte_size,
)

# the pack: encode, open, decode, inspect
from .pack import Pack, decode_pack, encode_checkpoint, open_pack
from .inspect import inspect_path

# choosing the bits: data-free budgets and the calibrated behaviour target
from .budget import LADDER, Allocation
from .encoding import EncodeReport, encode, encode_budget

# gates and probes
from .gates import (
    ModelRunner,
    Thresholds,
    VerifyReport,
    calibration_texts,
    compare_outputs,
    heldout_texts,
    verify,
)
from .probe import AttentionProbeResult, probe_attention

# using a pack directly
from .loader import (
    Generation,
    LoadInfo,
    embed,
    embedding_pooling,
    generate,
    load,
    load_sentence_transformer,
    load_tokenizer,
    weight_memory,
)

__all__ = [
    "__version__",
    # errors and format constants
    "ArchitectureError", "CheckpointError", "CodecError", "GateError", "HhtldError", "LoadError",
    "MissingDependencyError", "NoConfigError", "OptionsError", "PackError", "TensorMismatchError",
    "CodecId", "HeelBasin", "RouteAction",
    # checkpoint and classification
    "Checkpoint", "TensorInfo", "open_checkpoint",
    "EncodablePolicy", "GroupKey", "RoleRule", "RuleTable", "classify_component", "classify_role",
    "effective_shape", "is_encodable", "plan_checkpoint", "should_use_leaf",
    # codecs
    "CODECS", "FamilyGamma", "FisherZQuality", "FisherZTable", "HhtlCache", "HhtlDEntry", "HhtlDTensor",
    "HhtlF32Tensor", "HhtlVqCodec", "SharedPaletteGroup", "SvdBasis", "build_group_with_fisher_z",
    "build_group_with_leaf", "build_hhtl_d_group", "fisher_z_quality", "make_codec", "slot_l_byte_size",
    "svd_basis_byte_size",
    # pack
    "Pack", "decode_pack", "encode_checkpoint", "open_pack", "inspect_path",
    # budget
    "Allocation", "LADDER", "EncodeReport", "encode", "encode_budget",
    # gates and probes
    "ModelRunner", "Thresholds", "VerifyReport", "calibration_texts", "compare_outputs", "heldout_texts",
    "verify", "AttentionProbeResult", "probe_attention",
    # using a pack
    "Generation", "LoadInfo", "embed", "embedding_pooling", "generate", "load", "load_sentence_transformer",
    "load_tokenizer", "weight_memory",
]
