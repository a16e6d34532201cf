"""How every malformed input ends: the command line's corpus and the server's, tallied by class.

    python benchmarks/bad_inputs.py            # both corpora
    python benchmarks/bad_inputs.py --only cli # or --only server

The cases are the tests' own (tests/test_cli_bad_inputs.py, tests/test_server_untrusted.py),
judged by the same rules: a refused input ends with a non-zero exit (CLI) or the expected
status (server), one line naming the problem, no traceback, nothing left behind and the
server still serving; a valid edge input (an 8K frame, a GIF) ends with a playable output.
Prints one row per class and every case that did not end as it should; exits 1 if any did.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # the corpora live beside the tests


def cli_verdicts() -> list[tuple[str, str, str, bool]]:
    """(class, case, how it ended, as it should) for each command-line case."""
    from test_cli_bad_inputs import CASES, run_case

    rows = []
    with tempfile.TemporaryDirectory() as top:
        os.environ["LIVESTYLE_MODELS"] = str(Path(top) / "models")  # no user models in the way
        os.environ["XDG_CONFIG_HOME"] = str(Path(top) / "config")
        for i, case in enumerate(CASES):
            o = run_case(case, Path(top) / str(i))
            clean = not o.traceback and not o.leftovers
            if case.ok:
                ended, good = f"exit {o.code}, {len(o.outputs)} output(s)", clean and o.code == 0 and bool(o.outputs)
            else:
                ended = f"exit {o.code}: {o.last_line}"
                good = clean and o.code not in (0, None) and o.lines == 1 and case.expect in o.last_line
            if o.traceback:
                ended += " [traceback]"
            if o.leftovers:
                ended += f" [left behind: {', '.join(o.leftovers)}]"
            rows.append((f"cli {case.cls}" + (" (valid edge)" if case.ok else ""), case.name, ended, good))
    return rows


def server_verdicts() -> list[tuple[str, str, str, bool]]:
    """(class, case, how it ended, as it should) for each server case."""
    from test_server_untrusted import CASES, run_cases

    from livestyle.capture.sources import SyntheticSource
    from livestyle.models.demo import load_demo
    from livestyle.stream.engine import Engine

    clip = [f.to_ndarray(format="rgb24") for f in SyntheticSource("astronaut", (96, 64), fps=30, frames=15)]
    with Engine(load_demo) as engine:
        outcomes = asyncio.run(run_cases(engine, CASES, clip))
    rows = []
    for case in CASES:
        o = outcomes[case.key]
        good = (o.result == case.expect and case.mention in o.error and "\n" not in o.error.strip()
                and not o.traceback and o.serving)
        ended = f"{o.result}: {o.error}" + (" [traceback]" if o.traceback else "") + ("" if o.serving else " [not serving]")
        rows.append((f"server {case.cls}", case.name, ended, good))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("cli", "server"))
    args = parser.parse_args()
    rows = []
    if args.only in (None, "cli"):
        rows += cli_verdicts()
    if args.only in (None, "server"):
        rows += server_verdicts()
    tried, good = Counter(r[0] for r in rows), Counter(r[0] for r in rows if r[3])
    endings = defaultdict(Counter)
    for cls, _, ended, _ in rows:
        endings[cls][ended.split(":")[0].split(",")[0]] += 1
    print("| class | inputs | ended as they should | how they ended |")
    print("| --- | --- | --- | --- |")
    for cls in tried:
        how = ", ".join(f"{k} x{n}" for k, n in endings[cls].most_common())
        print(f"| {cls} | {tried[cls]} | {good[cls]} | {how} |")
    print(f"| all | {sum(tried.values())} | {sum(good.values())} | |")
    wrong = [r for r in rows if not r[3]]
    for cls, name, ended, _ in wrong:
        print(f"NOT AS IT SHOULD: {cls} / {name}: {ended}")
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
