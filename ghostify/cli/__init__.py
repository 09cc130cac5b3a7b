"""The ``ghostify`` command line: the group, error handling and the commands of each group.

Tables and JSON go to stdout, progress and notes to stderr. User errors print one line,
``Error: ...``, and exit non-zero; ``-v`` shows the traceback of unexpected errors. Each command
module (``convert``, ``tradeoffs``, ``deploy``, ``finetune``, ``distill``) imports torch only inside its commands, so
``ghostify --help`` is instant; shared options live in :mod:`ghostify.cli.options`.
"""
from __future__ import annotations

import sys

import click

from . import convert, deploy, distill, finetune, tradeoffs

__all__ = ["cli", "main"]


class _Group(click.Group):
    """A click group whose usage errors print one line instead of the usage block."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            if not standalone_mode:
                raise
            click.echo(f"Error: {exc.format_message()}", err=True)
            sys.exit(exc.exit_code)
        except click.exceptions.Abort:
            click.echo("Aborted.", err=True)
            sys.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ghostify")
def cli():
    """ghostify: Conv -> Ghost surgery on trained CNNs."""


for command in (*convert.COMMANDS, *tradeoffs.COMMANDS, *deploy.COMMANDS, finetune.finetune, distill.distill):
    cli.add_command(command)


def main(argv=None):
    """Console-script entry point."""
    cli.main(args=argv, prog_name="ghostify")


if __name__ == "__main__":
    main()
