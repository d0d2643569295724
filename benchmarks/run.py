"""Run the benchmarks and print one JSON line per measurement.

    python benchmarks/run.py [--quick] [--only NAME[,NAME...]] [--out FILE] [--markdown FILE]

Each measurement runs in its own child process with ``--threads`` threads (2 by default), warm-up and
repeats. The machine's dense fp32 matmul throughput is measured first, in the same run, and training
figures are reported as model FLOPs utilisation against it, generation figures against the time their
matmuls would take at it. ``--only`` takes names or shell patterns (``gen_*``); ``--list`` shows the names.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import shlex
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

FIRST_FIELDS = ("name", "median_s", "min_s", "max_s")
LAST_FIELDS = ("peak_rss_mb", "config", "torch", "threads", "device")


def _rounded(value):
    if isinstance(value, float):
        return float(f"{value:.5g}")
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_rounded(v) for v in value]
    return value


def json_line(name: str, result: dict) -> str:
    """One measurement as a JSON object: name and timing first, environment last."""
    ordered = {"name": name}
    ordered.update({k: result[k] for k in FIRST_FIELDS[1:] if k in result})
    ordered.update({k: v for k, v in result.items() if k not in FIRST_FIELDS + LAST_FIELDS})
    ordered.update({k: result[k] for k in LAST_FIELDS if k in result})
    return json.dumps(_rounded(ordered))


def select(names: list[str], only: str | None) -> list[str]:
    """Names matching any comma-separated pattern of ``only`` (all when None); ``matmul`` always first."""
    if not only:
        return names
    patterns = [p.strip() for p in only.split(",") if p.strip()]
    unknown = [p for p in patterns if not fnmatch.filter(names, p)]
    if unknown:
        raise SystemExit(f"--only: no measurement matches {unknown}; use --list to see the names")
    chosen = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    return ["matmul", *[n for n in chosen if n != "matmul"]]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: the whole run takes about a minute")
    parser.add_argument("--only", help="comma-separated names or shell patterns of measurements to run")
    parser.add_argument("--out", type=Path, help="also write the JSON lines to this file")
    parser.add_argument("--markdown", type=Path, help="write the results and targets as a markdown table here")
    parser.add_argument("--threads", type=int, default=2, help="torch threads in each measurement (default 2)")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda when available)")
    parser.add_argument("--timeout", type=float, help="seconds per measurement (default 3600, quick 120)")
    parser.add_argument("--list", action="store_true", help="print the measurement names and exit")
    parser.add_argument("--from", dest="from_file", type=Path,
                        help="measure nothing: report the JSON lines of an earlier --out file")  # fmt: skip
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # imported here so --help stays fast; loaded once so that the forked children start without importing
    import dalle_pytorch  # noqa: F401
    from benchmarks import cases, compile_cases, decoder_cases, precision_cases, prior_cases, report
    from benchmarks.harness import pick_device, run_isolated

    registry = {
        **cases.registry(args.quick),
        **decoder_cases.registry(args.quick),
        **prior_cases.registry(args.quick),
        **compile_cases.registry(args.quick),
        **precision_cases.registry(args.quick),
    }
    if args.list:
        print("\n".join(registry))
        return 0
    given = argv if argv is not None else sys.argv[1:]
    command = "python benchmarks/run.py " + " ".join(shlex.quote(a) for a in given)
    results: dict[str, dict] = {}
    if args.from_file:
        for line in args.from_file.read_text().splitlines():
            stored = json.loads(line)
            results[stored["name"]] = report.derive(stored["name"], stored, results)
        names, out_file = [], None
    else:
        names = select(list(registry), args.only)
        out_file = args.out.open("w") if args.out else None
    device = pick_device(args.device)
    timeout = args.timeout or (120.0 if args.quick else 3600.0)
    try:
        for name in names:
            target, params = registry[name]
            raw = run_isolated(target, {"quick": args.quick, **params}, threads=args.threads, device=device,
                               timeout_s=timeout)  # fmt: skip
            results[name] = report.derive(name, raw, results)
            line = json_line(name, results[name])
            print(line, flush=True)
            if out_file:
                out_file.write(line + "\n")
                out_file.flush()
    finally:
        if out_file:
            out_file.close()
    for row in report.check_targets(results, args.quick):
        if row["met"] is not None:
            status = "met" if row["met"] else "MISSED"
            print(f"target {status}: {row['target']} ({row['field']} = {row['value']:.3g})", file=sys.stderr)
    if args.markdown:
        args.markdown.write_text(report.markdown(results, command, args.quick))
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
