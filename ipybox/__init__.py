"""ipybox: a secure, fast Python code-execution sandbox for AI agents."""

from ipybox._errors import (
    ArchiveError,
    AuthenticationError,
    BuildError,
    ContainerError,
    ContainerStartError,
    DependencyFileError,
    DockerUnavailableError,
    ExecutionError,
    ExecutionOutcomeUnknownError,
    ExecutionTimeoutError,
    FirewallError,
    ImageError,
    ImageNotFoundError,
    InvalidStateError,
    IpyboxError,
    KernelDiedError,
    KernelError,
    RemoteFileNotFoundError,
    RemotePathError,
    ResourceError,
    ServerConnectionError,
)
from ipybox._version import __version__
from ipybox.container import DEFAULT_TAG, ExecutionContainer
from ipybox.executor import Execution, ExecutionClient, ExecutionResult
from ipybox.pool import Sandbox, SandboxPool
from ipybox.resource.client import ResourceClient

__all__ = [
    "DEFAULT_TAG",
    "ArchiveError",
    "AuthenticationError",
    "BuildError",
    "ContainerError",
    "ContainerStartError",
    "DependencyFileError",
    "DockerUnavailableError",
    "Execution",
    "ExecutionClient",
    "ExecutionContainer",
    "ExecutionError",
    "ExecutionOutcomeUnknownError",
    "ExecutionResult",
    "ExecutionTimeoutError",
    "FirewallError",
    "ImageError",
    "ImageNotFoundError",
    "InvalidStateError",
    "IpyboxError",
    "KernelDiedError",
    "KernelError",
    "RemoteFileNotFoundError",
    "RemotePathError",
    "ResourceClient",
    "ResourceError",
    "Sandbox",
    "SandboxPool",
    "ServerConnectionError",
    "__version__",
]
