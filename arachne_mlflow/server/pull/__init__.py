"""Pull mode (`serve --follow`): the device keeps a served model at the version a registry alias names."""
