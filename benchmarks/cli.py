"""`python -m benchmarks`: measure the ceilings and the workloads, print the table, write the JSON."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .report import format_table
from .suite import DEFAULT_SECTIONS, SECTIONS, load_config, run_suite
from .workloads import PRECISIONS

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="CI size: the `quick` config, well under 2 minutes")
    size.add_argument("--tiny", action="store_true", help="test size: the `tiny` config, seconds; figures meaningless")
    size.add_argument("--config", default="small", help="config name in benchmarks/configs or a JSON path")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(DEFAULT_SECTIONS),
                        help="workloads to run (default: all but `ablation`); the ceilings are always measured")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="the optimized mode's precision (default auto: bf16 where the measured bf16 matmul "
                             "ceiling beats fp32's, fp32 where it does not, e.g. an AVX2-only CPU)")
    parser.add_argument("--json", type=Path, default=None,
                        help="where to write the results (default benchmarks/results/<config>.json)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load_config("quick" if args.quick else "tiny" if args.tiny else args.config)
    except (FileNotFoundError, ValueError) as err:
        print(f"python -m benchmarks: error: {err}", file=sys.stderr)
        return 2
    results = run_suite(config, tuple(args.sections), log=lambda msg: print(msg, file=sys.stderr, flush=True),
                        precision=args.precision)
    print(format_table(results))
    path = args.json or RESULTS_DIR / f"{config['name']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {path}")
    return 0
