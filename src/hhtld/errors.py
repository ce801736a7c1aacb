"""One exception family. Every message names the file, tensor and problem."""

from __future__ import annotations


class HhtldError(Exception):
    """Base of every error hhtld raises on purpose (bad input, bad options)."""


class CheckpointError(HhtldError):
    """A model checkpoint cannot be read (missing, not safetensors, truncated, bad dtype)."""


class PackError(HhtldError):
    """A file is not a readable .hhtld pack (not a pack, newer version, truncated, damaged),
    or a field of its manifest is invalid; the message names the file and the field."""


class CodecError(HhtldError):
    """A codec was given options or data it cannot encode (e.g. k out of range)."""


class OptionsError(HhtldError):
    """Command-line or API options that contradict each other or are out of range."""


class GateError(HhtldError):
    """A gate cannot be measured (no runnable config, model/pack mismatch)."""


class LoadError(HhtldError):
    """A pack cannot be loaded as a ready model (``hhtld.load`` and what builds on it)."""


class NoConfigError(LoadError):
    """The pack carries no ``config.json`` and none was given (``config=`` / ``--config``)."""


class ArchitectureError(LoadError):
    """transformers cannot build the architecture the config names (or the wrong family was asked for)."""


class TensorMismatchError(LoadError):
    """The pack's tensors do not fit the model's parameters (missing, extra, or of another shape)."""


class HhtldNote(UserWarning):
    """Something a user should know that is not an error (an old pack format, a
    fallback taken). Issued with :func:`warnings.warn`; the command line prints
    each one as ``hhtld: note: ...`` on stderr, whatever the output format."""


class MissingDependencyError(HhtldError, ImportError):
    """An optional dependency (torch, transformers, sentence-transformers) is not installed;
    the message names the extra that brings it."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (what a one-line error quotes of it)."""
    s = str(e).strip()
    return s.splitlines()[0] if s else ""
