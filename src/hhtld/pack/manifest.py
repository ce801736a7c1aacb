"""The manifest of a pack: its declared schema, digest and hashes (format versions 1 and 2).

The manifest is JSON in the safetensors ``__metadata__``. Its schema is
declared here once, as pydantic models, and both the writer (before it
writes) and the reader (when it opens a pack) go through it: every field has
a type and a range, no key is unknown where it could matter, paths are safe
relative paths, names are printable. The codec-specific ``params`` of a
group are declared by each codec (``codecs/layout.py``) and checked in
``pack/validate.py`` together with everything that ties the manifest to the
arrays actually stored.

Version 2 adds integrity: ``__metadata__["hhtld.digest"]`` is the SHA-256 of
the manifest text (UTF-8), and the manifest's ``arrays`` table records every
stored array's dtype, shape, data offsets and SHA-256. The reader checks the
digest and compares the table with the safetensors header when the pack is
opened (so an edit of the manifest, or of a dtype, shape or offset in the
header, is found before anything is decoded), and each array's SHA-256 the
first time the array is read. Version 1 packs carry a CRC32 per array and
nothing over the header or manifest.
"""

from __future__ import annotations

import hashlib
import json
import re
import zlib
from typing import Annotated, Any, Literal, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError

from ..codecs.layout import Count
from ..format import CRC32_HEX_CHARS, DIGEST_ALGORITHM, DTYPE_BITS, FLOAT_DTYPES, MAX_NAME_CHARS
from ..names import CONTROL_CHARS, name_problem, path_problem
from ..stfile import FormatProblem, as_bytes, parse_json

