"""Host networking for guests: tap devices and bridges (pyroute2)."""
from hvkit.net.bridge import Bridge
from hvkit.net.tap import Tap, TapError, remove_stale, tun_available

__all__ = ["Bridge", "Tap", "TapError", "remove_stale", "tun_available"]
