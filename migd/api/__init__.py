"""The commands: pydantic argument models and thin handlers; the only home of QEMU wording.

`migd.api.commands` imports every command module, which fills the table in migd.qmp.dispatch."""
