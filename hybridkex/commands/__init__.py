"""One module per ``hybridkex`` subcommand: ``HELP``, ``configure(parser)``, ``run(args) -> int``."""
