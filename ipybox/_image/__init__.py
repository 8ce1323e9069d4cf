"""What goes into the sandbox image: the Dockerfile, core requirements and the server package.

`ipybox_server` runs inside the container. The host imports one module of it, `archive`, so that both
ends of a directory transfer apply the same tar rules from one source (it uses only the standard
library). The host runs its own installed copy; it never runs code the sandbox sends.
"""
