"""The one exception type the CLI turns into a one-line message and a non-zero exit."""


class EffideployError(Exception):
    """A problem with the user's input or environment (bad option, missing file, failed parity check).

    The message is the whole story for the user: the CLI prints ``error: <message>`` on one line and exits 2.
    Anything else that escapes is a bug and keeps its traceback.
    """


class OptionError(EffideployError):
    """A bad value of a named parameter. The library names the parameter (``sparsity must be in (0, 1)``); the CLI
    prints it as its flag (``--sparsity must be in (0, 1)``) through :meth:`as_flag`."""

    def __init__(self, option: str, problem: str, *, flag: str | None = None) -> None:
        self.option, self.problem = option, problem
        self.flag = flag or f"--{option.replace('_', '-')}"
        super().__init__(f"{option} {problem}")

    def as_flag(self) -> str:
        return f"{self.flag} {self.problem}"


class ParityError(EffideployError):
    """An export did not reproduce its reference (transformers, or the fake-quantized weights for a quantized
    export) within its tolerance; the artifact was not kept. Its own type so a search can drop that one recipe and go
    on (``effideploy.search.stages.export_or_drop``, before the cost model's timing run and the final bench), where
    a single ``export`` or ``bench`` stops on it."""
