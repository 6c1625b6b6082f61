"""Command line: ``itmzoo list | info``; training, evaluation and conversion commands join here."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence


def _cmd_list(args: argparse.Namespace) -> int:
    from .registry import list_models

    caps = {}
    for key in ("input_kind", "scoring", "text_backbone"):
        if getattr(args, key):
            caps[key] = getattr(args, key)
    if args.has_weights:
        caps["has_weights"] = True
    for name in list_models(args.pattern, include_tags=args.tags, **caps):
        print(name)
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from .registry import model_info

    print(json.dumps(model_info(args.name), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="itmzoo", description="Image-text matching model zoo")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = p.add_subparsers(dest="command", required=True)
    pl = sub.add_parser("list", help="list registered models")
    pl.add_argument("pattern", nargs="?", default=None, help="glob, e.g. 'esa*'")
    pl.add_argument("--input-kind", dest="input_kind", choices=["regions", "pixels"])
    pl.add_argument("--scoring", choices=["embedding", "cross", "two-stage"])
    pl.add_argument("--text-backbone", dest="text_backbone")
    pl.add_argument("--has-weights", action="store_true")
    pl.add_argument("--tags", action="store_true", help="list method.tag names")
    pl.set_defaults(func=_cmd_list)
    pi = sub.add_parser("info", help="paper, upstream, capabilities and default config of a model")
    pi.add_argument("name")
    pi.set_defaults(func=_cmd_info)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("itmzoo: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one clear line unless --debug
        if args.debug:
            raise
        print(f"itmzoo {args.command}: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
