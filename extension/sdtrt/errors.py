"""Exceptions a user can act on. Every message says what was wrong and what to do."""


class SdtrtError(Exception):
    """Base class: anything sdtrt raises on purpose."""


class CheckpointError(SdtrtError):
    """The checkpoint file cannot be read (missing, truncated, not safetensors)."""


class UnknownArchitecture(SdtrtError):
    """The state dict is not a UNet of a family we support."""


class ProfileError(SdtrtError, ValueError):
    """A profile spec is malformed or inconsistent (min > max, size not a multiple of 8, ...)."""


class ExportError(SdtrtError):
    """ONNX export failed; global state was restored."""


class BackendUnavailable(SdtrtError):
    """The requested backend cannot run on this machine (package or GPU missing)."""


class BuildError(SdtrtError):
    """Building an engine failed; nothing was published."""


class TargetError(BuildError, ValueError):
    """An ahead-of-time build target (GPU compute capability) is malformed or not one the library builds for."""


class EngineNotFound(SdtrtError):
    """No engine with that id in the cache."""


class StaleEngine(SdtrtError):
    """The engine exists but must not be loaded (backend/GPU changed, file missing, truncated or edited)."""


class NoMatchingProfile(SdtrtError):
    """A UNet call's shapes are outside every optimization profile of the engine."""


class RefitError(SdtrtError):
    """Weights could not be put into the engine."""


class RefitRejected(RefitError):
    """A refit refused before anything in the engine changed (unknown names, wrong sizes, missing partners): the
    engine still holds its previous weights."""


class UnknownWeights(RefitRejected):
    """A refit named weights the engine does not have. Every backend raises this one type for it, before anything
    in the engine changed."""


class CacheNotWritable(BuildError):
    """The engine cache is read-only for this process (read-only mount, no permission): engines already in it
    are still served, but nothing can be built or published there. A BuildError, so build callers that catch
    BuildError keep working; an API maps it to 503."""


class CacheCannotRename(CacheNotWritable):
    """The engine cache is on a file system that cannot rename (an S3 mount such as Mountpoint for S3): an engine
    cannot be published there atomically, so nothing is built into it. Engines already there are still served."""


class ManifestError(StaleEngine):
    """manifest.json is unreadable, fails the schema, or was edited: the engine must not be loaded."""


class InvalidEngineId(EngineNotFound, ValueError):
    """The text cannot be an engine id (path separators, '..', NUL, uppercase, too long...)."""


class CorruptEngine(StaleEngine):
    """An engine's files do not match its manifest (truncated, bit-flipped, emptied, replaced): refused before
    deserialization. Rebuilding it moves the damaged folder aside (quarantine), never deletes it."""


class EngineBusy(SdtrtError):
    """The engine is in use by another thread (a refit or a load) for longer than the caller may wait."""


class EngineClosed(SdtrtError):
    """The engine was closed (unloaded by a switch, a delete or the end of a generation) while a caller held it."""
