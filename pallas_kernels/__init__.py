"""Pallas kernels, each beside a pure-JAX reference that tests compare it with.

Kernels run in interpret mode on CPU (tests only); the library dispatches to
a kernel on the backend it was written for and to the reference elsewhere.
Nothing here imports GPU-only packages at import time.
"""
