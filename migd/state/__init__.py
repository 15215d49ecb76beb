"""What the daemon holds between commands: memory backends, passed fds (fdsets), the path
policy, partial-restore marks."""
