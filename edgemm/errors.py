"""The one exception type edgemm raises for bad input; the CLI turns it into a one-line error."""


class EdgemmError(Exception):
    """A problem with the user's input or files, described in one line."""


def require_torch():
    """Import torch or raise an EdgemmError that says how to install it."""
    try:
        import torch  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise EdgemmError("this needs torch: pip install 'edgemm[torch]' (torch==2.13.0)") from e
    return torch
