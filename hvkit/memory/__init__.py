"""Guest RAM: memfd or anonymous regions, addressed by guest-physical address."""
from hvkit.memory.guest import GuestMemory, MemoryRegion

__all__ = ["GuestMemory", "MemoryRegion"]
