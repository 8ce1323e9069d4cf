"""The ipybox exception tree.

    IpyboxError                      message, plus keyword-only context: container_id, kernel_id,
    │                                status (HTTP), option (the setting or call that changes the outcome)
    ├── DockerUnavailableError      no Docker engine answers
    ├── ImageError
    │   ├── ImageNotFoundError       image missing and not pullable (names `ipybox build -t TAG`)
    │   └── BuildError
    │       └── DependencyFileError  a malformed line in a dependencies file (names the line)
    ├── ContainerError               container could not be created, started or inspected
    │   ├── ContainerStartError      the servers in the container did not come up
    │   └── FirewallError            firewall rules could not be applied (also a RuntimeError)
    ├── ServerConnectionError        a port of the container cannot be reached, or the connection was
    │   │                            lost: nothing was sent, or what was sent had no outcome yet
    │   └── TransferStalledError     a resource transfer moved no data for inactivity_timeout seconds
    │                                (also a TimeoutError)
    ├── RequestRefusedError          the server answered and refused; retrying the same request fails again
    │   ├── AuthenticationError      the server refused the secret (401/403)
    │   └── KernelLimitError         the container runs its maximum number of kernels (max_kernels)
    ├── ExecutionOutcomeUnknownError the connection broke mid-execution and its end was not recovered:
    │                                the code may or may not have run; never re-executed, do not
    │                                blindly retry (deliberately not a ServerConnectionError)
    ├── KernelError                  the kernel misbehaved or refused an execution
    │   ├── ExecutionError           the code raised; `.message` and `.trace`
    │   ├── ExecutionAbortedError    the kernel skipped the code: an earlier execution failed
    │   └── KernelDiedError          the kernel process died while executing
    ├── ExecutionTimeoutError        an execution ran past its timeout (also the builtin TimeoutError)
    ├── InvalidServerParamsError     MCP server parameters that cannot work (a URL that is no URL, no
    │                                command): refused before anything is sent (also a ValueError)
    ├── ToolHostError                a ToolHost could not start a host-side MCP server, or the sandbox
    │                                refused its offer
    ├── SnapshotError                a snapshot could not be taken, or is missing, truncated, tampered
    │                                with, made with another key or image, or failed to load in the kernel
    └── ResourceError                the resource server refused a request
        ├── RemoteFileNotFoundError  a sandbox file or directory is missing (also a FileNotFoundError)
        ├── RemotePathError          a path the server refused (traversal, absolute, NUL, symlink escape)
        └── ArchiveError             a directory archive from the sandbox was rejected (hostile or too big)

`ExecutionTimeoutError` is both an `IpyboxError` and the builtin `TimeoutError`, so
`except TimeoutError` works as documented. Using an object in the wrong state (a property before
`run()`, `execute` before `connect()`) raises `InvalidStateError`, a `RuntimeError` as the seed API
documents, kept outside the tree on purpose: it is a programming mistake, not an environment failure.
"""

from __future__ import annotations

from typing import Any


class IpyboxError(Exception):
    """Root of all errors raised by ipybox.

    Every ipybox error is built the same way: a message, then keyword-only context (two build their
    message from fields instead: `ImageNotFoundError(tag, reason)` and `DependencyFileError(path,
    line_number, line, reason)`; `ExecutionError` carries its `trace` after the message).

    Attributes:
        container_id: The container concerned, when known.
        kernel_id: The kernel concerned, when known.
        status: The HTTP status a server answered, when one did.
        option: The setting or call that changes the outcome (e.g. `"ExecutionClient(token=...)"`).
    """

    def __init__(
        self,
        message: str,
        *,
        container_id: str | None = None,
        kernel_id: str | None = None,
        status: int | None = None,
        option: str | None = None,
    ) -> None:
        super().__init__(message)
        self.container_id = container_id
        self.kernel_id = kernel_id
        self.status = status
        self.option = option


class InvalidStateError(RuntimeError):
    """An object was used in a state that does not allow the call (e.g. not started yet)."""


class DockerUnavailableError(IpyboxError):
    """No Docker engine answers on this machine."""


class ImageError(IpyboxError):
    """Problems with an ipybox image."""


class ImageNotFoundError(ImageError):
    """The image is neither local nor pullable."""

    def __init__(self, tag: str, reason: str = "", *, message: str | None = None, option: str | None = None) -> None:
        """`message`/`option` replace the local engine's advice (build it here) where that cannot help,
        e.g. a swarm whose nodes pull from a registry."""
        self.tag = tag
        detail = f" ({reason})" if reason else ""
        super().__init__(
            message
            or f"Image {tag!r} is not available locally and could not be pulled{detail}. "
            f"Build it with: ipybox build -t {tag}",
            option=option or f"ipybox build -t {tag}",
        )


class BuildError(ImageError):
    """Building an image failed."""


