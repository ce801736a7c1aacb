"""Format constants of the ``.hhtld`` pack: the one place they live.

A pack is a valid safetensors file. Its ``__metadata__`` carries the format
name, the format version and a JSON manifest. Stored array names follow the
patterns below so that any safetensors tool can list a pack and a reader can
find every part of a group or tensor without scanning.
"""

from __future__ import annotations

from enum import IntEnum

# --- pack identity ---------------------------------------------------------
FORMAT_NAME = "hhtld"
FORMAT_VERSION = 2  # what the writer writes
# Versions a reader accepts, and nothing else (0, negative or unknown numbers are refused):
# 1 has a CRC32 per stored array and nothing over the header or manifest;
# 2 adds the manifest digest and, per stored array, its dtype, shape, offsets and SHA-256.
READABLE_VERSIONS = frozenset({1, 2})
FILE_SUFFIX = ".hhtld"

# --- __metadata__ keys -----------------------------------------------------
META_FORMAT = "format"
META_VERSION = "format_version"
META_MANIFEST = "hhtld.manifest"
META_DIGEST = "hhtld.digest"  # version 2: "sha256:<hex>" of the manifest text (UTF-8)
META_KEYS = {1: (META_FORMAT, META_VERSION, META_MANIFEST), 2: (META_FORMAT, META_VERSION, META_MANIFEST, META_DIGEST)}
DIGEST_ALGORITHM = "sha256"  # the manifest digest and every stored array's hash (version 2)
CRC32_HEX_CHARS = 8  # version 1: one CRC32 per stored array, 8 lowercase hex digits
MAX_VERSION_CHARS = 9  # the format_version string: decimal digits only, at most this many

# --- limits on untrusted JSON (safetensors header and manifest), checked before parsing ---
MAX_JSON_DEPTH = 32  # nesting of arrays/objects (a pack needs 8)
MAX_JSON_NUMBER_CHARS = 40  # characters of one number literal (an int64 has 20, a float repr 24)
MAX_JSON_INT = 2**53  # every integer of a manifest or header lies in [-2**53, 2**53]
MAX_NAME_CHARS = 1024  # a tensor name or a file path in a pack
MAX_PATH_PART_BYTES = 255  # one component of a file path (what file systems allow)
MAX_ROW_COLS = 1 << 17  # widest row a pack may declare (real models: < 65536; hhtl-d stores 4 B a row whatever its width)

# --- stored array names ----------------------------------------------------
SEP = "::"  # between an owner and the part it stores
GROUP_PREFIX = "__group__."  # group arrays: "__group__.0003::palette"
AUX_PREFIX = "__file__::"  # side files of a model folder, stored as U8


def group_array_name(group_index: int, part: str) -> str:
    return f"{GROUP_PREFIX}{group_index:04d}{SEP}{part}"


def tensor_array_name(tensor_name: str, part: str) -> str:
    return f"{tensor_name}{SEP}{part}"


def aux_array_name(relpath: str) -> str:
    return f"{AUX_PREFIX}{relpath}"


# --- codecs ------------------------------------------------------------------
class CodecId(IntEnum):
    """Codec ids stored in the manifest. Explicit numbers, never reused."""

    PASSTHROUGH = 0
    HHTL_F32 = 1  # reconstruction grade: f32 palette, 1 B/row (+8 B Slot L)
    HHTL_D = 2  # lookup grade: Base17 palette, 4 B HhtlDEntry (+8 B Slot L)
    HHTL_VQ = 3  # budget codec: segment twigs, residual stages, gain, leaf


# --- palette / twig ----------------------------------------------------------
MAX_PALETTE_K = 256  # one-byte twig
MAX_PALETTE_K_U16 = 65536  # two-byte twig (budget codec)

# --- byte sizes (sums of their parts) ---------------------------------------
BF16_BYTES = 2
F32_BYTES = 4
TWIG_U8_BYTES = 1
SLOT_L_LANES = 8
SLOT_L_ROW_BYTES = SLOT_L_LANES * 1  # 8 x int8
SLOT_L_SCALE_BYTES = F32_BYTES  # one f32 scale per tensor
FAMILY_GAMMA_BYTES = F32_BYTES + F32_BYTES  # z_min, z_range
HHTL_F32_ROW_BYTES = TWIG_U8_BYTES  # 1 B/row
HHTL_F32_LEAF_ROW_BYTES = TWIG_U8_BYTES + SLOT_L_ROW_BYTES  # 9 B/row
HHTL_D_ENTRY_BYTES = 2 + 2  # slot_d u16 + slot_v u16 (bf16)
HHTL_D_LEAF_ROW_BYTES = HHTL_D_ENTRY_BYTES + SLOT_L_ROW_BYTES  # 12 B/row

# --- HHTL-D lookup grade (docs/design.md §2) ----------------------------------------------
BASE17_DIMS = 17  # a row folds to 17 int16 values
BASE17_GOLDEN_STEP = 11  # GOLDEN_POS[i] = (i * 11) % 17
BASE17_SCALE = 256  # fixed point: round(mean * 256), clamped to int16
BASE17_VALUE_BYTES = 2  # int16
HIP_LEVELS = 4  # four binary farthest-pair splits ...
HIP_FAMILIES = 1 << HIP_LEVELS  # ... give 16 families (branch bits 8, 4, 2, 1)
HHTL_DISTANCE_MAX = 0xFFFF  # k x k distance table is u16
ROUTE_ATTEND_PERCENTILE = 25.0  # off-diagonal distance <= P25: near pair, Attend
ROUTE_SKIP_PERCENTILE = 75.0  # off-diagonal distance >= P75: far pair, Skip


