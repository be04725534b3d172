"""Command line: `python -m opd_exp {train,eval,serve,probe,plan,diagnose,tables,toy} …`.

    python -m opd_exp train [+experiment=NAME] [group=option] [key=value …] [--multirun] [--cfg job]
    python -m opd_exp train learner=deepspeed launcher.nproc_per_node=2   # 2 ranks under torchrun
    python -m opd_exp eval  [same overrides]          # Avg@k / Pass@k of pair.student (and teacher)
    python -m opd_exp serve [same overrides]         # a vLLM server for rollout=vllm_server
    python -m opd_exp probe [same overrides]         # will this pair distil? checks + verdict
    python -m opd_exp plan  [same overrides]         # per-GPU memory plan; exit 1 if it does not fit
    python -m opd_exp diagnose RUN_DIR               # parameter geometry over a run's checkpoints
    python -m opd_exp tables SWEEP_DIR --table NAME  # a paper-shaped table (markdown, CSV, PNGs)
    python -m opd_exp toy build [--out DIR] [--seed N] # rebuild the toy world from a seed
    python -m opd_exp toy build --only NAME[,NAME]     # add condition models to an existing world
"""

from __future__ import annotations

import sys
from pathlib import Path

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
USAGE = __doc__


def hydra_options(group: str) -> list[str]:
    """Options Hydra and its installed plugins register for one of its own groups (hydra/launcher:
    basic, submitit_slurm, …); none for opd_exp's groups."""
    if not group.startswith("hydra/"):
        return []
    from hydra.core.config_store import ConfigStore
    from hydra.core.plugins import Plugins

    Plugins.instance()  # plugins register their configs when discovered
    try:
        return [name.removesuffix(".yaml") for name in ConfigStore.instance().list(group)]
    except OSError:  # a group no plugin provides
        return []


