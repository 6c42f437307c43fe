"""``banaserve sim calibrate|serving|validate|run``: argument parsing and wiring only."""

from __future__ import annotations

import argparse


def add_sim(sub: argparse._SubParsersAction, full: bool = True) -> None:
    """``full``: build the subcommands' flags (imports numpy, the router, the coordinator)."""
    p = sub.add_parser("sim", help="cluster simulator: calibrate, validate, run at scale")
    if not full:
        p.add_argument("rest", nargs=argparse.REMAINDER)
        return
    ssub = p.add_subparsers(dest="sim_command", required=True)
    from services.sim import calibrate, scale, serving, validate

    for name, module, text in (
        ("calibrate", calibrate, "profile the engine here and write the time model"),
        ("serving", serving, "fit a profile's serving overhead on a real bench compare run"),
        ("validate", validate, "replay a bench compare JSON in the simulator, side by side"),
        ("run", scale, "banaserve vs colocated vs best static PD at 8-128 workers"),
    ):
        q = ssub.add_parser(name, help=text, description=module.__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
        module.add_arguments(q)
        q.set_defaults(func=module.run)
