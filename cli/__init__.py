"""`pqmesh` command-line dispatch: the application layer's entry point (`cli.main:main`)."""
