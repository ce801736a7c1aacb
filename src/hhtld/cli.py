"""The ``hhtld`` command line: a thin layer over the public API.

Every failure the user can cause ends in one line ``hhtld: error: ...`` on
stderr and a non-zero exit status, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import __version__
from .classify import DEFAULT_RULES, EncodablePolicy, load_rules_file, parse_rule
from .codecs.registry import CODECS, DEFAULT_CODEC
from .errors import HhtldError
from .format import DEFAULT_MIN_BYTES, DEFAULT_MIN_ROWS
from .inspect import format_inspect, human_bytes, inspect_path


def _add_policy_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("what is encoded (SPEC §2)")
    g.add_argument("--min-rows", type=int, default=DEFAULT_MIN_ROWS, help="encode matrices with at least this many rows (default %(default)s)")
    g.add_argument("--min-bytes", type=int, default=DEFAULT_MIN_BYTES, help="... and more than this many bytes (default %(default)s)")
    g.add_argument("--encode-all", action="store_true", help="encode every 2-D float matrix, whatever its size")
    g.add_argument("--rule", action="append", default=[], metavar="PATTERN=ROLE",
                   help="classification rule put in front of the built-in table (regex searched in the name; "
                        "ROLE may end in ':transposed'); repeatable")
    g.add_argument("--rules", metavar="FILE.json", help="JSON list of {pattern, role, transposed} rules, in front of the table")


def _policy(args) -> tuple[EncodablePolicy, object]:
    for opt in ("min_rows", "min_bytes"):
        if getattr(args, opt) < 0:
            raise HhtldError(f"--{opt.replace('_', '-')} must be >= 0, got {getattr(args, opt)}")
    policy = EncodablePolicy(args.min_rows, args.min_bytes, args.encode_all)
    extra = [parse_rule(r) for r in args.rule]
    if args.rules:
        extra += load_rules_file(args.rules)
    return policy, DEFAULT_RULES.with_overrides(extra) if extra else DEFAULT_RULES


def _emit_json(obj, dest) -> None:
    text = json.dumps(obj, indent=2, default=str)
    if dest in (True, "-"):
        print(text)
    else:
        Path(dest).write_text(text + "\n", encoding="utf-8")


def cmd_encode(args) -> int:
    from .inspect import inspect_pack
    from .pack import encode_checkpoint

    policy, rules = _policy(args)
    opts = {"k": args.k, "leaf_lanes": args.leaf_lanes}
    res = encode_checkpoint(args.model, args.output, codec=args.codec,
                            codec_options={k: v for k, v in opts.items() if v is not None},
                            policy=policy, rules=rules, include_aux=not args.no_aux_files,
                            progress=not args.quiet)
    info = inspect_pack(res.path)
    info["encode_seconds"] = res.seconds
    info["weights_encoded"] = res.n_weights_encoded
    if args.json:
        _emit_json(info, args.json)
        return 0
    if not args.quiet:
        print(format_inspect(info))
    rate = res.n_weights_encoded / res.seconds / 1e6 if res.seconds > 0 else float("inf")
    print(f"wrote {res.path}: {human_bytes(info['file_bytes'])}, {info['ratio_vs_bf16']:.2f}:1 against bf16; "
          f"{res.n_weights_encoded / 1e6:.2f}M weights encoded in {res.seconds:.1f} s ({rate:.2f} M weights/s)")
    return 0


def cmd_decode(args) -> int:
    from .pack import decode_pack

    res = decode_pack(args.pack, args.output, progress=not args.quiet)
    if args.json:
        _emit_json({"out_dir": str(res.out_dir), "files": [str(f) for f in res.files],
                    "seconds": res.seconds, "weights_decoded": res.n_weights}, args.json)
        return 0
    rate = res.n_weights / res.seconds / 1e6 if res.seconds > 0 else float("inf")
    print(f"wrote {len(res.files)} file(s) to {res.out_dir}: {res.n_weights / 1e6:.2f}M weights decoded "
          f"in {res.seconds:.1f} s ({rate:.1f} M weights/s)")
    return 0


def cmd_inspect(args) -> int:
    policy, rules = _policy(args)
    info = inspect_path(args.path, policy, rules)
    if args.json:
        _emit_json(info, args.json)
    else:
        print(format_inspect(info))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hhtld", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"hhtld {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    e = sub.add_parser("encode", help="compress a safetensors model into one .hhtld pack",
                       description="Compress a .safetensors file, a sharded index or a model folder into one .hhtld pack.")
    e.add_argument("model", help="model.safetensors, model.safetensors.index.json, or a model folder")
    e.add_argument("-o", "--output", required=True, help="the .hhtld pack to write (atomically)")
    e.add_argument("--codec", default=DEFAULT_CODEC, choices=sorted(CODECS), help="codec (default %(default)s)")
    e.add_argument("--k", type=int, default=None, help="palette size, 0 < k <= 256 (default 256)")
    e.add_argument("--leaf-lanes", type=int, default=None, help="Slot L lanes of index-regime groups (default 8)")
    e.add_argument("--no-aux-files", action="store_true", help="do not carry a model folder's config/tokenizer files")
    e.add_argument("--json", nargs="?", const=True, metavar="FILE", help="print (or write to FILE) the result as JSON")
    e.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no group table")
    _add_policy_args(e)
    e.set_defaults(func=cmd_encode)

    d = sub.add_parser("decode", help="write a pack back as a dense safetensors checkpoint",
                       description="Write dense weights in the layout of the source (file, shards + index, or model folder).")
    d.add_argument("pack", help="the .hhtld pack")
    d.add_argument("-o", "--output", required=True, help="output folder")
    d.add_argument("--json", nargs="?", const=True, metavar="FILE", help="print (or write to FILE) the result as JSON")
    d.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    d.set_defaults(func=cmd_decode)

    i = sub.add_parser("inspect", help="group table of a model (dry run) or of a pack",
                       description="Print the groups (key, regime, tensors, rows, bytes) of a model or of a pack.")
    i.add_argument("path", help="a model (file, index, folder) or a .hhtld pack")
    i.add_argument("--json", nargs="?", const=True, metavar="FILE", help="print (or write to FILE) JSON")
    _add_policy_args(i)
    i.set_defaults(func=cmd_inspect)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except HhtldError as e:
        print(f"hhtld: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        print(f"hhtld: error: {where}{e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("hhtld: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
