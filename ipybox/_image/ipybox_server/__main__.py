# Order matters: the process turns non-dumpable before it reads the secret, so that kernels (same
# user, started later) can neither ptrace it nor read its memory through /proc; then the secret is
# taken (so no child can inherit it) and the spare kernel is spawned, and only then are the slow
# imports of the servers paid, in parallel with it.
from ipybox_server import prewarm
from ipybox_server.token import protect_process, take_token

protect_process()
token = take_token()
prewarm.start_spare(cwd="/app")

from ipybox_server.launcher import main  # noqa: E402

main(token)
