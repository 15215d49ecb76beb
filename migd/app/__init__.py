"""The application: command line, daemon wiring (signals, shutdown order), configuration."""
