"""`specialize align`: teacher samples → aligned student shards (see bulk.py)."""
from __future__ import annotations

import argparse
import sys

from .bulk import TeacherRecordError, align_teacher_dir, format_summary


def build_parser() -> argparse.ArgumentParser:
    # the stdlib's defaults formatter: aligner/ imports nothing of the engine (engine/cli.HelpFormatter)
    p = argparse.ArgumentParser(prog="specialize align", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description="Align teacher top-k distributions onto student tokens.")
    p.add_argument("--teacher-data", required=True, help="folder with samples-*.jsonl (teacher output)")
    p.add_argument("--student-tokenizer", required=True, help="student tokenizer path or hub id")
    p.add_argument("--out", required=True, help="output folder for aligned shards")
    p.add_argument("--workers", type=int, default=1, help="processes over shards (threads with one shard)")
    p.add_argument("--teacher-tokenizer", default=None,
                   help="p50k_base or a .tiktoken file; only used to tokenize records that lack 'tokens'")
    p.add_argument("--band", type=int, default=0, help="DP band half-width; 0 = full table")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        rows = align_teacher_dir(args.teacher_data, args.student_tokenizer, args.out, workers=args.workers,
                                 band=args.band, teacher_tokenizer=args.teacher_tokenizer,
                                 progress=not args.no_progress)
    except (TeacherRecordError, FileNotFoundError, ValueError) as e:
        print(f"specialize align: error: {e}", file=sys.stderr)
        return 1
    print(format_summary(rows))
    print(f"aligned shards in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
