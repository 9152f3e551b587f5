"""Numbers from the virtio 1.2 specification, in one place.

Device models, the queue and both transports import these instead of
repeating literals, so a reader can check every value against the spec.
"""
from __future__ import annotations

# -- device status (2.1) ------------------------------------------------------
STATUS_ACKNOWLEDGE = 1
STATUS_DRIVER = 2
STATUS_DRIVER_OK = 4
STATUS_FEATURES_OK = 8
STATUS_DEVICE_NEEDS_RESET = 0x40
STATUS_FAILED = 0x80

# -- reserved feature bits (6) ------------------------------------------------
F_INDIRECT_DESC = 28
F_EVENT_IDX = 29
F_VERSION_1 = 32
F_ACCESS_PLATFORM = 33
F_RING_PACKED = 34
F_IN_ORDER = 35
F_ORDER_PLATFORM = 36
F_SR_IOV = 37
F_NOTIFICATION_DATA = 38
F_RING_RESET = 40

# -- split virtqueue layout (2.7) ---------------------------------------------
DESC_SIZE = 16
DESC_F_NEXT = 1
DESC_F_WRITE = 2
DESC_F_INDIRECT = 4
AVAIL_F_NO_INTERRUPT = 1
USED_F_NO_NOTIFY = 1
USED_ELEM_SIZE = 8
DESC_ALIGN = 16
AVAIL_ALIGN = 2
USED_ALIGN = 4
#: largest split queue size the spec allows
QUEUE_SIZE_MAX = 32768

# -- device types (5) ---------------------------------------------------------
ID_NET = 1
ID_BLOCK = 2
ID_CONSOLE = 3
ID_RNG = 4
ID_VSOCK = 19

# -- interrupt status bits (ISR on PCI, InterruptStatus on MMIO) ---------------
INT_VRING = 1
INT_CONFIG = 2

#: "no MSI-X vector" in config_msix_vector / queue_msix_vector
MSI_NO_VECTOR = 0xFFFF


def feature_bit(n: int) -> int:
    """The mask of feature bit ``n``."""
    return 1 << n


def vring_need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """True if moving an index from ``old_idx`` to ``new_idx`` passed
    ``event_idx`` (2.7.10: the other side asked to be told once the index
    goes past ``event_idx``). All three are 16-bit and wrap."""
    return ((new_idx - event_idx - 1) & 0xFFFF) < ((new_idx - old_idx) & 0xFFFF)
