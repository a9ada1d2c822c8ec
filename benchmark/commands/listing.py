"""``defbench list``: what is registered (attacks, defenses, datasets, detectors, measurements, reports),
the built-in profiles and every setting key."""
from __future__ import annotations

import click

from ...attacks import ATTACKS
from ...defenses import DEFENSES, DETECTORS, MEASUREMENTS, needs_pretrain_data
from ..analysis.studies import STUDIES
from ..datasets import DATASETS
from ..pipeline.settings import builtin_profiles, load_profile, valid_keys

WHAT = ["attacks", "defenses", "datasets", "detectors", "measurements", "reports", "profiles", "settings"]


@click.command(name="list")
@click.argument("what", type=click.Choice(WHAT), default="defenses")
def list_(what):
    """List the registered attacks, defenses, datasets, detectors, measurements, reports, profiles or settings."""
    if what == "attacks":
        for comp in ATTACKS.items():
            click.echo(f"{comp.name:<20} {comp.summary}")
    elif what == "defenses":
        click.echo(f"{'defense':<20} {'data it uses':<17} summary")
        for comp in DEFENSES.items():
            data = "clean + pretrain" if needs_pretrain_data(comp) else "clean"
            click.echo(f"{comp.name:<20} {data:<17} {comp.summary}")
        click.echo("(clean: the defender's clean set only; clean + pretrain: also the suspect's unlabelled "
                   "pre-training set, poisoned when a data-poisoning attack made the suspect)")
    elif what == "datasets":
        for spec in DATASETS.items():
            shown = f"{spec.name}:PATH" if spec.name in ("npz", "folder") else spec.name
            click.echo(f"{shown:<16} {spec.description}")
    elif what in ("detectors", "measurements"):
        for item in (DETECTORS if what == "detectors" else MEASUREMENTS).items():
            click.echo(f"{item.name:<12} {item.summary} (settings of defense {item.defense!r})")
    elif what == "reports":
        for study in STUDIES.items():
            click.echo(f"{study.name:<16} {study.title} ({study.paper})")
    elif what == "profiles":
        for name in builtin_profiles():
            click.echo(f"{name:<8} {load_profile(name).description}")
    else:
        for key in valid_keys():
            click.echo(key)
