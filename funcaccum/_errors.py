"""The one error class funcaccum raises for bad input."""

__all__ = ["FuncaccumError"]


class FuncaccumError(ValueError):
    """Bad input to a funcaccum function, or a training run that cannot go on.

    The message names what was wrong (the pytree path, the shapes) and what was
    expected. It subclasses :class:`ValueError`, so ``except ValueError`` catches it.

    Example:
        >>> import torch
        >>> import funcaccum as fa
        >>> try:
        ...     fa.split_microbatches(torch.zeros(10), num_microbatches=0)
        ... except fa.FuncaccumError as error:
        ...     print(isinstance(error, ValueError), "num_microbatches" in str(error))
        True True
    """
