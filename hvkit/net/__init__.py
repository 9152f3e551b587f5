"""Host networking for guests: tap devices (pyroute2)."""
from hvkit.net.tap import Tap, TapError, remove_stale, tun_available

__all__ = ["Tap", "TapError", "remove_stale", "tun_available"]
