"""One error type for everything a user can get wrong, so the app and the CLI can show it as one line."""


class LabError(ValueError):
    """Bad input, named: `where` is the field, file or preset; `message` says what is wrong and how to fix it."""

    def __init__(self, where: str, message: str):
        self.where = where
        self.message = message
        super().__init__(f"{where}: {message}")


class MissingPackageError(LabError):
    """An optional package a variant needs is not installed."""

    def __init__(self, where: str, package: str, pip_name: str | None = None, why: str = ""):
        self.package = package
        hint = f"install it with `pip install {pip_name or package}`"
        super().__init__(where, f"{package} is not installed{': ' + why if why else ''}; {hint}")


class Cancelled(Exception):
    """Raised inside a stream when the caller asked it to stop."""
