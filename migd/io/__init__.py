"""Moving pages between memory and files: targets and their fds (target), the I/O engine
seam and its table (engine), the default engine's channel threads and populator (threads),
the zero scan (zero_scan), the bandwidth throttle (throttle)."""
