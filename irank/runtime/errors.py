"""Errors a user can cause. The CLI turns each into one line on stderr and a stable exit code."""


class IrankError(Exception):
    """Base class: bad input, named by file, row or flag. Exit code 3."""

    exit_code = 3


class UsageError(IrankError):
    """A flag or a combination of flags that cannot work."""


class ManifestError(IrankError):
    """A manifest that cannot be read or does not validate."""


class CheckpointError(IrankError):
    """A checkpoint that cannot be loaded into the architecture."""


class ImageError(IrankError):
    """A sample's file that is missing, unreadable or of the wrong size: an image, or a tensor file a row
    points into (an unknown key, an index past its end, a non-numeric dtype)."""


class NumericsError(IrankError):
    """Non-finite values in what the model produced."""


class PeerFailed(IrankError):
    """Another process of a torchrun group failed and reported why; this one stops with its exit code."""

    def __init__(self, failed_rank: int, exit_code: int):
        super().__init__(f"process {failed_rank} of the torchrun group failed (exit code {exit_code})")
        self.failed_rank = failed_rank
        self.exit_code = exit_code
