"""transformers loads a pack's Hugging Face folder: the ``hhtld`` quantisation method.

Registered through transformers' extension points for third-party methods
(``register_quantization_config`` / ``register_quantizer``) by ``import hhtld.hf``.
How a folder (:mod:`hhtld.loader.hf_folder`) loads:

1. transformers reads ``config.json``, finds ``quant_method: "hhtld"`` and builds
   :class:`HhtldQuantizer`; before it resolves the weights file, the quantizer
   opens the folder's pack (a missing, damaged or too new pack stops here with
   hhtld's own error) and points ``transformers_weights`` at it instead of the
   stand-in name that plain transformers fails on;
2. transformers builds the model on the ``meta`` device; the quantizer fills it
   from the pack exactly as ``hhtld.load(..., keep_compressed=True)`` does
   (:func:`~hhtld.loader.model.fill_model`): encoded linear and embedding weights
   become hhtld's compressed modules (the fast kernels), never a dense copy, and
   the other tensors are decoded into their parameters;
3. while transformers then reads the checkpoint, every tensor the quantizer filled
   is hidden from ``state_dict()``: none is "missing", so none is re-initialised,
   and the pack's own arrays are "unexpected" and skipped without being read.

``dtype`` works as for any model (the dtype of the dense tensors and of the
compressed layers' computation; float32, the default of an exported folder, is what
the codec-space kernels run on). A pack loads onto one device: ``device_map="auto"``
picks it, a map that spreads the model over devices or onto disk is refused.
``save_pretrained`` is refused before it writes anything (the pack is the saved
form). The integration follows the transformers versions in ``TESTED``: it relies
on the order of the loading steps above, which is not a public contract.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import transformers
from transformers.quantizers.auto import (AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING,
                                          register_quantization_config, register_quantizer)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..errors import LoadError, MissingDependencyError
from ..format import HF_PACK_NAME, HF_QUANT_METHOD, HF_WEIGHTS_STANDIN
from ..kernels.vq import TABLES
from ..pack.reader import Pack
from .compressed import CompressedEmbedding, CompressedLinear
from .model import check_materialised, fill_model

TESTED = ((5, 25),)  # transformers (major, minor) versions this integration is tested with


def _check_version() -> None:
    m = re.match(r"(\d+)\.(\d+)", transformers.__version__)
    if m is None or (int(m.group(1)), int(m.group(2))) not in TESTED:
        tested = ", ".join(f"{a}.{b}" for a, b in TESTED)
        raise MissingDependencyError(
            f"hhtld.hf works with transformers {tested}.x (it follows transformers' loading steps), found "
            f"{transformers.__version__}: pip install 'hhtld[hf]'")


class HhtldConfig(QuantizationConfigMixin):
    """``quantization_config`` of a pack's folder. ``pack``: the pack's file name in the
    folder; ``format_version``, ``codec``, ``bits_per_weight``: what the folder holds (for
    reading; the pack itself is the reference). Loading options, as ``hhtld.load``'s:
    ``codec_space``, ``tables``, ``cache_layers`` (absent from an exported config.json:
    the defaults; a key added there changes how the folder loads)."""

    def __init__(self, pack: str = HF_PACK_NAME, format_version: int | None = None, codec: str | None = None,
                 bits_per_weight: float | None = None, codec_space: bool = True, tables: str = "int16",
                 cache_layers: int = 0, **kwargs):
        self.quant_method = HF_QUANT_METHOD
        if not isinstance(pack, str) or not pack.endswith(".safetensors") or Path(pack).name != pack:
            raise LoadError(f"quantization_config.pack must be a *.safetensors file name in the folder, got {pack!r}")
        if tables not in TABLES:
            raise LoadError(f"quantization_config.tables must be one of {', '.join(TABLES)}, got {tables!r}")
        if not isinstance(cache_layers, int) or isinstance(cache_layers, bool) or cache_layers < 0:
            raise LoadError(f"quantization_config.cache_layers must be an integer >= 0, got {cache_layers!r}")
        self.pack, self.format_version, self.codec, self.bits_per_weight = pack, format_version, codec, bits_per_weight
        self.codec_space, self.tables, self.cache_layers = bool(codec_space), tables, cache_layers


class HhtldQuantizer(HfQuantizer):
    """Fills a model transformers built on ``meta`` from the folder's pack (module docstring)."""

    requires_calibration = True  # a folder made by hhtld; quantising on the fly is `hhtld encode`'s

    def __init__(self, quantization_config: HhtldConfig, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self.dtype = None
        self.device = None
        self.pack: Pack | None = None
        self._hook = None
        self._saved: dict[str, object] = {}

    # -- before the model is built --------------------------------------------------------------------
    def validate_environment(self, device_map=None, **kwargs) -> None:
        if isinstance(device_map, dict):
            devices = sorted({str(v) for v in device_map.values()})
            if len(devices) > 1 or "disk" in devices:
                raise LoadError(f"hhtld: a pack loads onto one device, but device_map puts the model on "
                                f"{', '.join(devices)}")

    def update_device_map(self, device_map):
        if isinstance(device_map, str):  # "auto", "balanced", ...: the one device there is
            device_map = {"": "cuda:0" if torch.cuda.is_available() else "cpu"}
        if isinstance(device_map, dict) and device_map:
            dev = torch.device(next(iter(device_map.values())))
            self.device = None if dev.type == "cpu" else dev
        return device_map

    def update_attn_implementation(self, config):
        # the one hook that runs before transformers resolves the weights file: the pack instead of the stand-in
        folder = Path(getattr(config, "_name_or_path", "") or "")
        if folder.is_dir():
            self.pack = _open_folder_pack(folder, self.quantization_config.pack)
        config.transformers_weights = self.quantization_config.pack
        return config

    def update_dtype(self, dtype):
        self.dtype = dtype
        return dtype

    # -- the model on meta: filled from the pack ---------------------------------------------------------
    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        if not checkpoint_files or len(checkpoint_files) != 1:
            raise LoadError(f"hhtld: the folder's one checkpoint file is its pack, got {checkpoint_files}")
        if self.pack is None or self.pack.path.resolve() != Path(checkpoint_files[0]).resolve():
            self.pack = Pack(checkpoint_files[0])
        q = self.quantization_config
        # tie now, so that tied parameters are one tensor as in hhtld.load (transformers ties after loading)
        for target, source in dict(getattr(model, "all_tied_weights_keys", None) or {}).items():
            parent, _, leaf = target.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, model.get_parameter(source))
        info = fill_model(self.pack, model, self.dtype, self.device, True, q.cache_layers, q.codec_space,
                          strict=True, tables=q.tables, trainable=False)
        info.family = "causal" if type(model).__name__.endswith("ForCausalLM") else None
        filled = {k for k, t in list(model.named_parameters(remove_duplicate=False))
                  + list(model.named_buffers(remove_duplicate=False)) if t.device.type != "meta"}
        for name, mod in model.named_modules():
            if isinstance(mod, (CompressedLinear, CompressedEmbedding)):
                for k in mod.state_dict(keep_vars=True):
                    filled.add(f"{name}.{k}" if name else k)
        for t in list(model.parameters()) + list(model.buffers()):
            t._is_hf_initialized = True  # transformers' initialisation leaves them alone
        hidden = frozenset(filled)

        def hide(module, state_dict, prefix, local_metadata):
            for k in [k for k in state_dict if k[len(prefix):] in hidden]:
                del state_dict[k]

        self._hook = model._register_state_dict_hook(hide)
        self._saved = {k: model.__dict__.get(k) for k in ("_keys_to_ignore_on_load_unexpected", "all_tied_weights_keys")}
        model._keys_to_ignore_on_load_unexpected = {r".*"}  # the pack's arrays: nothing of them is a parameter
        model.all_tied_weights_keys = {}  # tied above; transformers would look for the compressed weights
        model.hhtld_info = info

    def _process_model_after_weight_loading(self, model, **kwargs):
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        for k, v in self._saved.items():
            if v is None:
                model.__dict__.pop(k, None)
            else:
                setattr(model, k, v)
        check_materialised(model, self.pack.path)
        model.config.transformers_weights = HF_WEIGHTS_STANDIN
        return model

    # -- what it is not --------------------------------------------------------------------------------
    def is_serializable(self, safe_serialization=None) -> bool:
        # save_pretrained asks this before it writes anything: say why, rather than its generic message
        raise LoadError("save_pretrained would write this model's weights dense: a model loaded from an hhtld folder "
                        "is saved as its pack; copy the folder, or write a new one with `hhtld export-hf PACK DIR`")

    @property
    def is_trainable(self) -> bool:
        return False


def _open_folder_pack(folder: Path, name: str) -> Pack:
    path = folder / name
    if not path.is_file():
        raise LoadError(f"{folder}: the folder has no {name}, the hhtld pack its config.json names; "
                        f"it is written by `hhtld export-hf PACK DIR`")
    return Pack(path)  # a damaged pack or an unknown format version: a PackError naming the file


def register() -> None:
    """Register the ``hhtld`` method with transformers (once; a second call does nothing)."""
    _check_version()
    if AUTO_QUANTIZATION_CONFIG_MAPPING.get(HF_QUANT_METHOD) is not HhtldConfig:
        AUTO_QUANTIZATION_CONFIG_MAPPING.pop(HF_QUANT_METHOD, None)
        register_quantization_config(HF_QUANT_METHOD)(HhtldConfig)
    if AUTO_QUANTIZER_MAPPING.get(HF_QUANT_METHOD) is not HhtldQuantizer:
        AUTO_QUANTIZER_MAPPING.pop(HF_QUANT_METHOD, None)
        register_quantizer(HF_QUANT_METHOD)(HhtldQuantizer)


__all__ = ["TESTED", "HhtldConfig", "HhtldQuantizer", "register"]
