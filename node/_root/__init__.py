"""TaskAndGo: a peer-to-peer, Raft-replicated task scheduler.

The public Python API is the :class:`Client`; everything else is the node.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["Client", "TaskAndGoError", "__version__"]


def __getattr__(name: str) -> object:
    # Lazy so that `import taskandgo` stays cheap (the CLI's node subcommand and the
    # warm worker pool import it without needing gRPC).
    if name in ("Client", "TaskAndGoError"):
        from taskandgo.node import client

        return getattr(client, name)
    raise AttributeError(name)
