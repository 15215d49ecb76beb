"""QMP: framing and envelopes (wire), sessions and SCM_RIGHTS (server), the command table and
its validation into QEMU error texts (dispatch, validation). Knows nothing of migration."""
