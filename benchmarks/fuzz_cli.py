"""The CLI fuzz table of issue 12: every case of tests/fuzz_cases.py against a tiny world built in a temporary
directory, printed as case → class, with the totals handled / vague (silent: exit 0 on bad input, counted with
vague) / traceback / data loss.

    .venv/bin/python benchmarks/fuzz_cli.py                       # this checkout
    .venv/bin/python benchmarks/fuzz_cli.py --json runs/fuzz.json
    .venv/bin/python benchmarks/fuzz_cli.py --src /tmp/before     # another saekit tree (a git worktree)
    .venv/bin/python benchmarks/fuzz_cli.py -k resume -v          # only cases whose name contains 'resume'

`--src DIR` imports saekit from DIR/saekit, and saekit.apps / saekit.kernels from DIR/apps and DIR/kernels (what
pyproject's package-dir maps for an installed checkout), ahead of the editable install of this checkout.
The harness itself (tests/fuzz_cases.py) always comes from this checkout.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent / "tests"


class _TreeFinder:
    """A meta-path finder that maps saekit, saekit.apps and saekit.kernels onto another source tree."""

    def __init__(self, src: Path):
        self.mapping = {"saekit": src / "saekit", "saekit.apps": src / "apps", "saekit.kernels": src / "kernels"}

    def find_spec(self, fullname, path=None, target=None):
        where = self.mapping.get(fullname)
        if where is None or not (where / "__init__.py").is_file():
            return None
        return importlib.util.spec_from_file_location(fullname, where / "__init__.py",
                                                      submodule_search_locations=[str(where)])


def use_tree(src: Path) -> None:
    src = src.resolve()
    if not (src / "saekit" / "__init__.py").is_file():
        sys.exit(f"--src {src}: no saekit/__init__.py there")
    sys.path.insert(0, str(src))
    sys.meta_path.insert(0, _TreeFinder(src))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--src", type=Path, help="a saekit source tree to test instead of the installed one")
    ap.add_argument("--json", type=Path, help="also write the outcomes as JSON here")
    ap.add_argument("--tmp", type=Path, help="build the world here (default: a fresh temporary directory)")
    ap.add_argument("-k", dest="select", help="only cases whose name contains this")
    ap.add_argument("-v", "--verbose", action="store_true", help="print each non-handled case's output tail")
    args = ap.parse_args()
    if args.src:
        use_tree(args.src)
    sys.path.insert(0, str(TESTS))
    import saekit.apps

    import saekit

    print(f"saekit from {Path(saekit.__file__).parent}  (apps from {Path(saekit.apps.__file__).parent})", flush=True)
    import fuzz_cases as fc

    cases = [c for c in fc.CASES if not args.select or args.select in c.name]
    with tempfile.TemporaryDirectory(prefix="saekit-fuzz-") as tmp:
        start = time.perf_counter()
        world = fc.build_world(args.tmp or tmp)
        built = time.perf_counter() - start
        print(f"world built in {built:.1f} s under {world.root}", flush=True)
        outcomes = []
        for c in cases:
            o = fc.run_case(c, world)
            outcomes.append(o)
            print(f"  {o.case}: {o.verdict} ({o.seconds:.1f} s)", file=sys.stderr, flush=True)
            if args.verbose and o.verdict != "handled":
                print(o.describe(), file=sys.stderr, flush=True)
        ran = sum(o.seconds for o in outcomes)
        print()
        print(fc.table(outcomes))
        print(f"cases ran in {ran:.1f} s (world {built:.1f} s)")
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"saekit": str(Path(saekit.__file__).parent), "totals": fc.totals(outcomes),
                                             "world_seconds": built, "cases_seconds": ran,
                                             "outcomes": [o.as_dict() for o in outcomes]}, indent=2) + "\n")
            print(f"wrote {args.json}")
        fc._make_writable(world.root)  # the read-only directory, so the temporary directory can go
    return 0


if __name__ == "__main__":
    sys.exit(main())
