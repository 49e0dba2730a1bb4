"""Typed errors that callers of triattn-hub can catch.

Every error derives from `TriattnHubError`, so `except TriattnHubError` catches all of them.
Messages name the offending value and say what to do next. They never contain tokens.
"""


class TriattnHubError(Exception):
    """Base class of every error raised on purpose by triattn-hub."""


class UnsupportedModelError(TriattnHubError):
    """The model's architecture or attention layout cannot be calibrated."""


class RopeError(TriattnHubError):
    """A RoPE module does not behave as the band layout and omega that were read from it."""


class ManifestError(TriattnHubError):
    """A manifest is missing, malformed or fails schema validation."""


class IntegrityError(TriattnHubError):
    """A stored file does not match the sha256 or size recorded for it."""


class CalibrationNotFoundError(TriattnHubError):
    """No hub in the search list has a calibration for the requested model id or version."""


class HubError(TriattnHubError):
    """A hub could not be read or written."""


class AccessDeniedError(HubError):
    """The hub refused access (private or gated repository, missing or wrong token)."""


class OfflineError(HubError):
    """The hub cannot be reached and nothing usable is cached locally."""


class GeometryMismatchError(TriattnHubError):
    """A calibration's layers, heads, head size or omega do not match the model it is used with."""


class ModelSourceError(TriattnHubError):
    """A model could not be located, downloaded or loaded."""


class CorpusError(TriattnHubError):
    """A calibration corpus is invalid, modified or cannot be loaded."""


class CorpusIntegrityError(CorpusError, IntegrityError):
    """A corpus or prompt file does not match the sha256 recorded in its corpus manifest."""


class CorpusSpecError(CorpusError):
    """A `--corpus` value matches none of the accepted forms."""


class UnsupportedArchitectureError(UnsupportedModelError):
    """A model file declares an architecture that the loader cannot build.

    `architecture` is the declared name and `supported` lists the names the loader accepts.
    """

    def __init__(self, message: str, architecture: str, supported: tuple[str, ...]):
        super().__init__(message)
        self.architecture = architecture
        self.supported = supported


class GGUFFormatError(ModelSourceError):
    """A GGUF file is malformed, or holds metadata, tensors or a tokenizer the loader cannot use."""


class ModelFileNotFoundError(ModelSourceError):
    """A model file that an installed package should provide is missing."""


class BlasLibraryError(TriattnHubError):
    """A BLAS library named by TRIATTN_HUB_BLAS cannot be loaded or computes wrong results."""


class ConvergenceError(TriattnHubError):
    """The convergence check cannot run on its inputs (no sequences, an empty held-out sequence)."""


class PrivateModelError(HubError):
    """A calibration of a private or gated model was about to be published to a public hub."""


class ExportError(TriattnHubError):
    """A calibration cannot be written in a consumer's format without giving that consumer wrong values."""


class CatalogError(TriattnHubError):
    """A calibration catalog is missing, malformed or fails schema validation."""


class NotConvergedError(TriattnHubError):
    """A calibration failed the convergence gate, so it was not published."""
