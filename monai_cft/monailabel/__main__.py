"""``python -m monai_cft.monailabel serve``: start the monai-cft MONAI Label server, offline.

Runs ``monailabel start_server --app <workspace>/app --studies DIR --conf models DIR --conf workspace
DIR --conf zoo_source github -i HOST -p PORT`` (as ``python -m monailabel.main``, which is what the
``monailabel`` script runs, with this interpreter). The app folder is created in the workspace
(MONAI Label writes ``model/``, ``logs/``, ``lib/`` and ``bin/`` into it) and holds a ``main.py``
that imports :class:`monai_cft.monailabel.main.MONAICFTApp`. ``zoo_source`` is set to a value other
than the default download source, so nothing is fetched at start-up. The models are checked before
the server starts: a missing one is a one-line error naming the file and the command that makes it.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from monai_cft.monailabel.models import GUIDANCE_SEGMENTOR, MissingModelError, ModelStore, default_models_dir, dscm_file

APP_MAIN = (
    '"""MONAI Label app folder written by `python -m monai_cft.monailabel serve`."""\n'
    "from monai_cft.monailabel.main import MONAICFTApp  # noqa: F401\n"
)
INSTALL_HINT = ("MONAI Label is not installed; install the extra as docs/monailabel.md says: "
                "pip install -c requirements-monailabel.txt -e '.[monailabel]' && "
                "pip install -c requirements-monailabel.txt --no-deps monailabel==0.8.5 pydicom-seg==0.4.1")


def server_command(studies: Path, models: Path, workspace: Path, host: str, port: int, device: str,
                   extra: Sequence[str] = ()) -> list[str]:
    """The ``monailabel start_server`` command line (this Python, ``-m monailabel.main``)."""
    return [
        sys.executable, "-m", "monailabel.main", "start_server",
        "--app", str(workspace / "app"), "--studies", str(studies),
        "--conf", "models", str(models), "--conf", "workspace", str(workspace),
        "--conf", "device", device, "--conf", "zoo_source", "github",
        "-i", host, "-p", str(port), *extra,
    ]


def check_models(models: Path) -> list[str]:
    """The CFT modes available in ``models``; raises :class:`MissingModelError` if a required model is missing."""
    store = ModelStore(models)
    store.require([GUIDANCE_SEGMENTOR])
    modes = store.available_modes()
    if not modes:
        store.require([dscm_file("pos_seg")])
    return modes


def write_app(workspace: Path) -> Path:
    """Create ``<workspace>/app/main.py`` (atomically) and return the app folder."""
    from monai_cft.utils.io import atomic_path

    app = workspace / "app"
    main = app / "main.py"
    if not main.is_file() or main.read_text() != APP_MAIN:
        with atomic_path(main) as tmp:
            tmp.write_text(APP_MAIN)
    return app


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m monai_cft.monailabel", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="start the MONAI Label server (runs until stopped)")
    s.add_argument("--studies", required=True, help="datastore folder (images, labels); created if missing")
    s.add_argument("--models", default=None,
                   help="the main job's model folder (default: outputs/models of the checkout)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--workspace", default=None,
                   help="app folder and fine-tuned segmentor (default: <studies>/.monai_cft)")
    s.add_argument("--device", default="cpu", help="torch device of the networks (cpu, cuda)")
    s.add_argument("--auto-scoring", action="store_true",
                   help="let MONAI Label run the scoring method in the background at start-up and after each training "
                        "(off by default: while it runs, run_sync scoring calls are refused)")
    s.add_argument("--dry-run", action="store_true", help="check the models, print the command, do not start")
    s.add_argument("server_args", nargs="*", help="more monailabel start_server options, after --")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    studies = Path(args.studies).expanduser().resolve()
    models = Path(args.models).expanduser().resolve() if args.models else default_models_dir()
    workspace = Path(args.workspace).expanduser().resolve() if args.workspace else studies / ".monai_cft"
    if not 0 < args.port < 65536:
        print(f"error: --port {args.port} is not a TCP port (1-65535).", file=sys.stderr)
        return 2
    try:
        modes = check_models(models)
    except MissingModelError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if importlib.util.find_spec("monailabel") is None:
        print(f"error: {INSTALL_HINT}", file=sys.stderr)
        return 2
    cmd = server_command(studies, models, workspace, args.host, args.port, args.device, args.server_args)
    print(f"monai-cft MONAI Label server: models {models} (CFT modes {modes}), studies {studies}, "
          f"http://{args.host}:{args.port}/", flush=True)
    print(" ".join(cmd), flush=True)
    if args.dry_run:
        return 0
    studies.mkdir(parents=True, exist_ok=True)
    write_app(workspace)
    env = dict(os.environ)
    env.setdefault("MONAI_ZOO_SOURCE", "github")
    if args.auto_scoring:
        env["MONAI_LABEL_AUTO_UPDATE_SCORING"] = "true"
    else:
        env.setdefault("MONAI_LABEL_AUTO_UPDATE_SCORING", "false")
    sys.stdout.flush()
    os.execve(sys.executable, cmd, env)  # the server keeps this process id: stopping it stops the server
    return 0


if __name__ == "__main__":
    sys.exit(main())
