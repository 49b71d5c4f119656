"""`qwenvl` console command."""

from __future__ import annotations

import argparse
import sys


def _convert(args: argparse.Namespace) -> int:
    from .convert import ConversionError, convert_official_checkpoint

    try:
        out = convert_official_checkpoint(args.src, args.dst, max_shard_size=args.max_shard_size)
    except ConversionError as err:
        print(f"qwenvl convert: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwenvl", description="Qwen-VL for transformers 5")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="convert an original Qwen-VL snapshot into a hub-ready folder")
    p.add_argument("src", help="folder of the original snapshot (config.json, weights, qwen.tiktoken)")
    p.add_argument("dst", help="new output folder")
    p.add_argument("--max-shard-size", default="5GB")
    p.set_defaults(func=_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
