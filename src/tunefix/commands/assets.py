"""``tunefix assets fetch`` and ``tunefix assets path``: the cache of real test and demo assets."""

from __future__ import annotations

from tunefix.commands.build import NoOptions


def run_assets_fetch(opts: NoOptions) -> int:
    from rich.console import Console

    from tunefix import assets, tiny
    from tunefix.console import RichReporter

    console = Console(stderr=True)
    console.print(f"cache: {assets.cache_root()}")
    say = RichReporter(console)
    paths = {**assets.fetch_all(progress=say), **tiny.fetch_tiny(progress=say)}
    for label, path in paths.items():
        print(f"{label}: {path}")
    return 0


def run_assets_path(opts: NoOptions) -> int:
    from tunefix import assets

    print(assets.cache_root())
    return 0
