"""Moving pages between memory and files: migration addresses and targets (target), the
channel threads and the populator, the zero scan, the bandwidth throttle (threads)."""
