"""Client-side tools: the CLI client subcommands (client) and the file inspector (inspect)."""
