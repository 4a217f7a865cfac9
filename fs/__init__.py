"""The FUSE frontend: POSIX calls in, operations out, reads served from the store."""
