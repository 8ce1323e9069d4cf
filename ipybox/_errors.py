"""The ipybox exception tree.

    IpyboxError
    ├── DockerUnavailableError      no Docker engine answers
    ├── ImageError
    │   ├── ImageNotFoundError       image missing and not pullable (names `ipybox build -t TAG`)
    │   └── BuildError
    │       └── DependencyFileError  a malformed line in a dependencies file (names the line)
    ├── ContainerError               container could not be created, started or inspected
    │   ├── ContainerStartError      the servers in the container did not come up
    │   └── FirewallError            firewall rules could not be applied (also a RuntimeError)
    ├── ServerConnectionError        a port of the container cannot be reached
    │   ├── AuthenticationError      the server refused the secret (401/403)
    │   └── ExecutionOutcomeUnknownError  the connection broke mid-execution and its end was not
    │                                recovered: the code may or may not have run; never re-executed
    ├── KernelError                  the kernel misbehaved
    │   ├── ExecutionError           the code raised; `.message` and `.trace`
    │   └── KernelDiedError          the kernel process died while executing
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


class IpyboxError(Exception):
    """Root of all errors raised by ipybox."""


class InvalidStateError(RuntimeError):
    """An object was used in a state that does not allow the call (e.g. not started yet)."""


class DockerUnavailableError(IpyboxError):
    """No Docker engine answers on this machine."""


class ImageError(IpyboxError):
    """Problems with an ipybox image."""


class ImageNotFoundError(ImageError):
    """The image is neither local nor pullable."""

    def __init__(self, tag: str, reason: str = "") -> None:
        self.tag = tag
        detail = f" ({reason})" if reason else ""
        super().__init__(
            f"Image {tag!r} is not available locally and could not be pulled{detail}. "
            f"Build it with: ipybox build -t {tag}"
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

    def __init__(self, message: str, container_id: str | None = None) -> None:
        self.container_id = container_id
        prefix = f"container {container_id[:12]}: " if container_id else ""
        super().__init__(prefix + message)


class ContainerStartError(ContainerError):
    """The container started but its servers did not become ready."""


class ServerConnectionError(IpyboxError):
    """A server in the container could not be reached."""


class AuthenticationError(ServerConnectionError):
    """The server rejected the request's secret (HTTP 401/403)."""


class ExecutionOutcomeUnknownError(ServerConnectionError):
    """The websocket broke while an execution was pending and its outcome could not be recovered.

    The client re-opens the websocket with the same session, and the gateway replays what the
    kernel sent meanwhile. This error means that did not work out: reconnecting failed, the kernel
    was restarted meanwhile, or messages of the execution were lost in the cut. The code may or may
    not have run (fully or in part); the client never sends it again. A `ServerConnectionError`,
    so code written for a lost connection keeps working.

    Attributes:
        kernel_id: The kernel the execution was sent to.
    """

    def __init__(self, message: str, kernel_id: str | None = None) -> None:
        self.kernel_id = kernel_id
        super().__init__(message)


class KernelError(IpyboxError):
    """The kernel misbehaved."""

    def __init__(self, message: str, kernel_id: str | None = None) -> None:
        self.kernel_id = kernel_id
        super().__init__(message)


class ExecutionError(KernelError):
    """Code executed in the kernel raised an exception.

    Attributes:
        message: `"<ExceptionType>: <value>"`, e.g. `"ZeroDivisionError: division by zero"`.
        trace: the traceback as plain text (no ANSI escape codes).
    """

    def __init__(self, message: str, trace: str | None = None, kernel_id: str | None = None) -> None:
        super().__init__(message, kernel_id)
        self.message = message
        self.trace = trace


class KernelDiedError(KernelError):
    """The kernel process died while an execution was pending; its state is lost."""


class ResourceError(IpyboxError):
    """The resource server rejected a request."""

    def __init__(self, message: str, status: int | None = None) -> None:
        self.status = status
        super().__init__(message)


class ExecutionTimeoutError(IpyboxError, TimeoutError):
    """An execution did not finish within its timeout.

    The kernel was interrupted and keeps its state, or, when the code ignored the interrupt, restarted
    and its state lost; the message and `restarted` say which.

    Attributes:
        restarted: True when the kernel was restarted (or a restart was attempted and failed): its
            state (variables, imports) is lost. False when it was only interrupted and keeps its state.
    """

    def __init__(self, message: str, restarted: bool = False) -> None:
        super().__init__(message)
        self.restarted = restarted


class RemoteFileNotFoundError(ResourceError, FileNotFoundError):
    """A file or directory in the sandbox does not exist."""

    def __init__(self, message: str, status: int | None = 404) -> None:
        ResourceError.__init__(self, message, status)


class RemotePathError(ResourceError, ValueError):
    """The server refused a path: absolute, `..`, encoded traversal, NUL, or a symlink out of /app."""


class ArchiveError(ResourceError):
    """A directory archive was rejected: links, unsafe names, or caps on members or size exceeded."""


class FirewallError(ContainerError, RuntimeError):
    """The firewall rules could not be applied; the sandbox was left blocked, never open.

    A `RuntimeError` too, as the seed API documents for `init_firewall` failures.
    """
