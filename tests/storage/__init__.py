"""The storage pipeline (storage/): the drain into FerretDB, its faults and dead letters."""