class DependencyFileError(BuildError):
    """A dependencies file has a line that is not a valid requirement."""

    def __init__(self, path: str, line_number: int, line: str, reason: str) -> None:
        self.path = path
        self.line_number = line_number
        self.line = line
        super().__init__(f"{path}, line {line_number}: {line.strip()!r} is not a valid requirement: {reason}")


class ContainerError(IpyboxError):
    """A container could not be created, started or inspected."""

    def __init__(self, message: str, *, container_id: str | None = None, **context: Any) -> None:
        prefix = f"container {container_id[:12]}: " if container_id else ""
        super().__init__(prefix + message, container_id=container_id, **context)


class ContainerStartError(ContainerError):
    """The container started but its servers did not become ready."""


class ServerConnectionError(IpyboxError):
    """A server in the container could not be reached."""


class TransferStalledError(ServerConnectionError, TimeoutError):
    """A resource transfer moved no data for `ResourceClient(inactivity_timeout=...)` seconds.

    Also a `TimeoutError`, as stalled transfers were before. The message names the operation, the
    route and the option.
    """


class RequestRefusedError(IpyboxError):
    """The server answered and refused the request; sending it again is refused again."""


class AuthenticationError(RequestRefusedError):
    """The server rejected the request's secret (HTTP 401/403)."""


class KernelLimitError(RequestRefusedError):
    """The container runs its maximum number of kernels (`ExecutionContainer(max_kernels=...)`)."""


class ExecutionOutcomeUnknownError(IpyboxError):
    """The websocket broke while an execution was pending and its outcome could not be recovered.

    The client re-opens the websocket with the same session, and the gateway replays what the
    kernel sent meanwhile. This error means that did not work out: reconnecting failed, the kernel
    was restarted meanwhile, or messages of the execution were lost in the cut. The code may or may
    not have run (fully or in part); the client never sends it again. Not a `ServerConnectionError`
    on purpose: code that retries on a lost connection must not blindly run this code a second time.

    Attributes:
        kernel_id: The kernel the execution was sent to.
    """


class KernelError(IpyboxError):
    """The kernel misbehaved or refused an execution."""


class ExecutionError(KernelError):
    """Code executed in the kernel raised an exception.

    Attributes:
        message: `"<ExceptionType>: <value>"`, e.g. `"ZeroDivisionError: division by zero"`.
        trace: the traceback as plain text (no ANSI escape codes).
    """

    def __init__(self, message: str, trace: str | None = None, **context: Any) -> None:
        super().__init__(message, **context)
        self.message = message
        self.trace = trace


class ExecutionAbortedError(KernelError):
    """The kernel skipped the execution without running it: an earlier execution failed.

    The kernel answers requests queued behind a failed one with `aborted` (Jupyter's
    `stop_on_error`). Nothing of the code ran; submitting it again is safe.
    """


class KernelDiedError(KernelError):
    """The kernel process died while an execution was pending; its state is lost."""


class ResourceError(IpyboxError):
    """The resource server rejected a request."""


class ExecutionTimeoutError(IpyboxError, TimeoutError):
    """An execution did not finish within its timeout.

    The kernel was interrupted and keeps its state, or, when the code ignored the interrupt, restarted
    and its state lost; the message and `restarted` say which.

    Attributes:
        restarted: True when the kernel was restarted (or a restart was attempted and failed): its
            state (variables, imports) is lost. False when it was only interrupted and keeps its state.
    """

    def __init__(self, message: str, *, restarted: bool = False, **context: Any) -> None:
        super().__init__(message, **context)
        self.restarted = restarted


class RemoteFileNotFoundError(ResourceError, FileNotFoundError):
    """A file or directory in the sandbox does not exist."""

    def __init__(self, message: str, *, status: int | None = 404, **context: Any) -> None:
        ResourceError.__init__(self, message, status=status, **context)


class RemotePathError(ResourceError, ValueError):
    """The server refused a path: absolute, `..`, encoded traversal, NUL, or a symlink out of /app."""


class ArchiveError(ResourceError):
    """A directory archive was rejected: links, unsafe names, or caps on members or size exceeded."""


class FirewallError(ContainerError, RuntimeError):
    """The firewall rules could not be applied; the sandbox was left blocked, never open.

    A `RuntimeError` too, as the seed API documents for `init_firewall` failures.
    """


class InvalidServerParamsError(IpyboxError, ValueError):
    """MCP server parameters that cannot work, refused before anything is sent: the message names the
    parameter (e.g. the URL) and the fix. Also a `ValueError`."""


class ToolHostError(IpyboxError):
    """A `ToolHost` could not start one of its host-side MCP servers, or the sandbox refused its offer."""


class SnapshotError(IpyboxError):
    """A snapshot could not be taken or restored.

    Raised for a snapshot that is missing, incomplete (truncated, a file gone), tampered with (the
    manifest or a file changed), made with another user's key or for another image, and for a namespace
    that failed to capture or to load in the kernel (the message names the exception, e.g. a module the
    new sandbox does not have). A restore that raises it removes the sandbox it started; an integrity
    failure is found before anything of the snapshot reaches a sandbox.
    """
