"""The local cluster as `make run` starts it, its configuration, bootstrap and discovery."""
