"""`scenestream`: the command line. Each command is a thin shell over the functions it names, in a module of its
own group; importing them loads click and nothing heavy (torch, faiss, faust and aiokafka load when a command runs).

Every option can also be set by an environment variable (docs/configuration.md lists each one): by default
SCENESTREAM_<COMMAND>_<OPTION> (for example SCENESTREAM_TRAIN_EPOCHS=4); a few shared settings have a short name
(SCENESTREAM_BROKER, SCENESTREAM_CHECKPOINT, SCENESTREAM_WINDOW). A flag on the command line wins over the variable,
which wins over the default shown in --help.
"""
from __future__ import annotations

import logging
import sys

import click

from . import index, offline, serve, topics


@click.group(context_settings={"help_option_names": ["-h", "--help"], "auto_envvar_prefix": "SCENESTREAM",
                               "show_default": True})
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def main(verbose: bool) -> None:
    """SceneStream: streaming real-time multi-scene interest updates for recommenders.

    \b
    Typical offline loop:
      scenestream generate --out events.jsonl
      scenestream train --input events.jsonl --cutoff 0.8 --out ckpt
      scenestream replay --input events.jsonl --checkpoint ckpt --eval-cutoff 0.8 --json
    """
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


for module in (offline, topics, serve, index):
    for command in module.COMMANDS:
        main.add_command(command)