_PART = re.compile(r"^[a-z][a-z0-9_]*(\.[0-9]{1,4})*$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_CRC32 = re.compile(r"^[0-9a-f]{%d}$" % CRC32_HEX_CHARS)
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class ManifestProblem(Exception):
    """What is wrong with a manifest, in words that name the field."""


def _check_name(v: str) -> str:
    if not v or len(v) > MAX_NAME_CHARS or CONTROL_CHARS.search(v):
        raise ValueError("must be 1 to 1024 printable characters")
    return v


def _check_path(v: str) -> str:
    p = path_problem(v)
    if p:
        raise ValueError(f"unsafe file path {v!r} ({p})")
    return v


def _check_part(v: str) -> str:
    if not _PART.match(v) or len(v) > 64:
        raise ValueError(f"{v!r} is not a part name (like 'twig', 'palette.0.1')")
    return v


def _check_sha256(v: str) -> str:
    if not _SHA256.match(v):
        raise ValueError("must be 64 lowercase hex digits")
    return v


def _check_crc32(v: str) -> str:
    if not _CRC32.match(v):
        raise ValueError(f"must be {CRC32_HEX_CHARS} lowercase hex digits")
    return v


def _check_dtype(v: str) -> str:
    if v not in DTYPE_BITS:
        raise ValueError(f"{v!r} is not a safetensors dtype")
    return v


Name = Annotated[str, AfterValidator(_check_name)]
RelPath = Annotated[str, AfterValidator(_check_path)]
PartName = Annotated[str, AfterValidator(_check_part)]
Dtype = Annotated[str, AfterValidator(_check_dtype)]
Shape = Annotated[list[Count], Field(max_length=8)]
Pair = Annotated[list[Count], Field(min_length=2, max_length=2)]
Positive = Annotated[int, Field(strict=True, ge=1)]


class _Model(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


# --- the schema ---------------------------------------------------------------------------------------
class SourceInfo(_Model):
    """Where the tensors came from, and the layout decode writes back."""

    kind: Literal["file", "sharded", "folder"]
    name: Name
    files: Annotated[list[RelPath], Field(min_length=1)]
    index: RelPath | None
    index_metadata: dict[str, Any]
    file_metadata: dict[str, dict[str, str]]
    aux_files: list[RelPath]
    bytes: Count
    bf16_bytes: Count


class GroupKeyInfo(_Model):
    component: Name
    role: Name
    shape: Annotated[list[Positive], Field(min_length=2, max_length=2)]


class GroupInfo(_Model):
    index: Count
    key: GroupKeyInfo
    regime: Literal["argmax", "index"]
    codec: Name
    codec_id: Count
    options: dict[str, Any]
    params: dict[str, Any]
    parts: list[PartName]
    tensors: Annotated[list[Name], Field(min_length=1)]
    row_cosine: dict[str, Any] | None = None  # measured while encoding (informational)


class _TensorBase(_Model):
    file: RelPath
    dtype: Dtype
    shape: Shape
    role: Name
    component: Name


class EncodedTensorInfo(_TensorBase):
    kind: Literal["encoded"]
    dtype: Literal[FLOAT_DTYPES]  # type: ignore[valid-type]
    group: Count
    transposed: bool
    row_shape: Annotated[list[Positive], Field(min_length=2, max_length=2)]
    params: dict[str, Any]
    parts: list[PartName]


class PassthroughTensorInfo(_TensorBase):
    kind: Literal["passthrough"]
    reason: str


def _kind(v: Any) -> str | None:
    k = v.get("kind") if isinstance(v, dict) else None
    return k if k in ("encoded", "passthrough") else None


TensorInfo = Annotated[Union[Annotated[EncodedTensorInfo, Tag("encoded")],
                             Annotated[PassthroughTensorInfo, Tag("passthrough")]],
                       Discriminator(_kind, custom_error_type="kind",
                                     custom_error_message="'kind' must be 'encoded' or 'passthrough'")]


class ArrayInfo(_Model):
    """One stored array as the writer wrote it (version 2)."""

    dtype: Dtype
    shape: Shape
    data_offsets: Pair
    sha256: Annotated[str, AfterValidator(_check_sha256)]


class _ManifestBase(BaseModel):
    # informational top-level keys (created_by, policy, calibration, ...) are allowed;
    # everything that decides a decode is declared and required
    model_config = ConfigDict(strict=True, extra="allow")

    format: Literal["hhtld"]
    created_by: str | None = None
    codec: str | None = None
    codec_options: dict[str, Any] | None = None
    policy: dict[str, Any] | None = None
    sample_rows: Count | None = None
    source: SourceInfo
    groups: list[GroupInfo]
    tensors: dict[Name, TensorInfo]


class ManifestV1(_ManifestBase):
    version: Literal[1]
    checksums: dict[str, Annotated[str, AfterValidator(_check_crc32)]]
    arrays: None = Field(default=None, exclude=True)


class ManifestV2(_ManifestBase):
    version: Literal[2]
    arrays: dict[str, ArrayInfo]
    checksums: None = Field(default=None, exclude=True)


MANIFEST_MODELS: dict[int, type[_ManifestBase]] = {1: ManifestV1, 2: ManifestV2}
Manifest = ManifestV1 | ManifestV2


# --- parsing -------------------------------------------------------------------------------------------
def format_loc(loc: tuple) -> str:
    """('tensors', 'x.weight', 'shape', 0) → ``tensors["x.weight"].shape[0]``."""
    out = ""
    for i, item in enumerate(loc):
        if isinstance(item, int):
            out += f"[{item}]"
        elif _IDENT.match(item):
            out += ("." if out else "") + item
        else:
            out += "[" + json.dumps(item, ensure_ascii=False) + "]"
    return out or "(top level)"


def _short(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


def describe_error(e: ValidationError, prefix: tuple = ()) -> str:
    """The first problem of a pydantic error, naming the field: ``field: problem``."""
    err = e.errors(include_url=False)[0]
    loc = list(err["loc"])
    if len(loc) >= 3 and loc[0] == "tensors" and loc[2] in ("encoded", "passthrough"):
        del loc[2]  # the tag of the tensor kind, not a field
    loc = tuple(loc)
    msg = err["msg"]
    if err["type"] == "value_error":
        msg = msg.removeprefix("Value error, ")
    msg = msg[:1].lower() + msg[1:]
    what = format_loc(prefix + loc)
    if err["type"] in ("missing",):
        return f"manifest field {what} is missing"
    if err["type"] == "extra_forbidden":
        return f"manifest field {what} is not part of the format"
    got = "" if err["type"] in ("value_error", "kind") else f", got {_short(err.get('input'))}"
    return f"manifest field {what}: {msg}{got}"


def parse_manifest(text: str, version: int) -> tuple[dict, _ManifestBase]:
    """The manifest text → (the JSON object, its validated model). Raises
    ManifestProblem naming the field."""
    try:
        obj = parse_json(text, "the manifest")
    except FormatProblem as e:
        raise ManifestProblem(str(e)) from None
    if not isinstance(obj, dict):
        raise ManifestProblem("the manifest is not a JSON object")
    try:
        model = MANIFEST_MODELS[version].model_validate(obj)
    except ValidationError as e:
        raise ManifestProblem(describe_error(e)) from None
    return obj, model


# --- digests and hashes ---------------------------------------------------------------------------
def manifest_digest(text: str) -> str:
    """``__metadata__["hhtld.digest"]``: ``sha256:<hex>`` of the manifest text in UTF-8."""
    return f"{DIGEST_ALGORITHM}:" + hashlib.sha256(text.encode("utf-8")).hexdigest()


def array_sha256(data) -> str:
    """SHA-256 (hex) of an array's stored bytes."""
    return hashlib.sha256(memoryview(as_bytes(data) if not isinstance(data, (bytes, memoryview)) else data)).hexdigest()


def array_crc32(data) -> str:
    """Version 1: CRC32 (8 hex digits) of an array's stored bytes."""
    mv = memoryview(as_bytes(data) if not isinstance(data, (bytes, memoryview)) else data)
    return f"{zlib.crc32(mv) & 0xFFFFFFFF:0{CRC32_HEX_CHARS}x}"


__all__ = [
    "ArrayInfo", "EncodedTensorInfo", "GroupInfo", "MANIFEST_MODELS", "Manifest", "ManifestProblem",
    "ManifestV1", "ManifestV2", "PassthroughTensorInfo", "SourceInfo", "array_crc32", "array_sha256",
    "describe_error", "format_loc", "manifest_digest", "name_problem", "parse_manifest", "path_problem",
]
