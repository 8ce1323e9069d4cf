"""Servers that run inside an ipybox container.

This package is copied into the image (not imported on the host). One process serves both ports:
the Jupyter Kernel Gateway on 8888 and the resource server on 8900, on one asyncio loop, which saves
an interpreter's start-up time and memory per sandbox.
"""
