"""The ``popgrad`` command: ``train`` hands its arguments to Hydra, the rest use argparse."""

from __future__ import annotations

import argparse
import hashlib
import logging
import sys
import warnings
from pathlib import Path
from typing import List, Optional

from popgrad_cli import __version__
from popgrad_cli.errors import EXIT_DATA_ERROR, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_INVALID_CONFIG

log = logging.getLogger("popgrad_cli")

# Maximum length of the override string kept verbatim in a run folder's name.
# Longer ones are cut and given a hash, so two different sweeps never share a folder name.
MAX_FOLDER_OVERRIDES = 80

USAGE = """popgrad <command> [arguments]

commands:
  train [overrides]       train one model; -m sweeps, --help lists Hydra's options
  data list               show each data set and whether its files and cache are present
  data prepare NAME...    download and cache data sets before training
  collect PATH...         write result tables and plots for the runs below PATH
  reproduce [options]     run the sweeps of Sakai et al. and write a report; --dry-run lists them

Examples:
  popgrad train
  popgrad train method=pg dataset=fashion_mnist model=cnn
  popgrad train -m method=baseline,pg seed=0,1,2
"""


def conf_dir() -> Path:
    """Return the folder of the Hydra configs, in a source checkout or an installed wheel."""
    packaged = Path(__file__).resolve().parent / "conf"
    if (packaged / "config.yaml").is_file():
        return packaged
    return Path(__file__).resolve().parent.parent / "conf"


def short_overrides(override_dirname: str) -> str:
    """Return a folder-name-safe form of Hydra's override string, at most about 90 characters."""
    name = override_dirname.replace("/", "_").replace(" ", "") or "defaults"
    if len(name) <= MAX_FOLDER_OVERRIDES:
        return name
    digest = hashlib.sha1(name.encode()).hexdigest()[:8]
    return f"{name[:MAX_FOLDER_OVERRIDES]}-{digest}"


def silence_launcher_schema_warning() -> None:
    """Hide Hydra's warning that conf/hydra/launcher/*.yaml share names with the plugins' schemas.

    Sharing the name makes Hydra validate each preset against its plugin's schema,
    which is what the presets want. Hydra 1.3 still does this but warns each run.
    """
    # NOTE: Hydra's upgrade notes say a later release drops this automatic schema
    # matching; pyproject.toml pins hydra-core below 1.4 for that reason.
    warnings.filterwarnings("ignore", message=r"\s*'hydra/launcher/\w+' is validated against ConfigStore schema")


def register_resolvers() -> None:
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("popgrad_short"):
        OmegaConf.register_new_resolver("popgrad_short", short_overrides)


def train(arguments: List[str]) -> int:
    """Run ``popgrad train``: one Hydra job, or a sweep with ``-m``."""
    import hydra

    from popgrad_cli.config import register_configs
    from popgrad_cli.run import run_job

    from popgrad_cli import sweeps
    from popgrad_cli.preflight import check_command

    register_configs()
    register_resolvers()
    silence_launcher_schema_warning()
    problem = check_command(conf_dir(), arguments)
    if problem is not None:
        print(f"popgrad train: {problem}", file=sys.stderr)
        return EXIT_INVALID_CONFIG
    arguments = _continue_previous_sweep(arguments)
    exit_codes: List[int] = []
    sweeps.last_sweep_summary = None

    @hydra.main(config_path=str(conf_dir()), config_name="config", version_base="1.3")
    def task(cfg) -> int:
        exit_codes.append(run_job(cfg))
        return exit_codes[-1]

    saved_argv = sys.argv
    sys.argv = ["popgrad-train", *arguments]
    try:
        task()
    finally:
        sys.argv = saved_argv
    if sweeps.last_sweep_summary is not None:
        # Jobs may have run in other processes; their end states are on disk.
        return EXIT_FAILED if sweeps.sweep_failed(sweeps.last_sweep_summary) else 0
    return max(exit_codes, default=0)


def _is_multirun(arguments: List[str]) -> bool:
    return "-m" in arguments or "--multirun" in arguments


def _continue_previous_sweep(arguments: List[str]) -> List[str]:
    """With ``-m ... resume=true``, point Hydra at the earlier sweep made by the same command."""
    from popgrad_cli.sweeps import find_previous_sweep

    wants_resume = any(argument.lower() in ("resume=true", "resume=1") for argument in arguments)
    if not (_is_multirun(arguments) and wants_resume):
        return arguments
    if any(argument.startswith("hydra.sweep.dir=") for argument in arguments):
        return arguments
    previous = find_previous_sweep(arguments)
    if previous is None:
        print("resume=true: no earlier sweep with these overrides under outputs/sweeps; starting a new one", file=sys.stderr)
        return arguments
    print(f"resume=true: continuing the sweep in {previous}", file=sys.stderr)
    return [*arguments, f"hydra.sweep.dir={previous}"]


def data_command(arguments: List[str]) -> int:
    from popgrad_cli import data

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--root", help="data folder (default: $POPGRAD_DATA, else ~/.cache/popgrad)")
    parser = argparse.ArgumentParser(prog="popgrad data", description="Show and prepare local data sets.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", parents=[common], help="show each data set and whether its files and cache are present")
    prepare = commands.add_parser("prepare", parents=[common], help="download (if needed) and cache data sets")
    prepare.add_argument("names", nargs="+", metavar="NAME", help="data set names, e.g. mnist cifar10")
    prepare.add_argument("--no-download", action="store_true", help="only cache files that are already present")
    prepare.add_argument("--raw-dir", help="folder with the four MNIST-format IDX .gz files (mnist, fashion_mnist)")
    args = parser.parse_args(arguments)
    root = Path(args.root) if args.root else data.default_root()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    if args.command == "list":
        rows = data.list_datasets(root)
        print(f"data root: {root}")
        print(f"{'name':<15} {'files':<8} {'cache':<8} folder")
        for row in rows:
            files = "present" if row["files_present"] else "missing"
            cache = "present" if row["cache_present"] else "missing"
            print(f"{row['name']:<15} {files:<8} {cache:<8} {row['folder']}")
        return 0

    try:
        data.prepare_datasets(args.names, root, download=not args.no_download, raw_dir=args.raw_dir)
    except data.DataError as error:
        print(f"popgrad data prepare: {error}", file=sys.stderr)
        return EXIT_DATA_ERROR
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if not arguments or arguments[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if arguments[0] in ("-V", "--version"):
        print(f"popgrad {__version__}")
        return 0

    command, rest = arguments[0], arguments[1:]
    if command == "train":
        try:
            return train(rest)
        except KeyboardInterrupt:
            # Ctrl-C during start-up, before the run installed its own handler.
            print("popgrad train: interrupted before training started; nothing was saved", file=sys.stderr)
            return EXIT_INTERRUPTED
    if command == "data":
        return data_command(rest)
    if command == "collect":
        from popgrad_cli.collect import main as collect_main

        return collect_main(rest)
    if command == "reproduce":
        from popgrad_cli.reproduce import main as reproduce_main

        return reproduce_main(rest)
    print(f"popgrad: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