def unknown_option(args: list[str]) -> str | None:
    """One line for a `group=option` override naming no file of conf/<group>/ (Hydra's own error
    is a page long), or None. Sweeps (a,b / choice(a,b)) are checked option by option; glob()
    sweeps and unreadable overrides are left to Hydra."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ValueType
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    for arg in args:
        if arg.startswith("-") or "=" not in arg:
            continue
        try:
            (o,) = parser.parse_overrides([arg])
        except HydraException:
            continue
        folder = Path(CONF_DIR) / o.key_or_group
        if not folder.is_dir() or o.value_type == ValueType.GLOB_CHOICE_SWEEP:
            continue
        options = sorted({p.stem for p in folder.glob("*.yaml")} | set(hydra_options(o.key_or_group)))
        values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.value()]
        for option in values:
            if option not in options:
                return f"{o.key_or_group}={option} is not allowed: one of {', '.join(options)}"
    return None


def composition_error(args: list[str]) -> str | None:
    """One line for overrides Hydra cannot compose — a wrong type (`reward.alpha=abc`), an
    unknown key (`trainer.stepz=3`), bad syntax — or None. Hydra's own report is a page; sweep
    values (--multirun) are tried one by one."""
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    def first_line(e: BaseException) -> str:
        return (str(e).strip().splitlines() or [type(e).__name__])[0].rstrip(".")

    mine = [a for a in args if not a.startswith("-") and "=" in a
            and not a.lstrip("+~").startswith("hydra")]
    parser = OverridesParser.create()
    for arg in mine:
        try:
            parser.parse_overrides([arg])
        except HydraException as e:
            return f"{arg} is not an override Hydra can read ({first_line(e)})"
    parsed = parser.parse_overrides(mine)
    choices = [[o.input_line] if not o.is_sweep_override() else
               [o.input_line.split("=", 1)[0] + "=" + v for v in o.sweep_string_iterator()]
               for o in parsed]
    base = [c[0] for c in choices]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        for i, options in enumerate(choices):
            for option in options if len(options) > 1 or i == 0 else []:
                tried = base[:i] + [option] + base[i + 1:]
                try:
                    compose(config_name="config", overrides=tried)
                except (HydraException, OmegaConfBaseException) as e:
                    cause = e.__cause__ or e
                    said = first_line(e)
                    return said if cause is e else f"{said}: {first_line(cause)}"
    return None


def _hydra_command(fn) -> None:
    import hydra
    from hydra.core.hydra_config import HydraConfig

    from opd_exp.config import ConfigError, RunStopped, register_configs

    from opd_exp.runtime.console import quiet_libraries

    bad = unknown_option(sys.argv[1:])
    if bad:
        print(f"error: {bad}", file=sys.stderr)
        sys.exit(2)
    register_configs()
    bad = composition_error(sys.argv[1:])
    if bad:
        print(f"error: {bad}", file=sys.stderr)
        sys.exit(2)
    quiet_libraries()

    @hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
    def main(cfg) -> None:
        try:
            fn(cfg, Path(HydraConfig.get().runtime.output_dir))
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except RunStopped as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(1)

    main()


def _eval(cfg, run_dir: Path) -> None:
    from opd_exp.commands import run_eval

    run_eval(cfg, run_dir)


def _train(cfg, run_dir: Path) -> None:
    from opd_exp.config import validate, validate_training
    from opd_exp.runtime.launcher import launch, wants_launch
    from opd_exp.runtime.memory_plan import CHECKED, check_fits

    if wants_launch(cfg.launcher):  # re-run this command under torchrun, on this node's ranks
        from hydra.core.hydra_config import HydraConfig

        validate(cfg)
        validate_training(cfg)
        check_fits(cfg)  # refused here, before any rank starts or loads a weight
        from opd_exp.engines.rollout_vllm_server import check_access

        check_access(cfg)  # a server that refuses the run's secret, likewise
        code = launch(cfg.launcher, "train", list(HydraConfig.get().overrides.task), run_dir,
                      extra_env={CHECKED: "1"})
        if code:
            print(f"error: the launched ranks failed (exit code {code})", file=sys.stderr)
            sys.exit(code)
        return
    from opd_exp.runtime.distributed import restore_env
    from opd_exp.train import train

    try:
        train(cfg, run_dir)
    finally:
        restore_env()  # a sweep's next job in this process starts clean


def _serve(cfg, run_dir: Path) -> None:
    from opd_exp.commands import run_serve

    sys.exit(run_serve(cfg, run_dir))


def _plan(cfg, run_dir: Path) -> None:
    from opd_exp.commands.plan import run_plan

    sys.exit(run_plan(cfg, run_dir))


def _probe(cfg, run_dir: Path) -> None:
    from opd_exp.commands.probe import run_probe

    run_probe(cfg, run_dir)


def _diagnose(argv: list[str]) -> None:
    import argparse

    from opd_exp.commands.diagnose import run_diagnose

    ap = argparse.ArgumentParser(prog="python -m opd_exp diagnose")
    ap.add_argument("run_dir", type=Path)
    run_diagnose(ap.parse_args(argv).run_dir)


def _tables(argv: list[str]) -> None:
    import argparse

    from opd_exp.analysis.tables import TABLES, run_tables

    ap = argparse.ArgumentParser(prog="python -m opd_exp tables")
    ap.add_argument("sweep_dir", type=Path)
    ap.add_argument("--table", required=True, help="one of " + ", ".join(TABLES))
    ap.add_argument("--out", type=Path, default=None, help="default: SWEEP_DIR/tables/NAME")
    ap.add_argument("--brief", action="store_true", help="the mean over benchmarks only")
    a = ap.parse_args(argv)
    print(run_tables(a.sweep_dir, a.table, a.out, a.brief))


def _toy(argv: list[str]) -> None:
    import argparse

    from opd_exp.toyworld import SHIPPED_DIR
    from opd_exp.toyworld.build import VARIANTS, add_variants, build_world
    from opd_exp.toyworld.qwen_models import FAMILIES, add_families

    ap = argparse.ArgumentParser(prog="python -m opd_exp toy")
    ap.add_argument("action", choices=["build"])
    ap.add_argument("--out", type=Path, default=SHIPPED_DIR,
                    help="folder to build into (default: the package's shipped copy)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", default="",
                    help="comma-separated condition models (or real-vocabulary families: qwen3, "
                         "qwen25, qwen36) to train into the existing world at --out")
    args = ap.parse_args(argv)
    names = [n for n in args.only.split(",") if n]
    known = [v.name for v in VARIANTS] + list(FAMILIES)
    if unknown := [n for n in names if n not in known]:
        ap.error(f"--only: {unknown} not a condition model or family; one of {known}")
    if not names:  # the whole world: the pair, the condition models, then the families
        build_world(args.out, seed=args.seed)
        names = list(FAMILIES)
    variants = [n for n in names if n not in FAMILIES]
    if variants:
        add_variants(args.out, variants)
    add_families(args.out, [n for n in names if n in FAMILIES])


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in ("train", "eval", "serve", "probe", "plan", "diagnose",
                                                       "tables", "toy"):
        print(USAGE, file=sys.stderr)
        sys.exit(2)
    command = sys.argv.pop(1)
    if command in ("toy", "diagnose", "tables"):
        {"toy": _toy, "diagnose": _diagnose, "tables": _tables}[command](sys.argv[1:])
    else:
        _hydra_command({"train": _train, "eval": _eval, "serve": _serve, "probe": _probe,
                        "plan": _plan}[command])


if __name__ == "__main__":
    main()
    import gc

    gc.collect()  # engines holding process groups go before interpreter exit (core/ranks.py close)
