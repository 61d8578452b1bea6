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
        text = _end(self.message)
        if self.hint:
            text += " " + _end(self.hint)
        return " ".join(text.split())


def _end(sentence: str) -> str:
    sentence = sentence.strip()
    return sentence if sentence.endswith((".", "?", "!")) else sentence + "."
