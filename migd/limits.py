"""QEMU's range for multifd-channels, which the command line checks as the daemon does:
here, below every layer (as pages.py), so that a client command checks --channels without
loading the daemon's settings and their pydantic models (migd/app/cli.py: a client's
start-up counts in a `migd vm restore`'s downtime)."""

CHANNELS_MIN = 1
CHANNELS_MAX = 255  # QEMU's range for multifd-channels


def channels_in_range(value: int) -> bool:
    return CHANNELS_MIN <= value <= CHANNELS_MAX
