"""hhtld: compress transformer weights into one .hhtld pack and prove what it cost."""

__version__ = "0.1.0"

from .checkpoint import Checkpoint, TensorInfo, open_checkpoint  # noqa: E402
from .classify import (  # noqa: E402
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
from .codecs import (  # noqa: E402
    CODECS,
    FisherZTable,
    HhtlF32Tensor,
    SharedPaletteGroup,
    SvdBasis,
    build_group_with_fisher_z,
    build_group_with_leaf,
    make_codec,
)
from .errors import (  # noqa: E402
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
from .pack import Pack, decode_pack, encode_checkpoint, open_pack  # noqa: E402
from .codecs.hhtl_d import HhtlDEntry, HhtlDTensor, build_hhtl_d_group  # noqa: E402
from .codecs.fisher_quality import FisherZQuality, fisher_z_quality  # noqa: E402
from .probe import AttentionProbeResult, probe_attention  # noqa: E402
from .budget import LADDER, Allocation, encode_budget  # noqa: E402
from .codecs import FamilyGamma, HhtlCache, slot_l_byte_size, svd_basis_byte_size  # noqa: E402
from .codecs.hhtl_vq_codec import HhtlVqCodec  # noqa: E402
from .format import CodecId, HeelBasin, RouteAction  # noqa: E402
from .inspect import inspect_path  # noqa: E402
from .gates import (  # noqa: E402  (torch/transformers/matplotlib load only when used)
    ModelRunner,
    Thresholds,
    VerifyReport,
    calibration_texts,
    compare_outputs,
    heldout_texts,
    verify,
)

from .loader import (  # noqa: E402  (torch/transformers load only when called)
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
    "CODECS", "Checkpoint", "CheckpointError", "CodecError", "EncodablePolicy", "FisherZTable",
    "GateError", "GroupKey", "HhtlF32Tensor", "HhtldError", "OptionsError", "Pack", "PackError",
    "RoleRule", "RuleTable", "SharedPaletteGroup", "SvdBasis", "TensorInfo", "__version__",
    "build_group_with_fisher_z", "build_group_with_leaf", "classify_component", "classify_role",
    "decode_pack", "effective_shape", "encode_checkpoint", "is_encodable", "make_codec",
    "open_checkpoint", "open_pack", "plan_checkpoint", "should_use_leaf",
    # verify (issue 3)
    "ModelRunner", "Thresholds", "VerifyReport", "calibration_texts", "compare_outputs",
    "heldout_texts", "verify",
    # budget codec and rate allocation (issue 5)
    "Allocation", "HhtlVqCodec", "LADDER", "encode_budget",
    # format and codec parts
    "CodecId", "FamilyGamma", "HeelBasin", "HhtlCache", "RouteAction", "inspect_path", "slot_l_byte_size",
    "svd_basis_byte_size",
    # lookup grade and the attention probe (issue 4)
    "AttentionProbeResult", "FisherZQuality", "HhtlDEntry", "HhtlDTensor", "build_hhtl_d_group",
    "fisher_z_quality", "probe_attention",
    # use a pack directly
    "ArchitectureError", "Generation", "LoadError", "LoadInfo", "MissingDependencyError", "NoConfigError",
    "TensorMismatchError", "embed", "embedding_pooling", "generate", "load", "load_sentence_transformer",
    "load_tokenizer", "weight_memory",
]
