"""The one exception type users see: a problem with their input, and what to do next."""


class TunefixError(Exception):
    """A user-facing error. The CLI prints it as one line and exits with ``exit_code``.

    ``message`` names the problem; ``hint`` says what to do next. Both are plain text.
    """

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def one_line(self) -> str:
        text = self.message.rstrip(".")
        if self.hint:
            text += f". {self.hint.rstrip('.')}."
        else:
            text += "."
        return " ".join(text.split())
