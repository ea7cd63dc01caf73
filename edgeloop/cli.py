"""Root of the ``edgeloop`` console script.

Each package contributes a Typer sub-app from its own ``cli.py``. Those modules import
only light dependencies at module level, so an edge install (no fastapi, no torch) can
still run ``edgeloop agent`` and ``edgeloop bundle``; a command whose extra is missing
says which one to install.
"""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    name="edgeloop",
    help="Continuous delivery loop for object detectors on factory edge devices.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)

# (module, attribute, name on the command line or None to merge its commands at the top)
_SUBAPPS: list[tuple[str, str, str | None]] = [
    ("firmware_bundles.cli", "keys_app", "keys"),
    ("firmware_bundles.cli", "bundle_app", "bundle"),
    ("server.stack.cli", "app", "stack"),
    ("training.cli", "data_app", "data"),
    ("server.cli", "app", None),
    ("edge_agent.cli", "app", None),
    ("edgeloop.demo_cli", "app", None),
    ("edgeloop.simulator.cli", "app", None),
]


def _mount() -> None:
    for module_name, attr, name in _SUBAPPS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            # A package missing from this install (e.g. the server on an edge device).
            if exc.name and exc.name.split(".")[0] in {"server", "training", "edge_agent", "edgeloop"}:
                continue
            raise
        sub = getattr(module, attr)
        if name is None:
            for command in sub.registered_commands:
                app.registered_commands.append(command)
            for group in sub.registered_groups:
                app.registered_groups.append(group)
        else:
            app.add_typer(sub, name=name)


_mount()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
