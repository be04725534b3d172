"""Run `python -m opd_exp train OVERRIDES…` and SIGKILL this process at a chosen moment:

    python -m tests.engines.kill_probe step N -- OVERRIDES…      before step index N runs
    python -m tests.engines.kill_probe publish N -- OVERRIDES…   inside the save of checkpoint N,
                                                                 its folder written, not yet renamed
"""

import os
import signal
import sys


def main() -> None:
    where, at, sep, *overrides = sys.argv[1:]
    assert sep == "--" and where in ("step", "publish")
    at = int(at)
    import opd_exp.train as train_module
    from opd_exp.runtime import checkpoint

    if where == "step":
        real_step = train_module.run_step

        def run_step(run, step):
            if step == at:
                os.kill(os.getpid(), signal.SIGKILL)
            return real_step(run, step)

        train_module.run_step = run_step
    else:
        real_publish = checkpoint._publish

        def publish(root, tmp, final, state, keep_last):
            if state["step"] == at:
                os.kill(os.getpid(), signal.SIGKILL)
            return real_publish(root, tmp, final, state, keep_last)

        checkpoint._publish = publish
    from opd_exp.__main__ import main as cli

    sys.argv = ["opd_exp", "train", *overrides]
    cli()


if __name__ == "__main__":
    main()
