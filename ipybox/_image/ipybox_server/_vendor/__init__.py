"""Third-party code shipped with the image, importable by the kernel whatever the user installs.

cloudpickle 3.1.2 (BSD-3-Clause, LICENSE beside it), unchanged: the reconstructors its pickles name must be
the same code in the sandbox that captures and the one that restores, so it is not taken from the user venv.
"""
