"""The ``hhtld`` command line: a thin layer over the public API.

Every failure the user can cause ends in one line ``hhtld: error: ...`` on
stderr and a non-zero exit status, never a traceback. Notes (``HhtldNote``
warnings of the library, and the ones a command adds) go to stderr as
``hhtld: note: ...`` whatever the output format. SIGTERM (and SIGHUP) unwind
like SIGINT: temporary files are removed, no partial target is left, exit
status 143 (129).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import signal
import sys
import threading
import warnings
from pathlib import Path

from ._version import __version__
from .classify import DEFAULT_RULES, GROUP_BY, EncodablePolicy, load_rules_file, parse_rule
from .codecs.registry import CODECS, DEFAULT_CODEC
from .errors import HhtldError, HhtldNote, OptionsError
from .outputs import check_output_file, remove_all_temps, write_json
from .format import DEFAULT_MIN_BYTES, DEFAULT_MIN_ROWS, DEFAULT_SAMPLE_ROWS
from .display import human_bytes
from .inspection import format_inspect, format_plan, inspect_path
from .memory import memory_limit, system_room


def _add_policy_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("what is encoded (docs/design.md, section 1)")
    g.add_argument("--min-rows", type=int, default=None,
                   help=f"encode matrices with at least this many rows (default {DEFAULT_MIN_ROWS}; the calibrated "
                        "encode, --target behaviour, encodes every matrix unless a threshold is given)")
    g.add_argument("--min-bytes", type=int, default=None,
                   help=f"... and more than this many bytes (default {DEFAULT_MIN_BYTES})")
    g.add_argument("--encode-all", action="store_true", help="encode every 2-D float matrix, whatever its size")
    g.add_argument("--rule", action="append", default=[], metavar="PATTERN=ROLE",
                   help="classification rule put in front of the built-in table (regex searched in the name; "
                        "ROLE may end in ':transposed'); repeatable")
    g.add_argument("--rules", metavar="FILE.json", help="JSON list of {pattern, role, transposed} rules, in front of the table")
    g.add_argument("--group-by", choices=GROUP_BY, default="role",
                   help="'role' (default): a group per role and shape; 'input': matrices that read the same input "
                        "and share a shape in one group (gate with up, k with v), each pair at one setting, so "
                        "that the kernels build one lookup table for both")


def _policy(args) -> tuple[EncodablePolicy, object]:
    """The encodable policy and the rule table of the flags."""
    for opt in ("min_rows", "min_bytes"):
        v = getattr(args, opt)
        if v is not None and v < 0:
            raise OptionsError(f"--{opt.replace('_', '-')} must be >= 0, got {v}")
    rows = DEFAULT_MIN_ROWS if args.min_rows is None else args.min_rows
    nbytes = DEFAULT_MIN_BYTES if args.min_bytes is None else args.min_bytes
    return EncodablePolicy(rows, nbytes, args.encode_all), _rules_only(args)


def _emit_json(obj, dest) -> None:
    """``--json``: print to stdout, or write FILE atomically."""
    if dest in (True, "-"):
        print(json.dumps(obj, indent=2, default=str))
    else:
        write_json(obj, dest)


def _inputs(args) -> list[str]:
    """The paths a command reads: never overwritten by its own outputs."""
    return [getattr(args, a) for a in ("model", "pack", "path", "config", "rules") if getattr(args, a, None)]


def _check_outputs(args) -> None:
    """Refuse bad output paths before any work is done."""
    if getattr(args, "json", None) not in (None, True, "-"):
        check_output_file(args.json, _inputs(args), what="JSON report")
    plots = getattr(args, "plots", None)
    if plots and Path(plots).exists() and not Path(plots).is_dir():
        raise OptionsError(f"{plots}: exists and is not a folder; --plots takes a folder")
    hf_dir = getattr(args, "hf_dir", None)
    if hf_dir:
        from .loader.hf_folder import check_hf_dir

        check_hf_dir(hf_dir)


def cmd_encode(args) -> int:
    from .encoding import encode

    given = any(getattr(args, o) is not None for o in ("min_rows", "min_bytes")) or args.encode_all
    policy, rules = _policy(args)
    targets = {k: getattr(args, k) for k in ("max_kl", "min_top1", "min_cosine", "max_ppl_ratio")
               if getattr(args, k, None) is not None}
    thresholds = None
    if targets:
        from .measure.targets import Thresholds

        thresholds = Thresholds(**targets)
    rep = encode(args.model, args.output, target=args.target, bpw=args.bpw, codec=args.codec, stages=args.stages,
                 k=args.k, leaf_lanes=args.leaf_lanes, rotate=args.rotate, gain=args.gain, seed=args.seed,
                 policy=policy if given else None, rules=rules, config=args.config, thresholds=thresholds,
                 calibration_texts=args.calibration_texts, max_rounds=args.max_rounds, tune_steps=args.tune_steps,
                 global_steps=args.global_steps,
                 sample_rows=args.sample_rows, threads=args.threads, include_aux=not args.no_aux_files,
                 progress=not args.quiet, log=None if (args.json or args.quiet) else print, resume=args.resume,
                 executor=args.executor, ray_address=args.ray_address, memory_limit=args.memory_limit)
    for note in rep.notes:  # notes go to stderr whatever the output format
        print(f"hhtld: note: {note}", file=sys.stderr)
    small = [t for t in rep.result.plan.passthrough if t.reason == "below size thresholds"]
    if small:
        print(f"hhtld: note: {len(small)} float matrices ({human_bytes(sum(t.nbytes for t in small))}) are kept dense "
              f"by the size thresholds (--min-rows {rep.policy.min_rows}, --min-bytes {rep.policy.min_bytes}); "
              "--encode-all encodes them too", file=sys.stderr)
    if rep.met is False:
        print(f"hhtld: target not met: {_target_line(rep.allocation)}; the pack was written (exit status 3)",
              file=sys.stderr)
    if args.hf_dir:
        from .loader.hf_folder import export_hf

        rep.info["hf_dir"] = str(export_hf(args.output, args.hf_dir, command=args.command_line))
    if args.json:
        _emit_json(rep.info, args.json)
    else:
        _print_encode(rep, args)
    return 3 if rep.met is False else 0


def _print_encode(rep, args) -> None:
    """The group table, the allocation and the one-line summary of an encode."""
    res, allocation, info = rep.result, rep.allocation, rep.info
    if not args.quiet:
        print(format_inspect(info))
    secs = info["encode_seconds"]
    rate = res.n_weights_encoded / secs / 1e6 if secs > 0 else float("inf")
    if allocation is not None and not args.quiet:
        print(f"allocation --target {allocation.target}"
              f"{'' if args.bpw is None else f' --bpw {args.bpw}'}: {allocation.bpw:.3f} bits per encoded weight")
        if allocation.met is not None:
            print(f"target {'met' if allocation.met else 'NOT met'}: {_target_line(allocation)}")
    print(f"wrote {res.path}: {human_bytes(info['file_bytes'])}, {info['ratio_vs_bf16']:.2f}:1 against bf16; "
          f"{res.n_weights_encoded / 1e6:.2f}M weights encoded in {secs:.1f} s ({rate:.2f} M weights/s"
          f"{', allocation included' if allocation is not None else ''})")


def _target_line(allocation) -> str:
    """What the check measured against the target, in one line."""
    cal = allocation.calibration
    if cal is not None:
        c, t = cal.check, cal.target
        if cal.family == "causal" and "kinds" in c:
            kinds = c["kinds"]
            each = ", ".join(f"{k} {v['kl_mean']:.4f}/{v['ppl_ratio']:.4f}" for k, v in kinds.items())
            return (f"mean KL {c['kl_mean']:.4f} (target <= {t['max_kl']:g}) and perplexity ratio {c['ppl_ratio']:.4f} "
                    f"(target <= {t['max_ppl_ratio']:g}) on the worst of {len(kinds)} kinds of check text "
                    f"(KL/ratio: {each})")
        if cal.family == "causal":
            return (f"mean KL {c['kl_mean']:.4f} (target <= {t['max_kl']:g}), perplexity ratio {c['ppl_ratio']:.4f} "
                    f"(target <= {t['max_ppl_ratio']:g}) on calibration text")
        where = (f"the worst of {len(c['kinds'])} kinds of calibration text" if "kinds" in c else "calibration text")
        return (f"top-1 retrieval {100 * c['top1']:.1f}% (target >= {100 * t['min_top1']:g}%), cosine "
                f"{c['cos_mean']:.4f} (target >= {t['min_cosine']:g}) on {where}")
    c = allocation.checks[-1] if allocation.checks else {}
    failing = ", ".join(c.get("failing", [])) or "none"
    return f"gate 1 on every decoded row (groups failing: {failing})"


def cmd_decode(args) -> int:
    from .pack import decode_pack

    res = decode_pack(args.pack, args.output, progress=not args.quiet, force=args.force)
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
    plan_flags = [f for f in ("codec", "stages", "target", "bpw", "calibration_texts", "threads")
                  if getattr(args, f) is not None]
    plan_flags += ["sample_rows"] if args.sample_rows != DEFAULT_SAMPLE_ROWS else []
    if args.plan:
        from .encoding import plan
        from .pack.plan import UnitTimings

        given = any(getattr(args, o) is not None for o in ("min_rows", "min_bytes")) or args.encode_all
        p = plan(args.path, target=args.target, bpw=args.bpw, codec=args.codec, stages=args.stages,
                 policy=policy if given else None, rules=rules, calibration_texts=args.calibration_texts,
                 sample_rows=args.sample_rows, threads=args.threads)
        info = p.to_json(UnitTimings.load())
        text = format_plan(info)
    elif plan_flags:
        raise OptionsError(f"--{plan_flags[0].replace('_', '-')} applies to --plan")
    else:
        info = inspect_path(args.path, policy, rules, check=args.check)
        text = format_inspect(info)
    if args.json:
        _emit_json(info, args.json)
    else:
        print(text)
    return 0


def cmd_verify(args) -> int:
    from .gates import Thresholds, verify, write_plots

    overrides = {k: getattr(args, k) for k in Thresholds.__dataclass_fields__ if getattr(args, k, None) is not None}
    report = verify(args.model, args.pack, args.config, texts=args.texts, thresholds=Thresholds(**overrides),
                    greedy_tokens=args.greedy_tokens, greedy_texts=args.greedy_texts, progress=not args.quiet)
    if args.json:
        _emit_json(report.to_json(), args.json)
    if args.json not in (True, "-"):
        print(report.format(details=not args.quiet))
        if args.json:
            print(f"wrote {args.json}")
    else:  # the report's notes are only in the JSON on stdout: say them on stderr too
        for g in report.gates:
            if g.note:
                print(f"hhtld: note: gate {g.gate}: {g.note}", file=sys.stderr)
    if args.plots:
        paths = write_plots(report, args.plots)
        if args.json not in (True, "-"):
            print(f"wrote {len(paths)} plot(s) to {args.plots}")
    return 0 if (report.passed or args.no_fail) else 2


def cmd_export_hf(args) -> int:
    from .loader.hf_folder import check_verify_report, export_hf

    report = None
    if args.verify_json:
        try:
            report = json.loads(Path(args.verify_json).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise OptionsError(f"{args.verify_json}: not a readable verify report ({e})") from None
        from .pack import open_pack

        check_verify_report(report, open_pack(args.pack), args.verify_json)
    elif args.verify:
        from .gates import verify

        report = verify(args.verify, args.pack, texts=args.texts, progress=not args.quiet).to_json()
    out = export_hf(args.pack, args.dir, verify_report=report, command=args.command_line)
    files = sorted(f.relative_to(out).as_posix() for f in out.rglob("*") if f.is_file())
    if report is not None and not report["passed"]:
        print("hhtld: note: not every gate of the verify report passed; the model card says which", file=sys.stderr)
    summary = {"folder": str(out), "files": files, "verified": report is not None,
               "passed": None if report is None else report["passed"]}
    if args.json:
        _emit_json(summary, args.json)
    if args.json not in (True, "-"):
        print(f"wrote {out} ({len(files)} files; model card: "
              f"{'the verify report' if report is not None else 'no behaviour measured'})")
    return 0


def cmd_probe_attention(args) -> int:
    from .probe import probe_attention

    rules = _rules_only(args)
    res = probe_attention(args.model, args.tensor, queries=args.queries, noise=args.noise, k=args.k,
                          codec=args.codec, seed=args.seed, rules=rules)
    if args.json:
        _emit_json(res.to_json(), args.json)
    if args.json not in (True, "-"):
        print(res.format())
        if args.json:
            print(f"wrote {args.json}")
    return 0


def _load_options(args) -> dict:
    if args.cache_layers < 0:
        raise OptionsError(f"--cache-layers must be >= 0, got {args.cache_layers}")
    if args.cache_layers and not args.keep_compressed:
        raise OptionsError("--cache-layers applies to --keep-compressed")
    if args.tables != "int16" and not args.keep_compressed:
        raise OptionsError("--tables applies to --keep-compressed")
    return {"config": args.config, "dtype": None if args.dtype == "auto" else args.dtype,
            "keep_compressed": args.keep_compressed, "cache_layers": args.cache_layers, "tables": args.tables}


def cmd_embed(args) -> int:
    import numpy as np

    from .loader import embed, embedding_pooling

    if args.batch_size < 1:
        raise OptionsError(f"--batch-size must be >= 1, got {args.batch_size}")
    vecs = embed(args.pack, args.texts, batch_size=args.batch_size, **_load_options(args))
    pooling = embedding_pooling(args.pack)
    if args.json:
        _emit_json({"pack": str(args.pack), "pooling": pooling, "dim": int(vecs.shape[1]), "texts": args.texts,
                    "embeddings": [[float(x) for x in v] for v in vecs]}, args.json)
        if args.json not in (True, "-"):
            print(f"wrote {args.json}")
        return 0
    print(f"{len(args.texts)} embedding(s) of {vecs.shape[1]} dims (pooling: {pooling}); --json for the full vectors")
    for i, (t, v) in enumerate(zip(args.texts, vecs)):
        head = " ".join(f"{x:+.4f}" for x in v[:4])
        short = t if len(t) <= 48 else t[:45] + "..."
        print(f"[{i}] norm {np.linalg.norm(v):.4f}  {head} ... {v[-1]:+.4f}  {short!r}")
    if len(vecs) > 1:
        n = np.linalg.norm(vecs, axis=1, keepdims=True)
        cos = (vecs / np.maximum(n, 1e-12)) @ (vecs / np.maximum(n, 1e-12)).T
        print("cosine similarity:")
        print("     " + "".join(f"{f'[{j}]':>8}" for j in range(len(vecs))))
        for i, row in enumerate(cos):
            print(f"{f'[{i}]':>5}" + "".join(f"{c:8.4f}" for c in row))
    return 0


def cmd_generate(args) -> int:
    from .loader import generate

    live = not args.json

    def show(piece: str) -> None:
        print(piece, end="", flush=True)

    g = generate(args.pack, args.prompt, max_new_tokens=args.max_new_tokens, chat=args.chat,
                 stream=show if live else None, engine=args.engine, **_load_options(args))
    if args.json:
        _emit_json({"pack": str(args.pack), "prompt": g.prompt, "chat": g.chat, "text": g.text, "tokens": g.tokens,
                    "prompt_tokens": g.prompt_tokens, "new_tokens": len(g.tokens), "seconds": g.seconds,
                    "tokens_per_second": g.tokens_per_second, "peak_memory_bytes": g.peak_memory,
                    "memory_before_load_bytes": g.base_memory,
                    "keep_compressed": args.keep_compressed, "tables": args.tables, "engine": g.engine}, args.json)
        if args.json not in (True, "-"):
            print(f"wrote {args.json}")
        print(g.summary(), file=sys.stderr)
        return 0
    print(flush=True)  # the text's line ends before the summary on stderr
    print(g.summary(), file=sys.stderr)
    return 0


def _add_memory_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--memory-limit", default=None, metavar="SIZE",
                   help="bytes one decode may allocate, e.g. 4G or 512MiB (default: what the process may really use: "
                        "available memory, cgroup and ulimit limits, less a margin; also HHTLD_MEMORY_LIMIT)")


def _add_load_args(p: argparse.ArgumentParser) -> None:
    _add_memory_arg(p)
    g = p.add_argument_group("loading the pack")
    g.add_argument("--config", default=None, metavar="CONFIG",
                   help="config.json (or a folder holding one) for a pack that carries none")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="dtype of the float weights (default: each as the checkpoint stored it)")
    g.add_argument("--keep-compressed", action="store_true",
                   help="keep encoded Linear/Embedding weights compressed in memory, decoded on use")
    g.add_argument("--cache-layers", type=int, default=0, metavar="N",
                   help="with --keep-compressed: keep the N most recently decoded weights (default 0)")
    g.add_argument("--tables", default="int16", choices=["int16", "float32"],
                   help="with --keep-compressed: the kernels' lookup tables, int16 (12-bit entries, the fast "
                        "vector sums) or float32 (the decoded product up to float32 rounding); default int16")


def _rules_only(args):
    """The rule table of ``--rule``/``--rules`` (commands without the encodable policy)."""
    extra = [parse_rule(r) for r in args.rule]
    if args.rules:
        extra += load_rules_file(args.rules)
    rules = DEFAULT_RULES.with_overrides(extra) if extra else DEFAULT_RULES
    return rules.group_by(getattr(args, "group_by", "role"))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hhtld", description="Compress the weights of a transformer model into one "
                                ".hhtld pack and prove what it cost. Format and design: docs/format.md, docs/design.md.")
    p.add_argument("--version", action="version", version=f"hhtld {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    e = sub.add_parser("encode", help="compress a safetensors model into one .hhtld pack",
                       description="Compress a .safetensors file, a sharded index or a model folder into one .hhtld pack.")
    e.add_argument("model", help="model.safetensors, model.safetensors.index.json, or a model folder")
    e.add_argument("-o", "--output", required=True, help="the .hhtld pack to write (atomically)")
    e.add_argument("--codec", default=DEFAULT_CODEC, choices=sorted(CODECS), help="codec (default %(default)s)")
    e.add_argument("--k", type=int, default=None, help="hhtl-f32/hhtl-d: palette size, 0 < k <= 256 (default 256)")
    e.add_argument("--leaf-lanes", type=int, default=None, help="Slot L lanes of index-regime groups (hhtl-f32 default 8, hhtl-vq default 0)")
    e.add_argument("--target", choices=["behaviour", "rows"], default=None,
                   help="hhtl-vq rate allocation: 'behaviour' = cheapest allocation that keeps the model's outputs "
                        "on calibration texts within the verify thresholds (RUNS THE MODEL: needs a runnable "
                        "config.json; falls back to 'rows' with a note), 'rows' = per group the cheapest setting "
                        "whose decoded rows pass gate 1 (data-free). Default: behaviour, or rows with --bpw")
    e.add_argument("--bpw", type=float, default=None, metavar="X",
                   help="hhtl-vq: spend a fixed budget of X bits per encoded weight (all stored bytes of the groups); "
                        "data-free unless --target behaviour is given too")
    e.add_argument("--config", default=None, metavar="CONFIG",
                   help="config.json (or a folder holding one) to run the model for --target behaviour")
    tg = e.add_argument_group("behaviour target (checked on calibration text; exit status 3 when missed)")
    tg.add_argument("--max-kl", type=float, metavar="X", help="causal LMs: mean next-token KL in nats (default 0.02)")
    tg.add_argument("--max-ppl-ratio", type=float, metavar="X", help="causal LMs: perplexity ratio (default 1.02)")
    tg.add_argument("--min-top1", type=float, metavar="X", help="embedding models: top-1 retrieval (default 0.95)")
    tg.add_argument("--min-cosine", type=float, metavar="X", help="embedding models: mean cosine (default 0.995)")
    tg.add_argument("--max-rounds", type=int, default=None, metavar="N",
                    help="encode again (analysis reused) while the check misses the target, at most N times "
                         "(default 2)")
    tg.add_argument("--tune-steps", type=int, default=None, metavar="N",
                    help="the block step after each round's encode: at most N Adam steps per block tuning the "
                         "row gains to the original block's outputs (default 10 for causal LMs; 0, none, for "
                         "embedding models, whose check ranks the calibration sentences themselves)")
    tg.add_argument("--global-steps", type=int, default=None, metavar="N",
                    help="the global step after it: at most N Adam steps tuning the blocks' row gains to the "
                         "original model's outputs, judged on calibration texts it does not train on (holds the "
                         "whole model; default none)")
    tg.add_argument("--calibration-texts", type=int, default=None, metavar="N",
                    help="calibration texts (default: 32 prose passages of 256 tokens for causal LMs, "
                         "256 sentences for embedding models)")
    e.add_argument("--stages", default=None,
                   help="hhtl-vq: one fixed setting for every group instead of an allocation, e.g. '4', '4,3', '2+4' "
                        "(segment widths per residual stage; WIDTH:K for palettes of K > 256)")
    e.add_argument("--rotate", default=None, metavar="BOOL",
                   help="hhtl-vq: randomised Hadamard rotation before quantising (default true)")
    e.add_argument("--gain", default=None, metavar="BOOL",
                   help="hhtl-vq: per-row bf16 gain (default true)")
    e.add_argument("--seed", type=int, default=None, help="hhtl-vq: seed of palettes and rotation (default 0)")
    e.add_argument("--sample-rows", type=int, default=DEFAULT_SAMPLE_ROWS, metavar="N",
                   help="rows each group's palettes/basis are trained on, drawn evenly across its tensors "
                        "(default %(default)s); memory and time of the training do not grow with the layer count")
    e.add_argument("--threads", type=int, default=None, metavar="N",
                   help="worker threads (default: the usable cores); the pack is the same for any N")
    e.add_argument("--no-aux-files", action="store_true", help="do not carry a model folder's config/tokenizer files")
    e.add_argument("--resume", action="store_true",
                   help="continue from the finished units an interrupted encode of the same model with the same "
                        "options kept in OUTPUT.partial/ (the same pack as an uninterrupted run), and keep them if "
                        "this run is interrupted too; without it nothing partial is left")
    e.add_argument("--memory-limit", default=None, metavar="SIZE",
                   help="what the tensor encodes running at once in this process may hold together, e.g. 8G "
                        "(fewer run side by side when they would not fit; default: the memory available, less a "
                        "margin; also HHTLD_MEMORY_LIMIT; with --executor ray each task asks Ray for its own "
                        "memory instead); the pack is the same bytes")
    e.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="where the group fits and tensor encodes run: 'local' threads (default) or 'ray', a Ray cluster "
                        "(pip install 'hhtld[ray]'; a local one of --threads workers unless --ray-address); the "
                        "pack is the same bytes")
    e.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="with --executor ray: the address of a running cluster (e.g. ray://host:10001 or auto)")
    e.add_argument("--hf-dir", default=None, metavar="DIR",
                   help="also write the pack as a Hugging Face folder DIR (as hhtld export-hf, without a verify "
                        "report)")
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
    d.add_argument("--force", action="store_true", help="overwrite files that already exist in the output folder")
    _add_memory_arg(d)
    d.set_defaults(func=cmd_decode)

    i = sub.add_parser("inspect", help="group table of a model (dry run) or of a pack",
                       description="Print the groups (key, regime, tensors, rows, bytes) of a model or of a pack.")
    i.add_argument("path", help="a model (file, index, folder) or a .hhtld pack")
    i.add_argument("--json", nargs="?", const=True, metavar="FILE", help="print (or write to FILE) JSON")
    i.add_argument("--check", action="store_true",
                   help="a pack: verify the hash and values of every stored array first, read by a decode or not")
    ip = i.add_argument_group("--plan: the units an encode of the model would run (nothing is run or written)")
    ip.add_argument("--plan", action="store_true",
                    help="a model: the encode's units, their dependencies, predicted memory and (once units of "
                         "their kind have run on this machine) time")
    ip.add_argument("--codec", default=None, choices=sorted(CODECS), help="as for encode")
    ip.add_argument("--stages", default=None, help="as for encode")
    ip.add_argument("--target", choices=["behaviour", "rows"], default=None, help="as for encode")
    ip.add_argument("--bpw", type=float, default=None, metavar="X", help="as for encode")
    ip.add_argument("--calibration-texts", type=int, default=None, metavar="N", help="as for encode")
    ip.add_argument("--sample-rows", type=int, default=DEFAULT_SAMPLE_ROWS, metavar="N", help="as for encode")
    ip.add_argument("--threads", type=int, default=None, metavar="N", help="as for encode")
    _add_policy_args(i)
    i.set_defaults(func=cmd_inspect)

    pr = sub.add_parser("probe", help="codec-space experiments (docs/design.md §6)",
                        description="Experiments that ask whether codec-space lookups can stand in for real products.")
    psub = pr.add_subparsers(dest="probe", required=True, metavar="PROBE")
    pa = psub.add_parser("attention", help="top-1/top-5 agreement of Fisher-z lookups with exact q·K scores",
                         description="Queries are rows of the key matrix TENSOR plus seeded noise; raw scores are the "
                                     "exact dot products, codec scores Fisher-z lookups of twig pairs. Verdict on top-1: "
                                     ">= 90%% viable, 70-90%% needs escalation, < 70%% not competitive.")
    pa.add_argument("model", help="model.safetensors, model.safetensors.index.json, or a model folder")
    pa.add_argument("--tensor", required=True, help="the key matrix, e.g. encoder.layer.0.attention.self.key.weight")
    pa.add_argument("--queries", type=int, default=512, help="number of queries (default %(default)s)")
    pa.add_argument("--noise", type=float, default=0.05, help="noise std per element, relative to the row RMS (default %(default)s)")
    pa.add_argument("--k", type=int, default=256, help="palette size, 0 < k <= 256 (default %(default)s)")
    pa.add_argument("--codec", default="hhtl-d", choices=["hhtl-d", "hhtl-f32"], help="codec (default %(default)s)")
    pa.add_argument("--seed", type=int, default=0, help="seed of the query draw and noise (default %(default)s)")
    pa.add_argument("--json", nargs="?", const=True, metavar="FILE", help="print (or write to FILE) the result as JSON")
    pa.add_argument("--rule", action="append", default=[], metavar="PATTERN=ROLE", help="classification rule (see encode)")
    pa.add_argument("--rules", metavar="FILE.json", help="JSON rules file (see encode)")
    pa.set_defaults(func=cmd_probe_attention)

    em = sub.add_parser("embed", help="sentence embeddings of TEXTs from an embedding-model pack",
                        description="Sentence embeddings straight from PACK (no dense files): as sentence-transformers "
                                    "computes them when the pack carries its files (modules.json, pooling config), "
                                    "else mean pooling over the attention mask and L2 normalisation. Prints a short "
                                    "view of each vector and their cosine similarities; --json gives the full vectors.")
    em.add_argument("pack", help="the .hhtld pack of an embedding model (e.g. BERT, MiniLM)")
    em.add_argument("texts", nargs="+", metavar="TEXT", help="the texts to embed")
    em.add_argument("--batch-size", type=int, default=32, help="texts per forward pass (default %(default)s)")
    em.add_argument("--json", nargs="?", const=True, metavar="FILE", help="print (or write to FILE) the vectors as JSON")
    _add_load_args(em)
    em.set_defaults(func=cmd_embed)

    ge = sub.add_parser("generate", help="greedy continuation of PROMPT by a causal-LM pack",
                        description="Greedy decoding straight from PACK (no dense files); prints the new text only. "
                                    "--chat wraps PROMPT as one user message in the tokenizer's chat template.")
    ge.add_argument("pack", help="the .hhtld pack of a causal LM (Llama, Qwen2, Mistral, GPT-2, ...)")
    ge.add_argument("prompt", help="the prompt text")
    ge.add_argument("--max-new-tokens", type=int, default=32, metavar="N", help="tokens to generate at most (default %(default)s)")
    ge.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template to PROMPT (a user turn)")
    ge.add_argument("--engine", default="auto", choices=["auto", "lean", "transformers"],
                    help="what runs the model: lean (hhtld's decode loop for float32 Llama-family models: "
                         "transformers' greedy tokens without its per-token overhead), transformers (its generate), "
                         "auto (default: lean where it applies)")
    ge.add_argument("--json", nargs="?", const=True, metavar="FILE",
                    help="print (or write to FILE) the text, token ids and timing as JSON")
    _add_load_args(ge)
    ge.set_defaults(func=cmd_generate)

    v = sub.add_parser("verify", help="measure the four gates of a pack against its model (docs/design.md §5)",
                       description="Row fidelity, behaviour parity, storage and output agreement of PACK against "
                                   "MODEL, with real inference on held-out text. Exit status 0 only if every gate "
                                   "passes (2 if one fails, 1 on an error).")
    v.add_argument("model", help="the original model: folder, .safetensors file or index")
    v.add_argument("pack", help="the .hhtld pack made from it")
    v.add_argument("--config", help="config.json (or a folder with it and the tokenizer) for a bare .safetensors")
    v.add_argument("--json", nargs="?", const=True, metavar="FILE", help="write the report as JSON to FILE (or print it)")
    v.add_argument("--plots", metavar="DIR", help="write PNG plots (row-cosine histograms, bytes per group) into DIR")
    v.add_argument("--no-fail", action="store_true", help="exit 0 even when a gate fails")
    _add_memory_arg(v)
    v.add_argument("--texts", type=int, default=None, metavar="N",
                   help="use the first N held-out texts: sentences for embedding models (default all 256), passages "
                        "of each kind for causal LMs (default all 64 of each of 5 kinds)")
    v.add_argument("--greedy-tokens", type=int, default=32, metavar="N", help="causal LMs: greedy continuation length (0: off; default %(default)s)")
    v.add_argument("--greedy-texts", type=int, default=32, metavar="N", help="causal LMs: texts continued greedily (default %(default)s)")
    v.add_argument("-q", "--quiet", action="store_true", help="no progress bars and only the gate table")
    t = v.add_argument_group("targets (defaults: docs/design.md §5)")
    t.add_argument("--argmax-median", type=float, metavar="X", help="gate 1: argmax-regime median row cosine (default 0.95)")
    t.add_argument("--argmax-p5", type=float, metavar="X", help="gate 1: argmax-regime 5th-percentile row cosine (default 0.90)")
    t.add_argument("--index-median", type=float, metavar="X", help="gate 1: index-regime median row cosine (default 0.98)")
    t.add_argument("--index-p5", type=float, metavar="X", help="gate 1: index-regime 5th-percentile row cosine (default 0.95)")
    t.add_argument("--min-top1", type=float, metavar="X",
                   help="gate 2, embedding models: top-1 retrieval agreement, a fraction (default 0.95)")
    t.add_argument("--max-ppl-ratio", type=float, metavar="X",
                   help="gate 2, causal LMs: held-out perplexity decoded / original (default 1.02)")
    t.add_argument("--min-ratio", type=float, metavar="X", help="gate 3: storage ratio vs bf16 (default 2.0)")
    t.add_argument("--min-cosine", type=float, metavar="X", help="gate 4: mean embedding cosine (default 0.995)")
    t.add_argument("--max-kl", type=float, metavar="X", help="gate 4: mean next-token KL in nats (default 0.02)")
    v.set_defaults(func=cmd_verify)

    x = sub.add_parser("export-hf", help="write a pack as a Hugging Face folder (from_pretrained after import hhtld.hf)",
                       description="Write PACK as a Hugging Face model folder DIR: config.json with a "
                                   "quantization_config, the carried tokenizer and side files, the pack, and a model "
                                   "card. Load it with `import hhtld.hf` and from_pretrained / pipeline / "
                                   "SentenceTransformer.")
    x.add_argument("pack", help="the .hhtld pack")
    x.add_argument("dir", help="the folder to write (new, or empty)")
    src = x.add_mutually_exclusive_group()
    src.add_argument("--verify-json", metavar="FILE", help="the JSON of `hhtld verify MODEL PACK --json FILE`: its "
                                                           "gates and figures per kind of text go into the card")
    src.add_argument("--verify", metavar="MODEL", help="run hhtld verify against the original MODEL first "
                                                       "(the card carries its figures)")
    x.add_argument("--texts", type=int, default=None, metavar="N", help="with --verify: as verify --texts")
    x.add_argument("--json", nargs="?", const=True, metavar="FILE", help="print (or write to FILE) what was written")
    x.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    x.set_defaults(func=cmd_export_hf)
    return p


class Terminated(BaseException):
    """SIGTERM or SIGHUP arrived: unwind like an interrupt (every ``except BaseException``
    cleanup runs), then exit with 128 + the signal number."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def _terminate_cleanly():
    """While a command runs in the main thread, SIGTERM and SIGHUP raise Terminated."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        signal.signal(signum, signal.SIG_IGN)  # a second signal must not break the unwind
        raise Terminated(signum)

    old = {}
    for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if sig is not None:
            old[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


@contextlib.contextmanager
def _notes_to_stderr():
    """Every HhtldNote the library issues becomes one ``hhtld: note: ...`` line on stderr."""
    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, HhtldNote):
            print(f"hhtld: note: {message}", file=sys.stderr)
        else:
            previous(message, category, filename, lineno, file, line)

    with warnings.catch_warnings():
        previous = warnings.showwarning
        warnings.simplefilter("always", HhtldNote)
        warnings.showwarning = show
        yield


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.command_line = "hhtld " + shlex.join(sys.argv[1:] if argv is None else argv)
    with _notes_to_stderr(), _terminate_cleanly():
        try:
            return _run(args)
        except Terminated as e:
            print("hhtld: terminated", file=sys.stderr)
            return 128 + e.signum
        finally:
            remove_all_temps()


def _run(args) -> int:
    try:
        with memory_limit(getattr(args, "memory_limit", None)):  # for this command only
            _check_outputs(args)
            return int(args.func(args) or 0)
    except HhtldError as e:
        print(f"hhtld: error: {e}", file=sys.stderr)
        return 1
    except MemoryError as e:  # past every check made before allocating: still one line, never a traceback
        print(f"hhtld: error: out of memory ({str(e) or 'MemoryError'}); this process may use "
              f"{system_room().describe()}: free memory, raise the limit (ulimit -v), or set a lower "
              "--memory-limit so that hhtld refuses before allocating", file=sys.stderr)
        return 1
    except RuntimeError as e:
        if "start new thread" not in str(e):
            raise
        print(f"hhtld: error: cannot start a thread ({e}): too little memory or too many processes; "
              "set HHTLD_DECODE_THREADS=1 or --threads 1, or raise the limit (ulimit -v, ulimit -u)", file=sys.stderr)
        return 1
    except BrokenPipeError:  # output piped into a reader that closed early (e.g. `| head`)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as e:
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        print(f"hhtld: error: {where}{e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("hhtld: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
