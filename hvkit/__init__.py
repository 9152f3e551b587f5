"""hvkit: a userspace hypervisor toolkit on Linux KVM."""
from hvkit.errors import (ConfigError, GuestCrash, GuestLoadError, GuestMemoryError,
                          GuestTimeout, HvkitError, KvmError)

__version__ = "0.1.0"

__all__ = ["ConfigError", "GuestCrash", "GuestLoadError", "GuestMemoryError",
           "GuestTimeout", "HvkitError", "KvmError", "MicroVM", "__version__"]


def __getattr__(name: str):
    # MicroVM pulls in the native layer; import it only when asked for.
    if name == "MicroVM":
        from hvkit.machine import MicroVM
        return MicroVM
    raise AttributeError(name)
