"""hhtld: compress transformer weights into one .hhtld pack and prove what it cost.

The verbs are here; everything else is reached through its subpackage, layer
by layer (docs/design.md, "Layers"): ``hhtld.checkpoint`` (reading) →
``hhtld.classify`` (roles and groups) → ``hhtld.codecs`` → ``hhtld.pack`` →
``hhtld.budget`` and ``hhtld.calibrate`` (choosing the bits) →
``hhtld.encoding`` (:func:`encode`) → ``hhtld.gates`` (verify) →
``hhtld.kernels`` and ``hhtld.loader`` (using a pack). torch, transformers and
matplotlib are imported only when a function that needs them is called.
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
from .checkpoint import open_checkpoint
from .encoding import encode
from .pack import decode_pack as decode, open_pack as open  # noqa: A001 (hhtld.open, as safetensors.safe_open)
from .inspection import inspect_path as inspect
from .gates import verify
from .probe import probe_attention
from .loader import embed, generate, load, load_sentence_transformer, load_tokenizer, weight_memory
from .loader.hf_folder import export_hf

__all__ = [
    "__version__",
    # the verbs
    "open_checkpoint", "encode", "decode", "open", "inspect", "verify", "probe_attention",
    "load", "load_tokenizer", "load_sentence_transformer", "embed", "generate", "weight_memory", "export_hf",
    # the errors
    "ArchitectureError", "CheckpointError", "CodecError", "GateError", "HhtldError", "LoadError",
    "MissingDependencyError", "NoConfigError", "OptionsError", "PackError", "TensorMismatchError",
]

# Names the package root exported before it held only the verbs: they keep working for one
# release, with a DeprecationWarning that names their place (attribute of the module).
_MOVED = {
    "CodecId": "hhtld.format", "HeelBasin": "hhtld.format", "RouteAction": "hhtld.format",
    "Checkpoint": "hhtld.checkpoint", "TensorInfo": "hhtld.checkpoint",
    "EncodablePolicy": "hhtld.classify", "GroupKey": "hhtld.classify", "RoleRule": "hhtld.classify",
    "RuleTable": "hhtld.classify", "classify_component": "hhtld.classify", "classify_role": "hhtld.classify",
    "effective_shape": "hhtld.classify", "is_encodable": "hhtld.classify", "plan_checkpoint": "hhtld.classify",
    "should_use_leaf": "hhtld.classify",
    "CODECS": "hhtld.codecs", "FamilyGamma": "hhtld.codecs", "FisherZQuality": "hhtld.codecs",
    "FisherZTable": "hhtld.codecs", "HhtlCache": "hhtld.codecs", "HhtlDEntry": "hhtld.codecs",
    "HhtlDTensor": "hhtld.codecs", "HhtlF32Tensor": "hhtld.codecs", "HhtlVqCodec": "hhtld.codecs",
    "SharedPaletteGroup": "hhtld.codecs", "SvdBasis": "hhtld.codecs", "build_group_with_fisher_z": "hhtld.codecs",
    "build_group_with_leaf": "hhtld.codecs", "build_hhtl_d_group": "hhtld.codecs",
    "fisher_z_quality": "hhtld.codecs", "make_codec": "hhtld.codecs", "slot_l_byte_size": "hhtld.codecs",
    "svd_basis_byte_size": "hhtld.codecs",
    "Pack": "hhtld.pack", "encode_checkpoint": "hhtld.pack", "decode_pack": "hhtld.pack", "open_pack": "hhtld.pack",
    "inspect_path": "hhtld.inspection",
    "Allocation": "hhtld.budget", "LADDER": "hhtld.budget",
    "EncodeReport": "hhtld.encoding", "encode_budget": "hhtld.encoding",
    "ModelRunner": "hhtld.gates", "Thresholds": "hhtld.gates", "VerifyReport": "hhtld.gates",
    "calibration_texts": "hhtld.gates", "compare_outputs": "hhtld.gates", "heldout_texts": "hhtld.gates",
    "AttentionProbeResult": "hhtld.probe",
    "Generation": "hhtld.loader", "LoadInfo": "hhtld.loader", "embedding_pooling": "hhtld.loader",
}
_INSTEAD = {"encode_checkpoint": "hhtld.encode", "decode_pack": "hhtld.decode", "open_pack": "hhtld.open",
            "inspect_path": "hhtld.inspect", "encode_budget": "hhtld.encode"}


def __getattr__(name: str):
    where = _MOVED.get(name)
    if where is None:
        raise AttributeError(f"module 'hhtld' has no attribute '{name}'")
    import importlib
    import warnings

    also = f" (or {_INSTEAD[name]})" if name in _INSTEAD else ""
    warnings.warn(f"hhtld.{name} is deprecated and will be removed in the next release; use {where}.{name}{also}",
                  DeprecationWarning, stacklevel=2)
    got = getattr(importlib.import_module(where), name)
    if name == "encode_checkpoint":  # the root's name kept its former default codec
        def encode_checkpoint(model, out, codec="hhtl-f32", *args, **kwargs):
            return got(model, out, codec, *args, **kwargs)

        return encode_checkpoint
    return got


def __dir__() -> list[str]:
    return sorted(set(__all__) | set(_MOVED))
