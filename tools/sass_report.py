"""Static SASS report of the pyramid-pool kernels and torchvision's roi_pool (no GPU needed).

Usage::

    python tools/sass_report.py                                   # sm_90 all, sm_80 main rows
    python tools/sass_report.py --arch 90 --cases 'fwd-max-1-2-4-*'
    python tools/sass_report.py --output-dir benchmarks/results/sass_<date>

Writes ``sass_report.md`` and ``sass_report.json`` to ``--output-dir`` (default
``output/sass_<date>/``). See :mod:`spp_triton.bench.sass` for what is measured.
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from spp_triton.bench import sass  # noqa: E402


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=_ints, default=[90, 80], help="e.g. 90,80 (default)")
    parser.add_argument(
        "--full-arch",
        type=_ints,
        default=[90],
        help="archs that get every variant; the others only the main rows (fp32, NCHW)",
    )
    parser.add_argument(
        "--cases",
        default="",
        help="comma-separated glob patterns on variant names, e.g. 'fwd-max-*-1map-fp32-*'",
    )
    parser.add_argument("--list", action="store_true", help="list the variant names and exit")
    parser.add_argument("--jobs", type=int, default=None, help="compile processes (default: CPUs)")
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=None,
        help="default output/sass_<date>/; the committed copy: benchmarks/results/sass_<date>/",
    )
    parser.add_argument("--sass-dir", type=Path, default=None, help="also keep each SASS here")
    parser.add_argument(
        "--no-specializations", action="store_true", help="skip the variant count over map sizes"
    )
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    patterns = [p.strip() for p in args.cases.split(",") if p.strip()]
    if args.list:
        print("\n".join(v.name for v in sass.select_variants(patterns)))
        return 0
    if not sass.select_variants(patterns):
        parser.error(f"--cases {args.cases!r} matches no variant (see --list)")
    out_dir = args.output_dir or Path("output") / f"sass_{datetime.date.today().isoformat()}"
    report = sass.run_report(
        archs=args.arch,
        patterns=patterns,
        full_archs=args.full_arch,
        jobs=args.jobs,
        sass_dir=args.sass_dir,
        specializations=not args.no_specializations,
        command="python " + shlex.join(["tools/sass_report.py", *argv]),
    )
    _, md = sass.write_report(report, out_dir)
    print(md.read_text())
    print(f"wrote {out_dir}/sass_report.md and sass_report.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
