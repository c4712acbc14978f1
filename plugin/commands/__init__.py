"""Sub-commands of ``mkv`` (one module each; registered in ``plugin.cli.COMMANDS``)."""
