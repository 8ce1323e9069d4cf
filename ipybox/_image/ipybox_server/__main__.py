# Order matters for start-up time: the secret is taken (so no child can inherit it), then the spare
# kernel is spawned, and only then are the slow imports of the servers paid, in parallel with it.
from ipybox_server import prewarm
from ipybox_server.token import take_token

token = take_token()
prewarm.start_spare(cwd="/app")

from ipybox_server.launcher import main  # noqa: E402

main(token)