class HeelBasin(IntEnum):
    """Bits 15..14 of ``slot_d``: how the row is used downstream."""

    QK = 0  # rows scored against a query/hidden state: q/k/o, lm_head
    V = 1  # rows carried into the residual stream: v, token/position embeddings
    Gate = 2  # MLP gate
    FFN = 3  # every other dense transform: up, down, projection, other


class RouteAction(IntEnum):
    """Entries of the HHTL cache's k x k route table (u8)."""

    Skip = 0  # far pair: the score is negligible, not computed
    Attend = 1  # near pair: the table lookup is trusted as is
    Compose = 2  # undecided middle, same HIP family: resolved inside the family
    Escalate = 3  # undecided middle, different families: needs the exact product


# HhtlDEntry (4 bytes, little-endian): slot_d u16, then slot_v u16 (bfloat16 bits)
SLOT_D_BASIN_SHIFT, SLOT_D_BASIN_MASK = 14, 0x3  # bits 15..14
SLOT_D_HIP_SHIFT, SLOT_D_HIP_MASK = 10, 0xF  # bits 13..10
SLOT_D_TWIG_SHIFT, SLOT_D_TWIG_MASK = 2, 0xFF  # bits 9..2
SLOT_D_POLARITY_SHIFT = 1  # bit 1
SLOT_D_RESERVED_BIT = 0  # bit 0, always 0

# --- SVD basis ---------------------------------------------------------------
SVD_MAX_SAMPLE_ROWS = 4096  # rows of the sample a basis is fitted to (evenly spaced)

# --- streaming encode (these decide which bytes an encode writes) -------------
# A group's shared parts (palettes, rotation, basis) are trained on a sample of
# at most DEFAULT_SAMPLE_ROWS rows drawn evenly across its tensors; its
# tensors are then encoded in blocks of about BLOCK_ELEMS weights. Both depend
# on the input only, never on the thread count.
DEFAULT_SAMPLE_ROWS = 4096
BLOCK_ELEMS = 1 << 20
# Largest block of the randomised block-Hadamard rotation (hhtl-vq). Stored
# per group as ``params.rotation_block``; packs written before it was stored
# used LEGACY_ROTATION_MAX_BLOCK.
ROTATION_MAX_BLOCK = 1024
LEGACY_ROTATION_MAX_BLOCK = 1024

# Largest |weight| a codec encodes (its float32 arithmetic stays finite below it); a
# codec may declare less (Codec.max_abs). Larger finite weights are refused, never saturated.
MAX_ENCODE_ABS = 2.0**100

# --- encodable defaults (docs/design.md §1) -------------------------------------------
DEFAULT_MIN_ROWS = 512
DEFAULT_MIN_BYTES = 100_000  # strictly more than this many bytes

# --- dtypes --------------------------------------------------------------------
FLOAT_DTYPES = ("F32", "F16", "BF16")  # read as float32 rows, may be encoded
# Every dtype name the safetensors format defines, with its width in bits
# (sub-byte dtypes are packed: a tensor takes numel * bits / 8 bytes, a whole number).
DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "C64": 64, "I64": 64, "U64": 64,
    "F64": 64,
}
# Byte width of every dtype name (sub-byte dtypes count 1; sizes come from DTYPE_BITS).
DTYPE_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "F8_E8M0": 1,
    "F4": 1,
    "F6_E2M3": 1,
    "F6_E3M2": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "C64": 8,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}

# --- a pack in a Hugging Face folder (``hhtld export-hf``, ``import hhtld.hf``) ------------
HF_QUANT_METHOD = "hhtld"  # config.json's quantization_config.quant_method
# The pack's file name in the folder: transformers opens a checkpoint with safetensors only
# when its name ends in .safetensors, and reads it only when the registered quantizer names it.
HF_PACK_NAME = "hhtld-pack.safetensors"
# What config.json's "transformers_weights" names: a file that is never written. Plain
# transformers (without ``import hhtld.hf``) opens it and stops with this name in its error;
# the registered quantizer names the pack instead.
HF_WEIGHTS_STANDIN = "import-hhtld.hf-to-load-this-folder.safetensors"
HF_SOURCE_CARD = "README.source.md"  # the source model's own README.md, kept beside hhtld's card
HF_EXPORT_KEEPS_OUT = ("README.md", "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                       "pytorch_model.bin.index.json")  # carried side files the folder does not take as they are


# --- byte-accounting categories of stored parts (gate 3 breakdown) ----------
CATEGORIES = ("entries", "leaf", "palettes", "bases", "tables", "manifest", "passthrough", "aux_files")
PART_CATEGORY = {
    "twig": "entries",
    "entry": "entries",
    "codes": "entries",
    "gain": "entries",
    "leaf": "leaf",
    "leaf_scale": "leaf",
    "palette": "palettes",
    "palette17": "palettes",
    "basis": "bases",
    "singular": "bases",
    "rotation": "bases",
    "fisher_z": "tables",
    "gamma": "tables",
    "radius": "tables",
    "count": "tables",
    "hip": "tables",
    "distance": "tables",
    "route": "tables",
}


def part_category(part: str) -> str:
    """Category of a stored part; parts named ``<base>.<n>`` take their base's category."""
    return PART_CATEGORY.get(part, PART_CATEGORY.get(part.split(".")[0], "tables"))
