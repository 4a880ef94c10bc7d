#!/usr/bin/env python
"""Regenerate the README's supported-models table from a fresh sweep.

    python scripts/support_table.py            # run the sweep, rewrite the README section, print a summary
    python scripts/support_table.py --check    # exit 1 if the README section is stale (writes nothing)

The sweep (tests/support/sweep.py) discovers every fused-experts class in the installed transformers, builds a
tiny model of its model type, quantizes it with the nvfp4 and w4a16-int4 presets, exports both layouts, reloads
with moeq.load and compares outputs exactly. The table sits between the `support-table` markers under
"## Supported models"; tests/support/test_support.py fails when it differs from a fresh rendering.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

from support import sweep, table  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only check that the README section is up to date")
    ap.add_argument("-v", "--verbose", action="store_true", help="print each model type as it finishes")
    args = ap.parse_args(argv)

    def log(r: sweep.ModelResult) -> None:
        if args.verbose:
            state = "pass" if r.passed else ("skip" if r.skip_reason else "FAIL")
            print(f"{r.model_type:32s} {state:4s} {r.seconds:5.1f}s", file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="moeq-support-") as tmp:
        results = sweep.run_sweep(tmp, log=log)
    seconds = time.perf_counter() - t0
    body = table.render(results)
    text = table.README.read_text()
    new = table.replace_section(text, body)

    n = len({r.model_type for r in results})
    ok = {r.model_type for r in table.passing(results)}
    print(f"{len(ok)}/{n} model types pass every applicable preset and layout (sweep {seconds:.1f}s)")
    for r in results:
        if r.passed:
            continue
        print(f"  {r.model_type} ({r.experts_class}): {table.notes(r)}")

    if args.check:
        if new != text:
            print(f"README.md's supported-models table is stale; run `{table.REGENERATE}`", file=sys.stderr)
            return 1
        print("README.md's supported-models table is up to date")
        return 0
    if new != text:
        table.README.write_text(new)
        print(f"rewrote the supported-models table in {table.README}")
    else:
        print("README.md already up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
